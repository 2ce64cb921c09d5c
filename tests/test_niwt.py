"""NIWT zero-shot head (Selvaraju et al. 2018), its data and its baselines.

Importances against a hand-written computation, the degenerate-layer warning, the early-stopping
rule, the synthetic-attributes invariants, CUB zero-shot loading on a tiny fixture, save/load of a
fitted head, explanations that name the class's attributes, and a small end-to-end zero-shot run
that must beat chance.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import protozoo
from protozoo.models import zeroshot as zs
from protozoo.config import TrainConfig
from protozoo.data import build_data
from protozoo.data import synthetic_attributes as sa
from protozoo.errors import DataError, UserError
from protozoo.cli import build_model
from protozoo.models.niwt import DegenerateLayerWarning

ATTRS = ["a0", "a1", "a2"]


def _cam(extra_conv=4, classes=("p", "q", "r"), seed=0):
    torch.manual_seed(seed)
    model = protozoo.create_model("cam", backbone="tiny_cnn", class_names=list(classes),
                                  extra_conv=extra_conv)
    with torch.no_grad():
        model.fc.bias.uniform_(-1, 1)
    return model.eval()


def _niwt(base, layer="backbone", unseen=("u0", "u1"), **kwargs):
    model = protozoo.create_model("niwt", base_model="cam", base_kwargs=base.config(),
                                  unseen_classes=list(unseen), attribute_names=ATTRS, layer=layer,
                                  **kwargs)
    model.base.load_state_dict(base.state_dict())
    return model.eval()


# ----------------------------------------------------------------------------- importances

def _hand_importance(features, conv, fc_row):
    """d(fc_row . mean_xy relu(conv(A))) / dA summed over space, written out with loops."""
    a = features.detach().double().numpy()  # [C, h, w]
    kernel, bias = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    w = fc_row.detach().double().numpy()
    channels, h, wd = a.shape
    padded = np.pad(a, ((0, 0), (1, 1), (1, 1)))
    alpha = np.zeros(channels)
    for d in range(kernel.shape[0]):
        for y in range(h):
            for x in range(wd):
                z = (kernel[d] * padded[:, y:y + 3, x:x + 3]).sum() + bias[d]
                if z <= 0:  # ReLU: an inactive unit passes no gradient
                    continue
                for i in range(3):
                    for j in range(3):
                        yy, xx = y + i - 1, x + j - 1
                        if 0 <= yy < h and 0 <= xx < wd:  # taps on the zero padding do not count
                            alpha += w[d] / (h * wd) * kernel[d, :, i, j]
    return alpha


def test_importances_match_a_hand_computed_network():
    base = _cam(extra_conv=4)
    model = _niwt(base)
    with torch.no_grad():
        model.unseen_weight.normal_()
    x = torch.randn(3, 3, 32, 32)
    classes = torch.tensor([2, 0, 4])  # two seen classes and one unseen
    alphas, acts, _, _ = model.importances(x, classes)
    weights = torch.cat([base.fc.weight, model.unseen_weight])
    for b in range(3):
        expected = _hand_importance(acts[b], base.extra[0], weights[classes[b]])
        np.testing.assert_allclose(alphas[b].double().numpy(), expected, rtol=1e-4, atol=1e-7)
    # the Jacobians give the same importances for any class weights (seen and unseen)
    induced = zs.induced_importances(weights, model.importance_jacobians(x))
    torch.testing.assert_close(induced[classes, torch.arange(3)], alphas, rtol=1e-4, atol=1e-7)


def test_degenerate_layer_is_detected_and_warned():
    x = torch.randn(4, 3, 32, 32)
    with pytest.warns(DegenerateLayerWarning, match="feeds global average pooling"):
        assert _niwt(_cam(extra_conv=4), layer="extra").check_layer(x)
    with pytest.warns(DegenerateLayerWarning):  # no extra conv: the backbone feeds GAP directly
        assert _niwt(_cam(extra_conv=0), layer="backbone").check_layer(x)
    degenerate = _niwt(_cam(extra_conv=0))
    alphas = degenerate.importances(x, torch.zeros(4, dtype=torch.long))[0]
    torch.testing.assert_close(alphas, degenerate.base.fc.weight[0].expand(4, -1))  # alpha = w_k
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layer with conv + ReLU above it passes silently
        assert not _niwt(_cam(extra_conv=4)).check_layer(x)


def test_unknown_layer_and_missing_base_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown layer 'backbon'.*did you mean backbone"):
        _niwt(_cam(), layer="backbon")
    data = build_data("synthetic-attributes", cache_dir=tmp_path, num_train=76, num_test=48,
                      image_size=16)
    with pytest.raises(UserError, match="pass --base RUN_DIR"):
        build_model(TrainConfig(model="niwt"), data)
    with pytest.raises(UserError, match="is not a trained run"):
        build_model(TrainConfig(model="niwt", model_args={"base": str(tmp_path)}), data)
    other = _cam(classes=("x", "y"))
    protozoo.save(other, tmp_path / "other")
    with pytest.raises(UserError, match="trained on 2 other classes"):
        build_model(TrainConfig(model="niwt", model_args={"base": str(tmp_path / "other")}),
                       data)


# ----------------------------------------------------------------------------- optimisation

def test_early_stopping_rule():
    stop = zs.EarlyStopping(patience=3, min_improvement=0.01)
    # 10 -> 9.95 is 0.5% (stale 1), 9.5 is 4.5% below the reference 10 (reset), then three steps
    # within 1% of 9.5 (9.45 is 0.53%): the third stale step stops
    decisions = [stop.step(v) for v in (10.0, 9.95, 9.5, 9.45, 9.41, 9.5)]
    assert decisions == [False, False, False, False, False, True]
    assert stop.reference == 9.5
    # the full optimiser obeys it: the last `patience` losses never beat the final reference by 1%
    gen = torch.Generator().manual_seed(0)
    jac = torch.randn(20, 6, 5, generator=gen)
    out = zs.optimise_unseen_weights(jac, torch.randn(2, 5, generator=gen),
                                     torch.randn(4, 6, generator=gen), lr=0.05, patience=40)
    assert out.steps < 3000
    ref = zs.EarlyStopping(40, 0.01)
    assert [ref.step(v) for v in out.history].index(True) == out.steps - 1


def test_unseen_weights_reach_their_target_importances():
    gen = torch.Generator().manual_seed(1)
    # 64 images, D=8 weights, C=6 neurons; images differ, but not beyond recognition
    jac = torch.randn(8, 6, generator=gen) + 0.2 * torch.randn(64, 8, 6, generator=gen)
    truth = torch.randn(3, 8, generator=gen)
    targets = zs.induced_importances(truth, jac).mean(1)
    seen = torch.randn(5, 8, generator=gen)
    start = zs.optimise_unseen_weights(jac, targets, seen, max_steps=1)
    out = zs.optimise_unseen_weights(jac, targets, seen, reg_lambda=1e-4, lr=0.05)
    assert out.cosine > 0.9 > start.cosine


def test_attribute_map_is_selected_on_held_out_classes():
    gen = torch.Generator().manual_seed(2)
    signatures = (torch.rand(12, 5, generator=gen) > 0.5).float()
    mapping = torch.randn(7, 5, generator=gen)
    classes = torch.arange(12).repeat_interleave(10)
    importances = signatures[classes] @ mapping.T + 0.05 * torch.randn(120, 7, generator=gen)
    fit = zs.fit_attribute_map(signatures[classes], importances, classes, [3, 7, 9],
                               max_steps=400, lr=0.01)
    # the held-out classes' loss bottoms out before the last step, and that step count is kept
    assert 1 < fit.steps < 400 and fit.val_loss < 0.2
    cosine = 1 - zs.cosine_distance(fit(signatures), signatures @ mapping.T)
    assert cosine.min() > 0.99  # the refitted map predicts every class's importances


def test_gzsl_metrics_by_hand():
    # 2 seen + 2 unseen classes; seen images: class 0 right, class 1 taken for unseen class 2
    seen = np.array([[5, 1, 0, 0], [0, 1, 3, 0]])
    unseen = np.array([[0, 0, 2, 1], [9, 0, 1, 3], [0, 0, 1, 2]])
    m = zs.gzsl_metrics(seen, [0, 1], unseen, [2, 3, 3], num_seen=2)
    assert m["gzsl_seen"] == 0.5 and m["gzsl_unseen"] == pytest.approx(0.75)
    assert m["gzsl_h"] == pytest.approx(2 * 0.5 * 0.75 / 1.25) and m["zsl_unseen"] == 1.0


def test_mean_per_class_accuracy_is_one_computation():
    """The zero-shot metrics (scikit-learn's balanced accuracy) equal a per-class loop to the
    bit, also when classes are absent from the labels, predicted only (unseen classes), or absent
    altogether; evaluation's ``mean_class_accuracy`` (a NaN-mean over all classes) agrees up to
    the rounding of its sum."""
    from protozoo.metrics import mean_class_accuracy

    rng = np.random.default_rng(0)
    cases = [(np.array([0, 1, 1, 3]), np.array([0, 0, 1, 1]))]  # class 3 predicted only
    cases += [(rng.integers(0, 7, n), rng.choice([0, 2, 3, 5], n)) for n in (1, 5, 40, 333)]
    for preds, labels in cases:
        by_hand = np.mean([(preds[labels == k] == k).mean() for k in np.unique(labels)])
        assert zs.mean_per_class_accuracy(preds, labels) == by_hand
        assert mean_class_accuracy(preds, labels, 8) == pytest.approx(by_hand, rel=1e-12)
    assert zs.mean_per_class_accuracy(cases[0][0], cases[0][1]) == 0.5  # (1/2 + 1/2) / 2
    assert np.isnan(zs.mean_per_class_accuracy([], []))


# ----------------------------------------------------------------------------- data

def test_synthetic_attributes_invariants(tmp_path):
    seen, unseen = sa.class_split(10, sa.DATA_SEED)
    assert len(unseen) == 10 and not set(seen) & set(unseen) and len(seen) + 10 == 48
    for g, (_, values) in enumerate(sa.GROUPS):  # every value is seen
        assert {c[g] for c in seen} == set(range(len(values)))
    for combo in unseen:  # and every pair of an unseen class's values too
        for a, b in [(0, 1), (0, 2), (1, 2)]:
            assert any(c[a] == combo[a] and c[b] == combo[b] for c in seen)
    data = build_data("synthetic-attributes", cache_dir=tmp_path, num_train=76, num_test=96,
                      image_size=24)
    split = data.zero_shot
    assert data.class_names == split.seen_classes and len(data.class_names) == 38
    assert split.unseen_classes == [sa.combo_name(c) for c in unseen]
    train_names = {data.class_names[k] for k in data.train.labels + data.val.labels}
    assert train_names == set(split.seen_classes)  # no unseen class is ever trained on
    assert set(split.unseen_test.labels) == set(range(38, 48))
    matrix = split.class_attributes
    assert matrix.shape == (48, 11) and set(np.unique(matrix)) == {0.0, 1.0}
    assert (matrix[:, :4].sum(1) == 1).all() and (matrix[:, 4:8].sum(1) == 1).all()
    assert (matrix[:38].max(0) == 1).all()  # each attribute is present in some seen class
    item = split.unseen_test[0]
    name = split.class_names[item["label"]]
    raw = split.unseen_test.raw_image(0).astype(int)
    inside = raw[item["mask"][0].bool().numpy()]
    colour = dict(sa.COLOURS)[name.split("-")[0]]
    assert np.abs(inside.max(0) - colour).max() <= 19  # the object is painted in its colour
    again = build_data("synthetic-attributes", cache_dir=tmp_path, num_train=76, num_test=96,
                       image_size=24)  # from the cache, identical
    assert torch.equal(again.test[3]["image"], data.test[3]["image"])
    assert len(list(tmp_path.iterdir())) == 1  # one complete folder, no temporary leftovers


def _save_png(path: Path, rgb) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), rgb, np.uint8)).save(path)


def _cub_tree(root: Path) -> Path:
    """4 classes x 3 images (two train, one test), attributes 4 x 3 in percent."""
    folders = ["001.Alpha_Bird", "002.Beta_Bird", "003.Gamma_Bird", "004.Delta_Bird"]
    lines = {k: [] for k in ("images", "labels", "split", "boxes")}
    for c, folder in enumerate(folders, 1):
        for i in range(3):
            image_id = 3 * (c - 1) + i + 1
            _save_png(root / "images" / folder / f"b{i}.jpg", (40 * c, 80, 120))
            lines["images"].append(f"{image_id} {folder}/b{i}.jpg")
            lines["labels"].append(f"{image_id} {c}")
            lines["split"].append(f"{image_id} {int(i < 2)}")
            lines["boxes"].append(f"{image_id} 1 1 8 6")
    for name, key in (("images", "images"), ("image_class_labels", "labels"),
                      ("train_test_split", "split"), ("bounding_boxes", "boxes")):
        (root / f"{name}.txt").write_text("\n".join(lines[key]) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i} {f}" for i, f in enumerate(folders, 1)))
    (root / "attributes").mkdir()
    table = np.array([[100, 0, 50], [0, 100, 25], [80, 20, 0], [10, 90, 60]], np.float32)
    np.savetxt(root / "attributes" / "class_attribute_labels_continuous.txt", table, fmt="%.3f")
    (root / "attributes.txt").write_text("1 has_bill::hooked\n2 has_wing::blue\n3 has_size::small")
    return root


def test_cub_zero_shot_split_from_a_file_of_class_names(tmp_path):
    root = _cub_tree(tmp_path / "CUB_200_2011")
    (root / "testclasses.txt").write_text("002.Beta_Bird\nDelta_Bird\n")  # folder or bare names
    data = build_data("cub-zsl", data_dir=root, image_size=8, val_fraction=0.5)
    split = data.zero_shot
    assert data.class_names == ["Alpha_Bird", "Gamma_Bird"] == split.seen_classes
    assert split.unseen_classes == ["Beta_Bird", "Delta_Bird"]
    assert split.attribute_names == ["has_bill::hooked", "has_wing::blue", "has_size::small"]
    np.testing.assert_allclose(split.class_attributes, [[1, 0, .5], [.8, .2, 0], [0, 1, .25],
                                                        [.1, .9, .6]])
    assert sorted(data.train.labels + data.val.labels) == [0, 0, 1, 1]
    assert data.test.labels == [0, 1]
    assert split.unseen_test.labels == [2, 3]
    assert "Delta_Bird" in split.unseen_test[1]["path"]
    (root / "testclasses.txt").write_text("Epsilon_Bird\n")
    with pytest.raises(DataError, match="names class 'Epsilon_Bird', which is not in classes"):
        build_data("cub-zsl", data_dir=root, image_size=8)
    (root / "testclasses.txt").unlink()
    with pytest.raises(DataError, match="needs the unseen classes"):
        build_data("cub-zsl", data_dir=root, image_size=8)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def zero_shot_run(tmp_path_factory):
    """A seen classifier trained briefly on 16 px synthetic-attributes (38 seen classes), then
    NIWT fitted on it through ``build_model`` as train.py does: (data, model, fit log)."""
    from protozoo.engine import DistInfo, Trainer

    root = tmp_path_factory.mktemp("niwt")
    data = build_data("synthetic-attributes", cache_dir=root / "cache", num_train=1520,
                      num_test=480, image_size=16)
    torch.manual_seed(0)
    base = protozoo.create_model("cam", backbone="tiny_cnn", stage=1, extra_conv=32,
                                 class_names=data.class_names)
    Trainer(TrainConfig(model="cam", epochs=4, lr=3e-3), base, data, None, DistInfo()).fit()
    protozoo.save(base, root / "seen", image_size=16)
    cfg = TrainConfig(model="niwt", dataset="synthetic-attributes", model_args={
        "base": str(root / "seen"), "num_images": 32, "map_steps": 150,
        "lambda_grid": [0.1, 1.0]})
    model = build_model(cfg, data)
    log = model.fit(data, "cpu", batch_size=64, seed=0)
    return data, model, log, root


def test_end_to_end_zero_shot_beats_chance(zero_shot_run):
    data, model, log, root = zero_shot_run
    assert log["degenerate_layer"] == 0 and log["unseen_cosine"] > 0.8
    assert model.class_names == data.zero_shot.class_names  # seen, then unseen
    from protozoo.evaluation import evaluate_run

    metrics = evaluate_run(root / "zs", model=model, data=data,
                           overrides={"dataset": "synthetic-attributes"})
    chance = 1 / 10  # ten unseen classes
    assert metrics["zsl_unseen"] >= 2.5 * chance, metrics
    assert metrics["gzsl_seen"] > 3 / 38  # seen images, now classified over all 48 classes
    for method in ("direct_regression", "dap"):  # the baselines are scored in the same run
        assert 0 <= metrics[f"{method}/gzsl_h"] <= 1 and f"{method}/zsl_unseen" in metrics
    written = json.loads((root / "zs" / "metrics.json").read_text())
    assert written["zsl_unseen"] == metrics["zsl_unseen"]
    page = (root / "zs" / "report" / "index.html").read_text()
    assert "direct regression" in page and "neuron" in page


def test_explanations_name_attributes_the_class_has(zero_shot_run):
    data, model, _, _ = zero_shot_run
    split = data.zero_shot
    images = torch.stack([split.unseen_test[i]["image"] for i in range(40)])
    expl = model.explain(images, top_k=3)
    assert expl.maps.shape[:2] == (40, 3) and (expl.maps >= 0).all()
    assert (expl.importances[:, :-1] >= expl.importances[:, 1:]).all()  # most important first
    signatures = zs.binarize_attributes(split.class_attributes)
    named = [(int(k), n[0][0]) for k, row in zip(expl.classes, expl.names) for n in row if n]
    hits = np.mean([signatures[k, split.attribute_names.index(a)] for k, a in named])
    chance = signatures.mean()  # 3 of 11 attributes
    assert len(named) >= 100 and hits > chance + 0.25, (hits, chance)


def test_fitted_head_saves_and_loads(zero_shot_run, tmp_path):
    data, model, _, _ = zero_shot_run
    protozoo.save(model, tmp_path / "zs", image_size=16)
    assert sorted(p.name for p in (tmp_path / "zs").iterdir()) == ["config.json",
                                                                   "model.safetensors"]
    loaded = protozoo.load(tmp_path / "zs")
    assert loaded.class_names == model.class_names and loaded.num_seen == model.num_seen
    x = torch.stack([data.test[i]["image"] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert loaded.neuron_names() == model.neuron_names()
    assert bool(loaded.fitted) and loaded.hp == model.hp
    torch.testing.assert_close(loaded.explain(x).maps, model.explain(x).maps)
    model.train()  # explanations are computed at inference, whatever the model's mode
    try:
        torch.testing.assert_close(model.explain(x).maps, loaded.explain(x).maps)
        assert model.training
    finally:
        model.eval()


def test_report_escapes_data_strings(zero_shot_run, tmp_path):
    from protozoo.render.niwt_report import write_niwt_report

    data, model, _, _ = zero_shot_run
    saved = list(model.class_names), list(model.attribute_names)
    try:
        model.class_names[-1] = "<script>alert(1)</script>"
        model.attribute_names[0] = "shape:<b>circle</b>"
        page = write_niwt_report(model, data, tmp_path, {"zsl_unseen": 0.5}, count=3).read_text()
    finally:
        model.class_names, model.attribute_names = saved
    assert "<script>" not in page and "<b>circle" not in page
    assert "&lt;script&gt;" in page and "&lt;b&gt;circle" in page


def test_train_py_niwt_bad_input_is_one_line(zero_shot_run, tmp_path, monkeypatch, capsys):
    import train
    from protozoo.errors import run_cli

    _, _, _, root = zero_shot_run
    monkeypatch.chdir(tmp_path)
    data = ["--dataset", "synthetic-attributes", "--cache-dir", str(root / "cache"),
            "--image-size", "16", "--num-train", "1520", "--num-test", "480", "--out", "zs"]
    cases = [
        (["--model", "niwt"] + data, "pass --base RUN_DIR"),
        (["--model", "niwt", "--base", "nowhere"] + data, "--base 'nowhere' is not a trained run"),
        (["--model", "cam", "--base", str(root / "seen")] + data, "is for --model niwt"),
        (["--model", "niwt", "--base", str(root / "seen"), "--model-arg", "layer=head"] + data,
         "unknown layer 'head'"),
        (["--model", "niwt", "--base", str(root / "seen"), "--model-arg", "unseen_bias=big"] + data,
         "unseen_bias='big' is not one of"),
    ]
    for argv, message in cases:
        assert run_cli(train.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # nothing written
