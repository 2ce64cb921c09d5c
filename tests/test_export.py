"""Export and interop: output dataclasses are pytree nodes, so ``torch.export`` works on the
models themselves and on their plain-logits views; ONNX export of ``logits_view()`` agrees with
onnxruntime (skipped when onnx/onnxruntime are not installed: they are no dependency); a model
built directly saves and loads; ``model.explain(x)`` returns the evidence as tensors."""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

import protozoo
from protozoo.maps import threshold_box
from protozoo.models.cam import CAMNet
from protozoo.models.protopnet import ProtoPNet
from protozoo.models.protopnet.push import high_activation_boxes
from protozoo.outputs import CAMOutput, VQAOutput

FAMILIES = ["cam", "protopnet"]


def _model(family: str, **kwargs):
    torch.manual_seed(0)
    return protozoo.create_model(family, backbone="tiny_cnn", num_classes=3, **kwargs).eval()


def test_outputs_are_pytree_nodes():
    out = VQAOutput(logits=torch.randn(2, 3), stride=8, attention=torch.rand(2, 1, 4, 4),
                    kept=torch.ones(2, 4, 4, dtype=torch.bool))
    leaves, spec = pytree.tree_flatten(out)
    assert len(leaves) == 3  # logits, attention, kept; the Nones and the stride are structure
    again = pytree.tree_unflatten(leaves, spec)
    assert isinstance(again, VQAOutput) and again.stride == 8 and again.scores is None
    assert torch.equal(again.kept, out.kept)
    doubled = pytree.tree_map(lambda t: t * 2, CAMOutput(torch.ones(1, 2), 4, torch.ones(1),
                                                         torch.ones(1)))
    assert doubled.stride == 4 and torch.equal(doubled.logits, torch.full((1, 2), 2.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_of_the_model_and_its_logits_view(family):
    model = _model(family)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(model, (x,)).module()
    out = exported(x)
    assert type(out) is type(expected) and out.stride == expected.stride
    for field in dataclasses.fields(expected):
        value = getattr(expected, field.name)
        if torch.is_tensor(value):
            torch.testing.assert_close(getattr(out, field.name), value)
    view = model.logits_view()
    logits = torch.export.export(view, (x,)).module()(x)
    torch.testing.assert_close(logits, expected.logits)


def test_logits_view_has_a_plain_signature():
    view = _model("cam").logits_view()
    assert list(inspect.signature(view.forward).parameters) == ["x"]
    san = protozoo.create_model("san", vocab=["<pad>", "<unk>", "red"], num_classes=3)
    assert list(inspect.signature(san.logits_view().forward).parameters) == ["inputs"]


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_of_the_logits_view_matches_onnxruntime(family, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _model(family)
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model.logits_view(), (x,), str(path), input_names=["image"],
                      output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).logits.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [lambda: CAMNet(num_classes=3, extra_conv=8),
                                   lambda: ProtoPNet(backbone="tiny_cnn", num_classes=3,
                                                     prototypes_per_class=2)])
def test_a_directly_built_model_saves_and_loads(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    assert model.model_name in ("cam", "protopnet")
    saved = protozoo.save(model, tmp_path / "m")
    loaded = protozoo.load(saved)
    assert type(loaded) is type(model) and loaded.config() == model.config()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_cam_explain_returns_maps_and_boxes():
    model = _model("cam")
    x = torch.randn(2, 3, 32, 48)
    model.train()
    ev = model.explain(x)
    assert model.training  # its mode is restored
    with torch.no_grad():
        out = model.eval()(x)
    torch.testing.assert_close(ev.logits, out.logits)
    assert ev.maps.shape == (2, 3, 32, 48) and ev.boxes.shape == (2, 4)
    assert ev.classes.tolist() == out.logits.argmax(1).tolist()
    for b in range(2):
        expected = threshold_box(ev.maps[b, ev.classes[b]].numpy())
        assert tuple(ev.boxes[b].tolist()) == expected
    other = model.explain(x, classes=1)
    assert other.classes.tolist() == [1, 1]
    with pytest.raises(protozoo.UserError, match=r"classes must lie in 0..2"):
        model.explain(x, classes=3)


def test_protopnet_explain_returns_the_evidence_as_tensors():
    model = _model("protopnet", prototypes_per_class=2)
    x = torch.randn(2, 3, 32, 32)
    ev = model.explain(x)
    with torch.no_grad():
        out = model(x)
    assert ev.similarity_maps.shape == (2, 6, 32, 32) and ev.boxes.shape == (2, 6, 4)
    assert ev.contributions.shape == (2, 3, 6) and ev.prototype_class.tolist() == [0, 0, 1, 1,
                                                                                   2, 2]
    torch.testing.assert_close(ev.contributions.sum(-1), out.logits)  # "this looks like that"
    torch.testing.assert_close(ev.similarities, out.similarities)
    # the boxes are push provenance's high-activation boxes
    torch.testing.assert_close(ev.boxes[1], high_activation_boxes(out.similarity_maps[1],
                                                                  (32, 32)))
    assert (ev.boxes[..., 2] > ev.boxes[..., 0]).all() and (ev.boxes <= 32).all()
    some = model.explain(x, prototypes=[4, 1])
    assert some.prototypes.tolist() == [4, 1] and some.similarity_maps.shape == (2, 2, 32, 32)
    torch.testing.assert_close(some.similarity_maps[:, 0], ev.similarity_maps[:, 4])
    with pytest.raises(protozoo.UserError, match=r"prototypes must lie in 0..5"):
        model.explain(x, prototypes=[6])
