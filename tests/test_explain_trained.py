"""The explanation checks work both ways on a model trained here (CAM on tiny_cnn,
synthetic-parts at 32 px, 2 classes, 360 training images, 2 epochs; ~0.9 test accuracy):

* cascading randomisation changes the intrinsic CAM and the gradient maps, while Guided
  Backprop's stay similar (Adebayo et al. 2018's finding); a random map, which ignores the model,
  is flagged (similarity 1);
* the deletion AUC of the intrinsic map is lower than a random map's, and the curves' x-axis
  rises by a fixed number of pixels per step;
* the embeddings figure is drawn for the trained and an untrained model;
* the whole report (every explainer, JSON and HTML) and ROAR's script run end to end."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ROOT

import protozoo
from protozoo.backbones import backbone_normalization
from protozoo.data import build_data
from protozoo.explain import (embedding_figure, evaluate_explainers, explain_model,
                              explainer_section, fresh_copy, last_layer_inputs,
                              train_random_labels)
from protozoo.explain.training import train_model

pytest.importorskip("captum")

SIZE, EPOCHS, BATCH = 32, 2, 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    cache = tmp_path_factory.mktemp("explain") / "cache"
    mean, std = backbone_normalization("tiny_cnn")
    data = build_data("synthetic-parts", cache_dir=cache, num_classes=2, num_train=400,
                      num_test=64, image_size=SIZE, seed=0, mean=mean, std=std)
    torch.manual_seed(0)
    model = protozoo.create_model("cam", backbone="tiny_cnn", class_names=data.class_names)
    train_model(model, data, epochs=EPOCHS, batch_size=BATCH, seed=0)
    shuffled = train_random_labels(model, data, epochs=EPOCHS, batch_size=BATCH, seed=0)
    return model, shuffled, data, cache


@pytest.fixture(scope="module")
def results(trained):
    model, shuffled, data, _ = trained
    return evaluate_explainers(model, data.test, ["intrinsic", "gradient", "guided_backprop",
                                                  "random"],
                               num_images=32, batch_size=32, device="cpu", steps=16,
                               sanity_images=16, random_labels_model=shuffled, seed=0)


def test_the_model_learned(results):
    assert results["settings"]["accuracy"] >= 0.8


def test_cascading_randomisation_changes_cam_and_gradient_but_not_guided_backprop(results):
    s = results["scores"]
    gbp, cam, grad = s["guided_backprop"], s["intrinsic"], s["gradient"]
    # Guided Backprop: the known failure -- the maps stay similar once the classifier is random
    assert gbp["cascade_spearman_top"] > 0.8 and gbp["cascade_ssim_top"] > 0.8
    # the model's own map changes with the classifier it is computed from
    assert cam["cascade_spearman_top"] < 0.3 and cam["cascade_ssim_top"] < 0.3
    assert cam["cascade_spearman_top"] < gbp["cascade_spearman_top"] - 0.5
    # the gradient changes too, well below Guided Backprop, over the whole cascade
    spearman = results["cascade"]["spearman"]
    assert grad["cascade_spearman_top"] < gbp["cascade_spearman_top"] - 0.15
    assert np.mean(spearman["gradient"]) < np.mean(spearman["guided_backprop"]) - 0.1
    assert grad["cascade_ssim_top"] < gbp["cascade_ssim_top"] - 0.3
    # a map that ignores the model is flagged, at every layer
    assert results["cascade"]["spearman"]["random"] == [1.0] * len(results["cascade"]["layers"])
    assert results["cascade"]["layers"][0] == "fc"


def test_the_random_labels_model_explains_differently(results):
    s = results["scores"]
    assert s["intrinsic"]["random_labels_spearman"] < 0.3
    assert s["intrinsic"]["random_labels_spearman"] < \
        s["guided_backprop"]["random_labels_spearman"] - 0.4
    assert s["random"]["random_labels_spearman"] == 1.0


def test_deletion_ranks_the_intrinsic_map_above_a_random_one(results):
    s = results["scores"]
    assert s["intrinsic"]["deletion_auc"] < 0.8 * s["random"]["deletion_auc"]
    assert s["intrinsic"]["insertion_auc"] > s["random"]["insertion_auc"]
    pixels = results["curves"]["pixels"]
    assert pixels == [round(i * SIZE * SIZE / 16) for i in range(17)]
    assert all(b > a for a, b in zip(pixels, pixels[1:]))
    for kind in ("deletion", "insertion"):  # every explainer starts and ends at the same images
        starts = {round(c[0], 5) for c in results["curves"][kind].values()}
        ends = {round(c[-1], 5) for c in results["curves"][kind].values()}
        assert len(starts) == 1 and len(ends) == 1


def test_ground_truth_scores_sit_beside_their_chance_levels(results):
    s = results["scores"]
    for scores in s.values():
        for metric in ("pointing", "region_on_part", "relevance_mass"):
            assert 0.0 <= scores[metric] <= 1.0 and 0.0 < scores[metric + "_chance"] < 0.1
    assert s["random"]["relevance_mass"] == pytest.approx(s["random"]["relevance_mass_chance"],
                                                          abs=0.01)
    assert s["gradient"]["relevance_mass"] > 3 * s["gradient"]["relevance_mass_chance"]
    json.dumps(results)  # JSON-ready


def test_embeddings_figure_for_the_trained_and_an_untrained_model(trained, tmp_path):
    model, _, data, _ = trained
    untrained = fresh_copy(model, seed=0)
    path = embedding_figure(model, untrained, data.test, tmp_path / "emb.png", num_images=64)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def centroid_accuracy(m):
        points = last_layer_inputs(m, data.test, num_images=64)
        x, y = points["features"], points["labels"]
        centres = np.stack([x[y == k].mean(0) for k in np.unique(y)])
        return float((((x[:, None] - centres[None]) ** 2).sum(2).argmin(1) == y).mean())

    assert centroid_accuracy(model) >= 0.8
    assert centroid_accuracy(model) > centroid_accuracy(untrained)


def test_explain_model_writes_every_explainer_into_json_and_html(trained, tmp_path):
    model, _, data, _ = trained
    out = explain_model(model, data.test, tmp_path, "all", num_images=8, batch_size=8,
                        device="cpu", steps=4, sanity_images=2, embedding_images=40,
                        grid_images=2, params={"occlusion": {"window": 8, "stride": 8},
                                               "smoothgrad": {"samples": 2},
                                               "integrated_gradients": {"steps": 4}})
    assert set(out["scores"]) == set(protozoo.explain.list_explainers())
    saved = json.loads((tmp_path / "explainers.json").read_text())
    assert saved["scores"] == out["scores"]
    page = (tmp_path / "explainers.html").read_text()
    for name in out["scores"]:
        assert f"<td>{name}</td>" in page
    for png in ("grid", "deletion", "cascade", "embeddings"):
        assert (tmp_path / f"explainers_{png}.png").is_file()
        assert f'src="explainers_{png}.png"' in page


def test_the_html_escapes_strings_from_data(results):
    hostile = {**results, "scores": {"<script>x</script>": results["scores"]["random"]}}
    html = explainer_section(hostile)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_protopnet_embeddings_place_the_prototypes_in_the_same_space(trained, tmp_path):
    _, _, data, _ = trained
    torch.manual_seed(0)
    proto = protozoo.create_model("protopnet", backbone="tiny_cnn",
                                  class_names=data.class_names, prototypes_per_class=2).eval()
    points = last_layer_inputs(proto, data.test, num_images=16)
    assert points["features"].shape == (16, 4) and points["prototypes"].shape == (4, 4)
    assert points["prototype_classes"].tolist() == [0, 0, 1, 1]
    # a prototype is most similar to itself (the diagonal is the largest similarity)
    assert (points["prototypes"].argmax(1) == np.arange(4)).all()
    embedding_figure(proto, fresh_copy(proto, 1), data.test, tmp_path / "p.png", num_images=16)


def test_roar_script_runs_end_to_end(trained, tmp_path):
    _, _, _, cache = trained
    spec = importlib.util.spec_from_file_location("roar", ROOT / "scripts" / "roar.py")
    roar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roar)
    assert roar.main(["--num-classes", "2", "--num-train", "400", "--num-test", "64",
                      "--image-size", str(SIZE), "--epochs", "1", "--batch-size", "32",
                      "--fractions", "0.5", "--explainers", "intrinsic,random",
                      "--cache-dir", str(cache), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "roar.json").read_text())
    assert set(result["accuracy_mean"]) == {"intrinsic", "random"}
    assert all(0.0 <= a <= 1.0 for accs in result["accuracy_mean"].values() for a in accs)
    assert (tmp_path / "roar.png").is_file()
