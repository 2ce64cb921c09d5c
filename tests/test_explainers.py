"""The explainers and the measurements they are judged by, on small untrained models: shapes,
the known identities (CAM = Grad-CAM at the backbone up to a positive scale, Integrated
Gradients' completeness), determinism, one-line errors, deletion/insertion's x-axis and
endpoints, SSIM against scikit-image, and the layer order of cascading randomisation."""
from __future__ import annotations

import pytest
import torch

import protozoo
from protozoo.errors import UserError
from protozoo.explain import explain, list_explainers
from protozoo.explain.explainers import create_explainer
from protozoo.explain.faithfulness import (baseline_images, deletion_insertion, pixel_order,
                                           remove_top)
from protozoo.explain.sanity import layer_order, randomize_layer, rank_correlation, ssim
from protozoo.maps import upsample

S = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _cam(seed=0, extra_conv=0):
    torch.manual_seed(seed)
    return protozoo.create_model("cam", backbone="tiny_cnn", num_classes=3,
                                 extra_conv=extra_conv).eval()


def _images(n=2, seed=0):
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list_explainers())
def test_every_explainer_gives_one_finite_map_per_image(name):
    if create_explainer(name).needs_captum:
        pytest.importorskip("captum")
    model = _cam()
    params = {"samples": 2} if name == "smoothgrad" else {"steps": 4} if name == \
        "integrated_gradients" else {"window": 8, "stride": 8} if name == "occlusion" else {}
    maps = explain(model, _images(), name, **params)
    assert maps.shape == (2, S, S) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert not model.training


def test_intrinsic_maps_are_the_families_own_upsampled():
    model = _cam()
    x = _images()
    out = model(x)
    target = torch.tensor([2, 0])
    expected = upsample(out.cams[torch.arange(2), target][:, None], (S, S))[:, 0]
    torch.testing.assert_close(explain(model, x, "intrinsic", target), expected)
    torch.manual_seed(0)
    proto = protozoo.create_model("protopnet", backbone="tiny_cnn", num_classes=3,
                                  prototypes_per_class=2).eval()
    out = proto(x)
    expected = upsample(proto.evidence_maps(out, target)[:, None], (S, S), "bicubic")[:, 0]
    torch.testing.assert_close(explain(proto, x, "intrinsic", target), expected)


def test_captum_gradcam_at_the_backbone_is_relu_cam_up_to_a_positive_scale():
    """Zhou et al.'s CAM and Selvaraju et al.'s Grad-CAM coincide when GAP + linear follow the
    layer (tests/test_cam.py shows it at feature resolution): Captum's Grad-CAM wired through
    logits_view() must agree."""
    pytest.importorskip("captum")
    model = _cam(seed=1)
    x = _images(seed=1)
    target = torch.tensor([0, 1])
    cams = model(x).cams[torch.arange(2), target].detach()
    grad = explain(model, x, "gradcam", target)
    expected = upsample(torch.relu(cams)[:, None], (S, S))[:, 0] / cams[0].numel()
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)


def test_integrated_gradients_is_complete():
    """Sundararajan et al.'s completeness: the map sums to logit(x) - logit(baseline 0)."""
    pytest.importorskip("captum")
    model = _cam()
    x = _images()
    target = torch.tensor([1, 2])
    maps = explain(model, x, "integrated_gradients", target, steps=64)
    with torch.no_grad():
        gap = model(x).logits[torch.arange(2), target] - model(torch.zeros_like(x)).logits[
            torch.arange(2), target]
    torch.testing.assert_close(maps.sum((1, 2)), gap, atol=2e-3 * float(gap.abs().max()) + 1e-4,
                               rtol=0.02)


def test_guided_backprop_differs_from_the_gradient():
    pytest.importorskip("captum")
    model = _cam()
    x = _images()
    assert not torch.allclose(explain(model, x, "gradient"), explain(model, x, "guided_backprop"))


def test_noise_is_seeded():
    pytest.importorskip("captum")
    model = _cam()
    x = _images()
    a = explain(model, x, "smoothgrad", samples=3, seed=5)
    torch.testing.assert_close(a, explain(model, x, "smoothgrad", samples=3, seed=5))
    assert not torch.equal(a, explain(model, x, "smoothgrad", samples=3, seed=6))
    torch.testing.assert_close(explain(model, x, "random", seed=1),
                               explain(_cam(seed=3), x, "random", seed=1))


def test_user_mistakes_are_one_line_errors():
    model = _cam()
    with pytest.raises(UserError, match="unknown explainer 'saliency': choose from intrinsic, "
                                        "gradient, smoothgrad"):
        explain(model, _images(), "saliency")
    with pytest.raises(UserError, match="has no parameter steps: it takes samples"):
        create_explainer("smoothgrad", steps=3)
    with pytest.raises(UserError, match="2 targets for 3 images"):
        explain(model, _images(3), "random", torch.tensor([0, 1]))
    pytest.importorskip("captum")
    with pytest.raises(UserError, match="unknown layer 'backbone.bdy'"):
        explain(model, _images(), "gradcam", layer="backbone.bdy")
    vqa = protozoo.create_model("san", num_classes=3, vocab=["<pad>", "<unk>", "what"])
    with pytest.raises(UserError, match="does not take an image alone"):
        explain(vqa, _images(), "gradient")


def test_a_family_without_an_intrinsic_map_says_so_and_all_leaves_it_out():
    from protozoo.explain.explainers import resolve_explainers
    from protozoo.models.base import ZooModel
    from protozoo.models.cam import CAMNet

    class NoMap(CAMNet):
        intrinsic_map = ZooModel.intrinsic_map

    torch.manual_seed(0)
    model = NoMap(num_classes=3).eval()
    with pytest.raises(UserError, match="has no intrinsic explanation map"):
        explain(model, _images(), "intrinsic")
    assert [e.name for e in resolve_explainers("all", model=model)] == list_explainers()[1:]
    assert [e.name for e in resolve_explainers("all", model=_cam())] == list_explainers()


def test_one_evaluation_is_deterministic_with_a_seed():
    from protozoo.explain import evaluate_explainers
    from protozoo.explain.training import TensorImages

    data = TensorImages(_images(6), [0, 1, 2, 0, 1, 2])
    runs = [evaluate_explainers(_cam(), data, ["intrinsic", "random"], batch_size=4,
                                device="cpu", steps=4, sanity_images=2, seed=seed)
            for seed in (3, 3, 4)]
    for r in runs:
        for scores in r["scores"].values():
            scores.pop("seconds")
    assert runs[0]["scores"] == runs[1]["scores"] and runs[0]["cascade"] == runs[1]["cascade"]
    assert runs[0]["scores"]["random"] != runs[2]["scores"]["random"]
    assert runs[0]["settings"]["num_images"] == 6 and "pointing" not in runs[0]["scores"]["random"]


# ----------------------------------------------------------------------------- deletion

@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_deletion_and_insertion_change_more_pixels_each_step_and_end_where_they_should(
        baseline):
    model = _cam()
    x = _images(3)
    target = torch.tensor([0, 1, 2])
    maps = torch.rand(3, S, S, generator=torch.Generator().manual_seed(0))
    maps[0] = 0.0  # a flat map: its order is the tie-break alone
    curves = deletion_insertion(model, x, maps, target, steps=8, baseline=baseline)
    pixels = curves["pixels"]
    assert pixels[0] == 0 and pixels[-1] == S * S and (pixels.diff() > 0).all()
    assert pixels.tolist() == [round(i * S * S / 8) for i in range(9)]
    with torch.no_grad():
        original = torch.softmax(model(x).logits, 1)[torch.arange(3), target]
        base = torch.softmax(model(baseline_images(x, baseline)).logits, 1)[torch.arange(3),
                                                                              target]
    for start, end, kind in ((original, base, "deletion"), (base, original, "insertion")):
        torch.testing.assert_close(curves[kind][:, 0], start)
        torch.testing.assert_close(curves[kind][:, -1], end)
    assert ((curves["deletion_auc"] >= 0) & (curves["deletion_auc"] <= 1)).all()


def test_pixel_order_follows_the_map_and_breaks_ties_at_random():
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.3]]])
    assert pixel_order(maps).tolist() == [[3, 0, 1, 2]]
    flat = pixel_order(torch.zeros(1, 8, 8))[0]
    assert sorted(flat.tolist()) == list(range(64)) and flat.tolist() != list(range(64))
    torch.testing.assert_close(flat, pixel_order(torch.zeros(1, 8, 8))[0])  # seeded


def test_remove_top_sets_the_highest_fraction_to_the_fill():
    x = torch.zeros(1, 3, 4, 4)
    maps = torch.arange(16.0).view(1, 4, 4)
    out = remove_top(x, maps, 0.25, torch.tensor([1.0, 2.0, 3.0]))
    assert (out[0, :, 3] == torch.tensor([1.0, 2.0, 3.0])[:, None]).all()  # the top row of 4
    assert out[0, :, :3].abs().sum() == 0


# ----------------------------------------------------------------------------- sanity

def test_ssim_matches_scikit_image_and_rank_correlation_handles_constant_maps():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 20, 24, generator=g), torch.rand(2, 20, 24, generator=g)
    b[1] = 0.5 * a[1] + 0.5 * b[1]
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    assert torch.equal(rank_correlation(a, torch.zeros_like(a)), torch.zeros(2))
    torch.testing.assert_close(rank_correlation(a, 2 * a + 1), torch.ones(2, dtype=torch.float32))
    metrics = pytest.importorskip("skimage.metrics")
    expected = [metrics.structural_similarity(a[i].double().numpy(), b[i].double().numpy(),
                                              data_range=1.0) for i in range(2)]
    torch.testing.assert_close(ssim(a, b), torch.tensor(expected, dtype=torch.float32))


def test_cascade_layers_follow_backpropagation_from_the_logits():
    model = _cam()
    assert layer_order(model, _images()) == [
        "fc", *[f"backbone.body.stages.{s}.{m}" for s in (3, 2, 1, 0) for m in (1, 0)]]
    assert all(p.grad is None for p in model.parameters())
    torch.manual_seed(0)
    proto = protozoo.create_model("protopnet", backbone="tiny_cnn", num_classes=2,
                                  prototypes_per_class=1)
    assert layer_order(proto, _images())[:4] == ["last_layer", "", "add_on.2", "add_on.0"]


def test_a_norm_layer_is_randomised_with_the_layer_it_normalises():
    from protozoo.explain.sanity import cascade_steps

    model = _cam()
    steps = cascade_steps(model, layer_order(model, _images()))
    assert steps == [["fc"]] + [[f"backbone.body.stages.{s}.1", f"backbone.body.stages.{s}.0"]
                                for s in (3, 2, 1, 0)]


def test_randomize_layer_changes_that_layer_only():
    model = _cam()
    bn = model.backbone.body.stages[3][1]
    with torch.no_grad():
        bn.running_var.fill_(2.0)
        bn.weight.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    randomize_layer(model, "backbone.body.stages.3.0", seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"backbone.body.stages.3.0.weight"}
    randomize_layer(model, "backbone.body.stages.3.1", seed=0)  # a norm layer: its init
    assert bool((bn.running_var == 1).all()) and bool((bn.weight == 1).all())


@pytest.mark.parametrize("family", ["san", "han"])
def test_the_vqa_families_intrinsic_maps_are_where_they_looked(family):
    torch.manual_seed(0)
    model = protozoo.create_model(family, num_classes=3,
                                  vocab=["<pad>", "<unk>", "what", "colour"]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 75, 75), torch.tensor([[2, 3], [3, 2]]),
                    torch.tensor([2, 2]))
    maps = model.intrinsic_map(out, torch.tensor([0, 1]))
    expected = out.attention[:, -1] if family == "san" else out.kept.float()
    assert torch.equal(maps, expected) and maps.shape == out.attention.shape[:1] + \
        out.attention.shape[2:]
