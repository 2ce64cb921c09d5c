"""ProtoPNet trained end to end through train.py (warm-up, push, joint, push, last layer, prune,
last layer): it learns, and in the *final* model every prototype still is its source patch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import protozoo
import train
from protozoo.data import build_data
from protozoo.engine import train_unfrozen
from protozoo.models.protopnet.prune import MIN_SPECIFICITY
from protozoo.models.protopnet.push import image_distances, source_similarity_maps

SIZE = 48


def test_frozen_modules_keep_their_batchnorm_statistics():
    """The reproduction from the honest-evidence issue: gradients off alone let BN drift."""
    model = protozoo.create_model("protopnet", backbone="tiny_cnn", num_classes=2)
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(4, 3, SIZE, SIZE) * 3 + 1
    model.backbone.requires_grad_(False)
    train_unfrozen(model)
    before = bn.running_mean.clone()
    model(x)
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)
    assert not model.backbone.training and model.add_on.training
    model.backbone.requires_grad_(True)  # a phase that trains the backbone updates them
    train_unfrozen(model)
    model(x)
    assert not torch.equal(bn.running_mean, before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protopnet")
    out = tmp / "run"
    args = ["--dataset", "synthetic-parts", "--num-classes", "3", "--num-train", "360",
            "--num-test", "90", "--image-size", str(SIZE), "--cache-dir", str(tmp / "cache"),
            "--epochs", "4", "--model-arg", "prototypes_per_class=3", "--seed", "0",
            "--out", str(out)]
    assert train.main(args) == 0
    model = protozoo.load(out)
    data = build_data("synthetic-parts", cache_dir=tmp / "cache", num_classes=3, num_train=360,
                      num_test=90, image_size=SIZE, seed=0, mean=model.mean, std=model.std)
    return out, model, data


def test_it_learns_and_reports_honest_evidence(run):
    out, _, _ = run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.8
    for name in ("prototype_purity", "evidence_on_part", "evidence_region_on_part",
                 "evidence_relevance_mass"):
        assert 0.0 <= metrics[name] <= 1.0 and 0.0 < metrics[name + "_chance"] < 0.2
    # even this small run's evidence is far from vague (chance ~0.03)
    assert metrics["evidence_relevance_mass"] > 3 * metrics["evidence_relevance_mass_chance"]
    phases = [json.loads(line)["phase"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert "prune" in phases and phases[-1] == "last_layer_after_prune"


def test_every_prototype_still_is_its_source_patch_in_the_final_model(run):
    out, model, data = run
    records = model.metadata["prototypes"]
    assert len(records) == model.num_prototypes > 0
    # its similarity at the recorded source cell is its highest over the source image ...
    maps = source_similarity_maps(model, data.push, records)
    at_cell = torch.stack([maps[j, r["cell"][0], r["cell"][1]] for j, r in enumerate(records)])
    torch.testing.assert_close(at_cell, maps.flatten(1).amax(1), rtol=0, atol=0)
    # ... equal to the value recorded right after push (tolerance 1e-4: fp32 rounding of
    # features recomputed in another batch; the log similarity's slope near 0 is -1e4) ...
    pushed = torch.tensor([r["source_similarity"] for r in records])
    torch.testing.assert_close(at_cell, pushed, rtol=0, atol=1e-4)
    # ... and the highest over the whole push set: nothing matches it better than its patch
    best = model.similarity_of(image_distances(model, data.push).amin(1))
    torch.testing.assert_close(at_cell, best, rtol=0, atol=1e-4)
    # the report's box on the source: the region around the map's peak, inside Chen et al.'s box
    for r in records:
        (x0, y0, x1, y1), (X0, Y0, X1, Y1) = r["evidence_box"], r["high_activation_box"]
        assert X0 <= x0 < x1 <= X1 and Y0 <= y0 < y1 <= Y1, r
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prototypes_at_source"] == 1.0 and metrics["prototype_source_drift"] < 1e-4


def test_no_two_prototypes_of_a_class_share_a_source_image(run):
    _, model, _ = run
    sources = [(r["class"], r["image_index"]) for r in model.metadata["prototypes"]]
    assert len(set(sources)) == len(sources)
    # the pruning rule held: a prototype below the specificity bar survives only as the last
    # prototype of its class (every class keeps its most specific one)
    records = model.metadata["prototypes"]
    per_class = {c: sum(r["class"] == c for r in records) for c in {r["class"] for r in records}}
    specificity = [r.get("class_specificity") for r in records]
    assert np.isfinite(specificity).all()
    for r in records:
        assert r["class_specificity"] >= MIN_SPECIFICITY or per_class[r["class"]] == 1, r
