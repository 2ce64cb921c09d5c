"""Adding a family is one class and a registration: a toy GAP classifier defined here trains,
saves, loads, evaluates and writes its report through the command-line scripts, with no other
file knowing its name."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import protozoo
from protozoo.models import ZooModel
from protozoo.outputs import CAMOutput
from protozoo.registry import MODELS

NAME = "toy_gap_for_tests"


class ToyGAP(ZooModel):
    """Global average pooling + linear on a backbone; its class maps make it a CAM network."""

    report_writer = "protozoo.render.cam_report:write_cam_report"  # draws any CAMOutput

    def __init__(self, backbone: str = "tiny_cnn", num_classes: int | None = None,
                 pretrained=False, stage: int = -1, class_names: list[str] | None = None):
        super().__init__()
        bb = self._init_backbone(backbone, pretrained, stage, num_classes, class_names)
        self.fc = nn.Linear(bb.channels, self.num_classes)

    def forward(self, x: torch.Tensor) -> CAMOutput:
        features = self.backbone(x)
        cams = torch.einsum("kc,bchw->bkhw", self.fc.weight, features)
        return CAMOutput(logits=self.fc(features.mean((2, 3))), stride=self.stride,
                         features=features, cams=cams)


@pytest.fixture
def toy_family():
    MODELS.register(NAME)(ToyGAP)
    try:
        yield NAME
    finally:
        MODELS.unregister(NAME)


def test_a_new_family_runs_through_the_scripts(toy_family, tmp_path, monkeypatch):
    import evaluate
    import train

    monkeypatch.chdir(tmp_path)
    assert train.main(["--model", toy_family, "--dataset", "digits", "--num-train", "100",
                       "--epochs", "1", "--out", "run"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["model"] == toy_family
    assert evaluate.main([str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and metrics["num_test_images"] > 0
    page = (run / "report" / "index.html").read_text()
    assert f"CAM report — {toy_family}" in page and (run / "report" / "cams.png").is_file()
    model = protozoo.load(run)
    assert type(model) is ToyGAP and model.model_name == toy_family
    side = 32 // model.stride
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).cams.shape == (2, 10, side, side)


def test_unregistering_leaves_the_registry_as_it_was(toy_family):
    assert toy_family in protozoo.list_models()
    MODELS.unregister(toy_family)
    try:
        assert toy_family not in protozoo.list_models()
        with pytest.raises(protozoo.UserError, match=f"unknown model '{toy_family}'"):
            MODELS.unregister(toy_family)
    finally:
        MODELS.register(toy_family)(ToyGAP)  # the fixture unregisters it again
