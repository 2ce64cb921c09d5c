"""Command-line behaviour of train.py and evaluate.py: one-line errors with status 2 that leave
nothing behind, evaluation metrics and reports, and HTML escaping of data-provided names."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import protozoo
import train
from conftest import ROOT, subprocess_env
from protozoo.cli import _value, parse_args, resolve_config
from protozoo.errors import run_cli

FAST = ["--model", "cam", "--backbone", "tiny_cnn", "--dataset", "digits", "--num-train", "100"]


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _setup(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "notes.txt").write_text("not a run")
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2\nlr: 0.1\n")
    (tmp_path / "typo.yaml").write_text("epochz: 3\n")
    (tmp_path / "list.yaml").write_text("- epochs\n- 3\n")
    (tmp_path / "words.yaml").write_text("epochs: ten\n")
    (tmp_path / "intkey.yaml").write_text("42: 1\n")
    (tmp_path / "shape.yaml").write_text("model_args: hops=3\n")
    killed = tmp_path / "killed"  # started, then killed before its first epoch ended
    killed.mkdir()
    protozoo.config.TrainConfig(model="cam", dataset="digits").save(killed / "train_config.json")
    (tmp_path / "damaged").mkdir()  # a run folder whose config was overwritten
    (tmp_path / "damaged" / "train_config.json").write_text("{half")


BAD_TRAIN = [
    (FAST[2:] + ["--model", "camm"], "unknown model 'camm': did you mean cam?"),
    (FAST[:2] + FAST[4:] + ["--backbone", "tiny_cnnn"], "unknown backbone 'tiny_cnnn'"),
    (FAST[:4] + ["--dataset", "folder", "--data-dir", "missing"], "data folder 'missing' not found"),
    (FAST[:4] + ["--dataset", "folder", "--data-dir", "empty"], "data folder 'empty' is empty"),
    (FAST + ["--out", "existing"], "run directory 'existing' already exists"),
    (["--resume", "notrun"], "'notrun' is not a run directory"),
    (["--resume", "killed"], "has no train_state.pt"),
    (FAST + ["--config", "bad.yaml"], "config file 'bad.yaml' is not valid YAML (line 2)"),
    (FAST + ["--config", "typo.yaml"], "unknown key(s) epochz in typo.yaml"),
    (FAST + ["--config", "list.yaml"], "must hold a mapping"),
    (FAST + ["--config", "nowhere.yaml"], "config file 'nowhere.yaml' not found"),
    (FAST + ["--config", "words.yaml"], "'epochs' in words.yaml must be int | None, got 'ten'"),
    (FAST + ["--config", "intkey.yaml"], "unknown key(s) 42 in intkey.yaml"),
    (FAST + ["--model-arg", "nonsense=1"], "has no argument 'nonsense'"),
    (FAST + ["--model-arg", "nonsense"], "must look like KEY=VALUE"),
    (["--model", "protopnet"] + FAST[2:] + ["--model-arg", "similarity=dot"],
     "similarity must be 'log' or 'cosine', got 'dot'; fix the --model-arg value"),
    (FAST + ["--image-size", "4"], "image_size=4 is too small for digits"),
    (FAST + ["--val-fraction", "1.5"], "val_fraction=1.5 must be between 0 and 1"),
    # model and data that do not go together, arguments a run cannot use
    (["--model", "san", "--dataset", "digits"], "model 'san' answers questions about images"),
    (FAST[:4] + ["--dataset", "sort-of-clevr"], "dataset 'sort-of-clevr' holds questions"),
    (FAST + ["--data-dir", "empty"], "dataset 'digits' is generated and does not read --data-dir"),
    (FAST + ["--model-arg", "extra_conv=two"], "argument 'extra_conv' of model 'cam' must be"),
    (FAST + ["--epochs", "0"], "'epochs' in the command line must be >= 1, got 0"),
    (FAST + ["--lr", "-1"], "'lr' in the command line must be > 0"),
    (FAST + ["--amp", "fp8"], "'amp' in the command line must be one of auto, off, bf16, fp16"),
    (FAST + ["--loss-weight", "cluster=0.8"], "model 'cam' has no loss term cluster"),
    (["--model", "protopnet"] + FAST[2:] + ["--loss-weight", "clusterr=1"],
     "has no loss term clusterr for --loss-weight: its terms are cross_entropy, cluster"),
    (FAST + ["--schedule", "short"], "model 'cam' has no schedule 'short'"),
    (FAST + ["--stage", "9"], "stage 9 does not exist; choose --stage in [-4, 3]"),
    (FAST + ["--config", "shape.yaml"], "'model_args' in shape.yaml must be dict"),
    (FAST + ["--out", "existing/keep.txt"], "is a file; a run is a folder"),
    (["--resume", "killed", "--epochs", "3"], "so --epochs would be ignored"),
    (["--resume", "damaged"], "damaged/train_config.json' cannot be read as JSON"),
]


@pytest.mark.parametrize("argv, message", BAD_TRAIN, ids=[m[:30] for _, m in BAD_TRAIN])
def test_train_bad_input_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, argv,
                                                        message):
    _setup(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    if "--out" not in argv and "--resume" not in argv:
        argv = argv + ["--out", "run"]
    assert run_cli(train.main, argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line
    assert _tree(tmp_path) == before  # no run folder, no runs/, nothing changed


def test_resolve_config_yaml_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 3\nlr: 1e-3\nbatch-size: 16\nmodel_args:\n"
                                     "  extra_conv: 8\nloss_weights: {cluster: 0.5}\n")
    args = parse_args(["--config", str(tmp_path / "c.yaml"), "--epochs", "1",
                       "--model-arg", "stage=2", "--loss-weight", "cluster=0.8",
                       "--pretrained", "timm"])
    cfg = resolve_config(args)
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (1, 0.001, 16)
    assert cfg.model_args == {"extra_conv": 8, "stage": 2}
    assert cfg.loss_weights == {"cluster": 0.8}
    assert cfg.pretrained is True and cfg.model == "protopnet"  # untouched default


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cuda_without_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(train.main, FAST + ["--device", "cuda", "--out", "run"]) == 2
    assert "no CUDA GPU is available" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--model", "camm", "--dataset", "digits"], "did you mean cam?"),
])
def test_real_process_exit_status_and_stderr(tmp_path, script, args, message):
    (tmp_path / "bad.yaml").write_text("epochs: [1, 2\n")
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in _one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_evaluate_bad_input(tmp_path, capsys):
    (tmp_path / "notrun").mkdir()
    assert run_cli(evaluate.main, [str(tmp_path / "nowhere")]) == 2
    assert "checkpoint folder" in _one_error_line(capsys.readouterr().err)
    assert run_cli(evaluate.main, [str(tmp_path / "notrun")]) == 2
    assert "has no config.json" in _one_error_line(capsys.readouterr().err)
    # a bare checkpoint (protozoo.save, no train_config.json) needs --dataset ...
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=3)
    protozoo.save(model, tmp_path / "bare")
    assert run_cli(evaluate.main, [str(tmp_path / "bare")]) == 2
    assert "say which data to use with --dataset" in _one_error_line(capsys.readouterr().err)
    # ... with as many classes as the model
    assert run_cli(evaluate.main, [str(tmp_path / "bare"), "--dataset", "digits"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "the model has 3 classes but dataset 'digits' has 10" in line
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["config.json",
                                                                      "model.safetensors"]


def test_evaluate_bare_checkpoint_with_dataset_flag(tmp_path):
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=10)
    protozoo.save(model, tmp_path / "bare")
    assert evaluate.main([str(tmp_path / "bare"), "--dataset", "digits", "--no-report"]) == 0
    metrics = json.loads((tmp_path / "bare" / "metrics.json").read_text())
    assert metrics["num_test_images"] == 450  # 25% of the 1797 digits, stratified
    assert "cam_iou" not in metrics  # digits has no masks
    assert not (tmp_path / "bare" / "report").exists()


# ----------------------------------------------------------------------------- evaluate.py

@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic")
    run = tmp / "run"
    assert train.main(["--model", "cam", "--backbone", "tiny_cnn", "--dataset", "synthetic-parts",
                       "--num-train", "100", "--num-test", "40", "--cache-dir", str(tmp / "cache"),
                       "--epochs", "1", "--no-report", "--out", str(run)]) == 0
    return run


def test_evaluate_writes_metrics_and_report(synthetic_run, tmp_path, capsys):
    assert not (synthetic_run / "metrics.json").exists()  # --no-report skipped evaluation
    rgba = np.zeros((40, 30, 4), dtype=np.uint8)  # a user image: RGBA, not square, odd name
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "<mine>.png")
    assert evaluate.main([str(synthetic_run), "--images", str(tmp_path / "<mine>.png")]) == 0
    metrics = json.loads((synthetic_run / "metrics.json").read_text())
    for key in ("accuracy", "mean_class_accuracy", "cam_iou", "pointing", "region_on_part",
                "relevance_mass", "localization_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    for key in ("cam_iou", "pointing", "region_on_part", "relevance_mass"):
        assert 0.0 < metrics[key + "_chance"] < 0.1, key  # the petal is a small share
    assert metrics["num_test_images"] == 40
    out = capsys.readouterr().out
    assert f"accuracy: {metrics['accuracy']:.4f}" in out and "metrics.json" in out
    report = synthetic_run / "report"
    html = (report / "index.html").read_text()
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert "cams.png" in sources and len(sources) >= 2
    for src in sources:
        assert (report / src).is_file(), src
        assert (report / src).read_bytes()[:4] == b"\x89PNG"
    assert f"{metrics['cam_iou']:.4f}" in html
    assert "user_000.png" in sources and "&lt;mine&gt;.png" in html
    assert np.asarray(Image.open(report / "user_000.png")).shape[0] == 64 * 3  # 64 px, x3
    before = (synthetic_run / "metrics.json").read_bytes()
    assert run_cli(evaluate.main, [str(synthetic_run), "--images",
                                   str(tmp_path / "missing.png")]) == 2
    assert "missing.png' not found" in _one_error_line(capsys.readouterr().err)
    assert run_cli(evaluate.main, [str(synthetic_run), "--no-report", "--images",
                                   str(tmp_path / "<mine>.png")]) == 2
    assert "drop --no-report" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    written = (synthetic_run / "metrics.json").stat().st_mtime_ns
    assert run_cli(evaluate.main, [str(synthetic_run), "--images",
                                   str(tmp_path / "broken.png")]) == 2
    assert "cannot read image" in _one_error_line(capsys.readouterr().err)
    assert (synthetic_run / "metrics.json").stat().st_mtime_ns == written  # before evaluating
    assert (synthetic_run / "metrics.json").read_bytes() == before  # failed fast, wrote nothing


# ----------------------------------------------------------------------------- HTML escaping

def _write_folder_dataset(root: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for k, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
                pixels[..., k] += 150  # class k is brighter in channel k
                file = "<i>x.png" if (split, i) == ("test", 0) else f"{i}.png"
                Image.fromarray(pixels).save(folder / file)


def test_report_escapes_class_and_file_names(tmp_path):
    names = ["<script>alert(1)<\\script>", "a&b", "plain"]
    _write_folder_dataset(tmp_path / "data", names)
    run = tmp_path / "run"
    assert train.main(["--model", "cam", "--backbone", "tiny_cnn", "--dataset", "folder",
                       "--data-dir", str(tmp_path / "data"), "--image-size", "24",
                       "--epochs", "1", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["class_names"] == sorted(names)
    html = (run / "report" / "index.html").read_text()
    assert "<script" not in html.lower() and "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;\\script&gt;" in html
    assert "a&amp;b" in html and "&lt;i&gt;x.png" in html


def test_flag_values_read_python_spellings_of_booleans():
    assert _value("False") is False and _value("TRUE") is True
    assert _value("None") is None and _value("0.5") == 0.5
    assert _value("[1, 2]") == [1, 2] and _value("gate") == "gate"


def test_model_argument_that_fails_on_data_is_caught_before_the_run_folder(tmp_path, monkeypatch,
                                                                            capsys):
    # embed_dim=0 builds, but no batch goes through it: the dry run says so, nothing is written
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROTOZOO_CACHE", str(tmp_path / "cache"))
    argv = ["--model", "han", "--dataset", "sort-of-clevr", "--num-train", "12", "--num-test",
            "4", "--model-arg", "embed_dim=0", "--out", "run"]
    assert run_cli(train.main, argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "model 'han' fails on a batch of sort-of-clevr" in line
    assert "check the --model-arg values (embed_dim=0)" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arg", ["objectness=1", "describe_steps=10"])
def test_a_loss_the_data_cannot_feed_is_caught_before_the_run_folder(tmp_path, monkeypatch,
                                                                     capsys, arg):
    # han's objectness loss and describe phase need the objects' masks: Sort-of-CLEVR's files
    # read as plain CLEVR without their masks/ folder have none
    import shutil

    from protozoo.data.sort_of_clevr import ensure_sort_of_clevr

    monkeypatch.chdir(tmp_path)
    root = ensure_sort_of_clevr(tmp_path / "cache", num_train=12, num_test=4)
    shutil.rmtree(root / "masks")
    argv = ["--model", "han", "--dataset", "clevr", "--data-dir", str(root), "--model-arg",
            arg, "--out", "run"]
    assert run_cli(train.main, argv) == 2
    assert "need the objects' masks" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_the_dry_run_leaves_training_unchanged(tmp_path, monkeypatch):
    """The dry run's forward pass (and the augmentation it draws) must not move any number."""
    monkeypatch.chdir(tmp_path)
    argv = FAST + ["--epochs", "1", "--augment", "--no-report"]
    assert train.main(argv + ["--out", "with"]) == 0
    monkeypatch.setattr(protozoo.api, "dry_run", lambda *args: None)
    assert train.main(argv + ["--out", "without"]) == 0

    def records(run):  # every logged number except the wall time
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    assert records("with") == records("without") and len(records("with")) == 1


def test_yaml_nulls_and_exponents_and_blame(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # a null is the default; YAML 1.1 reads 1e-4 as a string, inside mappings too
    (tmp_path / "ok.yaml").write_text("batch_size:\nloss_weights: {l1: 1e-4}\n"
                                      "model_args: {extra_conv: 8}\n")
    cfg = resolve_config(parse_args(["--config", "ok.yaml", "--model", "cam"]))
    assert cfg.batch_size == 64 and cfg.loss_weights == {"l1": 1e-4}
    # a bad flag next to a good file is the flag's fault, not the file's
    assert run_cli(train.main, FAST + ["--config", "ok.yaml", "--epochs", "0"]) == 2
    assert "'epochs' in the command line must be >= 1" in _one_error_line(capsys.readouterr().err)


def test_resume_may_change_where_it_runs(reference_cam_run, tmp_path, capsys):
    assert train.main(["--resume", str(reference_cam_run), "--device", "cpu",
                       "--workers", "0"]) == 0
    assert "already finished" in capsys.readouterr().out


@pytest.fixture(scope="module")
def reference_cam_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("camrun") / "run"
    assert train.main(FAST + ["--epochs", "1", "--no-report", "--out", str(run)]) == 0
    return run


def test_unwritable_out_and_saved_data_dir(reference_cam_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert run_cli(train.main, FAST + ["--out", "afile/run"]) == 2
    assert "cannot create the run folder 'afile/run'" in _one_error_line(capsys.readouterr().err)
    # a saved config that carries a data_dir for a generated dataset (older train.py saved
    # it) still evaluates: the check is on what the user types
    config = json.loads((reference_cam_run / "train_config.json").read_text())
    (reference_cam_run / "train_config.json").write_text(json.dumps({**config,
                                                                     "data_dir": "ignored"}))
    assert run_cli(evaluate.main, [str(reference_cam_run), "--no-report"]) == 0
    # digits have neither masks nor boxes: said once each, not an error
    assert "note: the data has no masks, so pointing" in capsys.readouterr().err
    assert run_cli(evaluate.main, [str(reference_cam_run), "--batch-size", "0"]) == 2
    assert "'batch_size' in the command line must be >= 1" in \
        _one_error_line(capsys.readouterr().err)
