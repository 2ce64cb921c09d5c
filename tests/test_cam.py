"""CAM network (Zhou et al. 2016) and the map utilities/metrics its explanations are scored with."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import protozoo
from protozoo.maps import box_iou, percentile_box, threshold_box
from protozoo.metrics import cam_metrics, localization_hits, mask_iou, pointing
from protozoo.outputs import CAMOutput


def _model(extra_conv=0, num_classes=4, seed=0):
    torch.manual_seed(seed)
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=num_classes,
                                  extra_conv=extra_conv)
    with torch.no_grad():  # non-trivial bias and BN statistics so nothing is accidentally zero
        model.fc.bias.uniform_(-1, 1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


# ----------------------------------------------------------------------------- (a) CAM vs logits

@pytest.mark.parametrize("extra_conv", [0, 16])
def test_cam_spatial_mean_plus_bias_is_the_logit(extra_conv):
    model = _model(extra_conv)
    x = torch.randn(3, 3, 48, 64)  # non-square: 6 x 8 cells
    with torch.no_grad():
        out = model(x)
    assert out.cams.shape == (3, 4, 6, 8)
    reconstructed = out.cams.mean(dim=(2, 3)) + model.fc.bias
    torch.testing.assert_close(reconstructed, out.logits, atol=1e-5, rtol=0)
    # and CAM_k = sum_c W_kc f_c, written out by hand for one cell
    w, f = model.fc.weight, out.features
    torch.testing.assert_close(out.cams[1, 2, 3, 5], (w[2] * f[1, :, 3, 5]).sum(), atol=1e-5,
                               rtol=0)


# ----------------------------------------------------------------------------- (b) CAM vs Grad-CAM

@pytest.mark.parametrize("extra_conv", [0, 16])
def test_cam_equals_gradcam_up_to_positive_scale(extra_conv):
    model = _model(extra_conv, seed=1)
    x = torch.randn(2, 3, 48, 64)
    out = model(x)
    h, w = out.features.shape[-2:]
    assert (out.cams < 0).any() and (out.cams > 0).any()  # both signs occur: the ReLU matters
    checked = 0
    for c in range(model.num_classes):
        # d logit_c / dA for every image at once (images do not interact in eval mode)
        (grad,) = torch.autograd.grad(out.logits[:, c].sum(), out.features, retain_graph=True)
        alpha = grad.mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        gradcam = torch.relu((alpha * out.features).sum(1))  # [B, h, w]
        relu_cam = torch.relu(out.cams[:, c]).detach()
        torch.testing.assert_close(relu_cam, gradcam * (h * w), atol=1e-5, rtol=1e-5)
        positive = gradcam > 1e-3 * gradcam.max()  # away from 0/0
        ratio = relu_cam[positive] / gradcam[positive]
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(h * w)), rtol=1e-4, atol=0)
        assert ((relu_cam > 0) == (gradcam > 0)).all()  # zero in exactly the same cells
        checked += int(positive.sum())
        # alpha itself is w_ck / (h*w)
        torch.testing.assert_close(alpha[0, :, 0, 0], model.fc.weight[c] / (h * w), atol=1e-7,
                                   rtol=1e-5)
    assert checked > 20


# ----------------------------------------------------------------------------- (c) maps & metrics

def test_threshold_box_picks_the_larger_blob():
    heat = np.zeros((20, 30))
    heat[2:6, 3:7] = 1.0  # small (16 px) but with the peak
    heat[10:18, 12:26] = 0.5  # large (112 px), above 20% of the peak
    assert threshold_box(heat) == (12, 10, 26, 18)
    # at 60% of the peak only the small blob survives
    assert threshold_box(heat, fraction=0.6) == (3, 2, 7, 6)


def test_threshold_box_twenty_percent_rule():
    heat = np.zeros((10, 10))
    heat[4:6, 4:6] = 1.0
    heat[4:6, 6] = 0.2  # exactly 20%: kept (>=)
    heat[4:6, 3] = 0.19  # below 20%: dropped
    heat[3, 4:6] = 0.21  # above: kept
    assert threshold_box(heat) == (4, 3, 7, 6)
    # diagonal neighbours are not connected (4-connectivity): the corner pixel is its own blob
    heat2 = np.zeros((6, 6))
    heat2[0:2, 0:2] = 1.0
    heat2[2, 2] = 1.0
    assert threshold_box(heat2) == (0, 0, 2, 2)


def test_threshold_box_degenerate_maps_give_the_whole_image():
    assert threshold_box(np.full((5, 7), 3.0)) == (0, 0, 7, 5)
    assert threshold_box(-np.ones((5, 7)) - np.eye(5, 7)) == (0, 0, 7, 5)


def test_percentile_box():
    heat = np.arange(100, dtype=float).reshape(10, 10)
    # 95th percentile of 0..99 is 94.05: pixels 95..99 = row 9, columns 5..9
    assert percentile_box(heat, 95) == (5, 9, 10, 10)
    # 50th percentile is 49.5: rows 5..9, all columns
    assert percentile_box(heat, 50) == (0, 5, 10, 10)


def test_mask_outline_paints_the_edge_only():
    from protozoo.render.overlay import mask_outline

    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    out = mask_outline(np.zeros((5, 5, 3), np.uint8), mask, (9, 8, 7))
    painted = (out == (9, 8, 7)).all(-1)
    ring = mask.copy()
    ring[2, 2] = False  # the one pixel whose 4 neighbours are all inside
    assert (painted == ring).all() and (out[~ring] == 0).all()


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(25 / 175)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # exclusive ends: touching only
    assert box_iou((0, 0, 4, 4), (1, 1, 3, 3)) == pytest.approx(4 / 16)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_mask_iou_by_hand():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0:2, 0:2] = 1.0  # 4 px at the peak
    maps[0, 3, 3] = 0.1  # below 20% of the peak
    masks = torch.zeros(2, 4, 4)
    masks[0, 0:2, 0:4] = 1  # 8 px
    maps[1, 2:4, 2:4] = 2.0
    maps[1, 0, 0] = 0.5  # 25% of the peak: counts
    masks[1, 2:4, 2:4] = 1
    iou = mask_iou(maps, masks)
    torch.testing.assert_close(iou, torch.tensor([4 / 8, 4 / 5]))


def test_pointing_is_strict_and_shares_ties():
    maps = torch.zeros(3, 40, 50)
    maps[:, 20, 20] = 1.0  # the maximum of every map is at row 20, column 20
    masks = torch.zeros(3, 40, 50)
    masks[0, 18:23, 18:23] = 1  # contains the peak
    masks[1, 18:23, 21:26] = 1  # 1 px away: a miss (no tolerance)
    masks[2, 20, 20] = 1
    maps[2, 0, 0] = 1.0  # a second, equal peak off the part: half a hit
    torch.testing.assert_close(pointing(maps, masks), torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(pointing(maps, torch.zeros_like(masks)), torch.zeros(3))


def test_localization_hits_needs_right_class_and_iou():
    maps = torch.zeros(3, 32, 32)
    maps[:, 8:16, 4:20] = 1.0  # box (4, 8, 20, 16)
    boxes = torch.tensor([[4, 8, 20, 16], [4, 8, 20, 16], [4, 8, 20, 32.]])
    correct = torch.tensor([True, False, True])
    # third: IoU = 128 / 384 = 1/3 < 0.5
    torch.testing.assert_close(localization_hits(maps, boxes, correct), torch.tensor([1., 0., 0.]))
    torch.testing.assert_close(localization_hits(maps, boxes, torch.ones(3, dtype=torch.bool),
                                                 min_iou=0.3), torch.tensor([1., 1., 1.]))


def test_cam_metrics_use_true_class_for_maps_and_predicted_class_for_localization():
    cams = torch.zeros(2, 2, 64, 64)  # already at image size: upsampling is the identity
    cams[:, 0, 0:4, 0:4] = 1.0  # class 0 points top-left
    cams[:, 1, 40:64, 40:64] = 1.0  # class 1 points bottom-right, > 15 px from the part
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, 0, 0:4, 0:4] = 1
    boxes = torch.tensor([[40, 40, 64, 64.], [40, 40, 64, 64.]])
    labels = torch.tensor([0, 1])
    preds = torch.tensor([1, 1])  # image 0 is misclassified
    out = cam_metrics(cams, labels, preds, (64, 64), masks, boxes)
    torch.testing.assert_close(out["cam_iou"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out["pointing"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out["pointing_chance"], torch.full((2,), 16 / 64**2))
    torch.testing.assert_close(out["localization_accuracy"], torch.tensor([0.0, 1.0]))
    assert set(cam_metrics(cams, labels, preds, (64, 64))) == set()


# ----------------------------------------------------------------------------- (d) logits view

def test_logits_view_returns_a_tensor_and_supports_autograd():
    model = _model()
    view = model.logits_view()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits = view(x)
    assert type(logits) is torch.Tensor and logits.shape == (2, 4)
    torch.testing.assert_close(logits, model(x).logits)
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    assert set(dict(view.named_parameters())) == {f"model.{k}" for k, _ in
                                                   model.named_parameters()}


# ----------------------------------------------------------------------------- (e) output type

def test_output_is_a_dataclass_with_feature_resolution_maps():
    model = _model(num_classes=3)
    out = model(torch.randn(2, 3, 64, 32))
    assert isinstance(out, CAMOutput) and dataclasses.is_dataclass(out)
    assert {f.name for f in dataclasses.fields(out)} == {"logits", "stride", "features", "cams"}
    assert out.logits.shape == (2, 3)
    assert out.cams.shape == (2, 3, 8, 4)
    assert out.features.shape == (2, 128, 8, 4)
    assert out.stride == 8 == model.stride
