"""The explainer evaluation from the command line (``evaluate.py RUN --explainers ...``) and from
Python (``protozoo.evaluate(..., explainers=...)``): one key per explainer in metrics.json, the
report section, and one-line errors for an unknown name or a missing Captum. A tiny CAM trained
for one epoch on 100 images; a few test images."""
from __future__ import annotations

import json
import re
import sys

import pytest

import evaluate
import protozoo
import train
from protozoo.errors import run_cli
from protozoo.explain import list_explainers

pytest.importorskip("captum")
pytest.importorskip("sklearn")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain_cli")
    run = tmp / "run"
    assert train.main(["--model", "cam", "--backbone", "tiny_cnn", "--dataset", "synthetic-parts",
                       "--num-train", "100", "--num-test", "24", "--cache-dir", str(tmp / "cache"),
                       "--epochs", "1", "--no-report", "--out", str(run)]) == 0
    return run


def test_evaluate_explainers_all_writes_one_key_each_and_the_report_section(tiny_run, capsys):
    assert evaluate.main([str(tiny_run), "--explainers", "all", "--explainer-images", "4"]) == 0
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert "accuracy" in metrics and "cam_iou" in metrics  # the family's metrics are kept
    assert list(metrics["explainers"]) == list_explainers()
    for name, scores in metrics["explainers"].items():
        for key in ("pointing", "region_on_part", "relevance_mass"):
            assert 0.0 <= scores[key] <= 1.0 and 0.0 < scores[key + "_chance"] < 0.1, (name, key)
        for key in ("deletion_auc", "insertion_auc"):
            assert 0.0 <= scores[key] <= 1.0, (name, key)
        assert -1.0 <= scores["cascade_spearman_full"] <= 1.0, name
    settings = metrics["explainer_settings"]
    assert settings["num_images"] == 4 and settings["cpu_seconds"] > 0
    out = capsys.readouterr().out
    assert "explainer gradcam: pointing=" in out and "explainers: 4 images" in out
    report = tiny_run / "report"
    html = (report / "index.html").read_text()
    assert "CAM report" in html and "Every explanation, judged" in html
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html)
    for png in ("explainers_grid.png", "explainers_deletion.png", "explainers_cascade.png",
                "explainers_embeddings.png"):
        assert png in sources and (report / png).read_bytes()[:4] == b"\x89PNG", png
    assert (report / "explainers.html").is_file()
    assert "{" not in re.sub(r"<style>.*?</style>", "", html, flags=re.S)  # no dict printed


def test_evaluate_explainers_list_and_errors(tiny_run, capsys, monkeypatch):
    assert evaluate.main([str(tiny_run), "--no-report", "--explainers", "intrinsic, gradcam",
                          "--explainer-images", "4"]) == 0
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert list(metrics["explainers"]) == ["intrinsic", "gradcam"]
    capsys.readouterr()
    before = (tiny_run / "metrics.json").read_bytes()
    assert run_cli(evaluate.main, [str(tiny_run), "--explainers", "intrinsic,gradcan"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown explainer 'gradcan'" in line and ", ".join(list_explainers()) in line
    assert run_cli(evaluate.main, [str(tiny_run), "--random-labels"]) == 2
    assert "add --explainers" in _one_error_line(capsys.readouterr().err)
    # without Captum: the post-hoc explainers are a one-line error before any work ...
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    assert run_cli(evaluate.main, [str(tiny_run), "--explainers", "all"]) == 2
    assert "pip install 'protozoo[explain]'" in _one_error_line(capsys.readouterr().err)
    assert (tiny_run / "metrics.json").read_bytes() == before
    # ... and the model's own map and the random control still run
    assert evaluate.main([str(tiny_run), "--no-report", "--explainers", "intrinsic,random",
                          "--explainer-images", "4"]) == 0
    assert list(json.loads((tiny_run / "metrics.json").read_text())["explainers"]) == [
        "intrinsic", "random"]


def test_python_evaluate_with_explainers(tiny_run, tmp_path):
    from protozoo.data import build_data

    model = protozoo.load(tiny_run)
    data = build_data("synthetic-parts", num_train=100, num_test=24, seed=0,
                      cache_dir=tiny_run.parent / "cache", mean=model.mean, std=model.std)
    metrics = protozoo.evaluate(model, data, report_dir=tmp_path / "rep",
                                explainers=["intrinsic", "random"],
                                explainer_options={"num_images": 4, "embeddings": False})
    assert list(metrics["explainers"]) == ["intrinsic", "random"]
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["explainers"] == metrics["explainers"]
    assert "Every explanation, judged" in (tmp_path / "rep" / "index.html").read_text()
    with pytest.raises(protozoo.UserError, match="unknown explainer 'nope'"):
        protozoo.evaluate(model, data, explainers="nope")


def test_the_images_are_spread_over_the_classes():
    """A test split stored class by class (synthetic-parts is) is not judged on its first class
    alone: the evaluation, the grid and the embeddings read every class."""
    from torch.utils.data import Dataset

    from protozoo.explain.scoring import spread_subset

    class ByClass(Dataset):
        labels = [k for k in range(4) for _ in range(10)]

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {"label": self.labels[i]}

    picked = spread_subset(ByClass(), 8)
    assert [picked[i]["label"] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert spread_subset(ByClass(), 8).indices == picked.indices  # seeded
    whole = ByClass()
    assert spread_subset(whole, None) is whole and spread_subset(whole, 40) is whole
