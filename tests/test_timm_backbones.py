"""timm backbones as advertised: a ResNet, a ConvNeXt, an EfficientNet, a ViT and a Swin each serve
``cam`` and ``protopnet`` at a small non-224 image size with random weights -- forward pass, push
with provenance (a global receptive field says so), the report and ``torch.export`` of
``logits_view()``. Single-backbone checks (token maps, channels-last, fixed-size models, the
errors of models that cannot serve) are in test_backbones.py."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import protozoo
from protozoo.models.protopnet.push import apply_push, compute_push

# (timm name, image size, global receptive field?): timm's tiny test models.
MODELS = [
    ("test_resnet", 64, False),
    ("test_convnext", 64, False),
    ("test_efficientnet", 64, True),  # squeeze-and-excitation pools the whole image
    ("test_vit", 48, True),  # global attention; 48 px is neither 224 nor the model's 160
    ("swin_tiny_patch4_window7_224", 64, False),  # channels-last (NHWC) features, local windows
]
# timm has no test Swin, and swin_tiny's 28M parameters take ~10 s of CPU to measure (receptive
# field) and export; these tests build timm's swin_tiny with this narrower, shallower config
# (still two blocks a stage: windows and shifted windows). test_backbones.py checks the real one.
TINY_SWIN = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
NUM_CLASSES = 2
N_IMAGES = 4


@pytest.fixture(autouse=True)
def tiny_swin(monkeypatch):
    import timm

    from protozoo import backbones

    real = timm.create_model

    def create(name, *args, **kwargs):
        if name == "swin_tiny_patch4_window7_224":
            kwargs = {**TINY_SWIN, **kwargs}
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    # receptive fields are cached by backbone name: keep the tiny Swin's out of the real cache
    monkeypatch.setattr(backbones, "_GEOMETRY_CACHE", {})


class TinySet(torch.utils.data.Dataset):
    """A few random images as the samples protozoo's datasets yield (``image``, ``label``,
    ``path``), with the ``labels``/``paths``/``raw_image`` the push and reports read."""

    def __init__(self, size: int):
        generator = torch.Generator().manual_seed(0)
        self.raw = torch.randint(0, 256, (N_IMAGES, size, size, 3), generator=generator,
                                 dtype=torch.uint8)
        self.images = (self.raw.permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.25
        self.labels = [i % NUM_CLASSES for i in range(N_IMAGES)]
        self.paths = [f"image_{i}.png" for i in range(N_IMAGES)]

    def __len__(self):
        return N_IMAGES

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "path": self.paths[i]}

    def raw_image(self, i) -> np.ndarray:
        return self.raw[i].numpy()


def _export(model, x):
    view = model.logits_view().eval()
    exported = torch.export.export(view, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), view(x))


@pytest.mark.parametrize("name, size, global_field", MODELS, ids=[m[0] for m in MODELS])
def test_protopnet_on_timm_backbone(tmp_path, name, size, global_field):
    from protozoo.render.evidence import evidence_report

    torch.manual_seed(0)
    model = protozoo.create_model("protopnet", backbone=name, num_classes=NUM_CLASSES,
                                  prototypes_per_class=2, prototype_dim=16).eval()
    data = TinySet(size)
    with torch.no_grad():
        out = model(data.images[:2])
    h, w = out.similarity_maps.shape[-2:]
    assert out.logits.shape == (2, NUM_CLASSES)
    assert h == w == -(-size // model.stride)  # ceil: one cell per stride, edges padded

    geometry = model.backbone.geometry
    assert geometry.global_field is global_field
    result = compute_push(model, data, batch_size=N_IMAGES)
    apply_push(model, result)
    for record in model.metadata["prototypes"]:
        r, c = record["cell"]
        assert record["receptive_field_box"] == list(geometry.cell_box(r, c, size, size))
        if global_field:  # every cell sees the whole image: its box says so
            assert record["receptive_field_box"] == [0, 0, size, size]
        assert data.labels[record["image_index"]] == record["class"]
    page = evidence_report(model, data.images[0], tmp_path / "report", image_size=size)
    assert page.is_file() and "prototype" in page.read_text()

    _export(model, data.images[:1])


@pytest.mark.parametrize("name, size, global_field", MODELS, ids=[m[0] for m in MODELS])
def test_cam_on_timm_backbone(tmp_path, name, size, global_field):
    from protozoo.render.cam_report import write_cam_report

    torch.manual_seed(0)
    model = protozoo.create_model("cam", backbone=name, num_classes=NUM_CLASSES).eval()
    data = TinySet(size)
    with torch.no_grad():
        out = model(data.images[:2])
    assert out.cams.shape[:2] == (2, NUM_CLASSES)
    torch.testing.assert_close(out.cams.mean(dim=(2, 3)) + model.fc.bias, out.logits)
    bundle = SimpleNamespace(test=data, image_size=size)
    page = write_cam_report(model, bundle, tmp_path / "report", {}, count=N_IMAGES)
    assert page.is_file() and (tmp_path / "report" / "cams.png").is_file()

    _export(model, data.images[:1])
