"""Backbones: self-description (channels, stride, measured receptive field), input checks,
pretrained weights from files and the offline error."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import protozoo
from protozoo.backbones import Geometry, create_backbone, measure_geometry
from protozoo.errors import UserError


@pytest.mark.parametrize("name, channels, stride", [("tiny_cnn", 128, 8), ("tiny_cnn_s4", 128, 4),
                                                      ("small_cnn", 256, 8)])
def test_builtin_channels_and_stride(name, channels, stride):
    bb = create_backbone(name)
    assert (bb.channels, bb.stride) == (channels, stride)
    feats = bb.eval()(torch.randn(2, 3, 64, 48))
    assert feats.shape == (2, channels, 64 // stride, 48 // stride)


def test_timm_resnet18_channels_and_stride():
    bb = create_backbone("resnet18", pretrained=False)
    assert (bb.channels, bb.stride) == (512, 32)
    assert bb.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 512, 2, 3)
    assert len(bb.mean) == 3 and len(bb.std) == 3


def test_tiny_cnn_receptive_field_by_hand():
    # conv3 -> pool2 -> conv3 -> pool2 -> conv3 -> pool2 -> conv3 (all convs padding 1):
    # RF 3 -> 4 -> 4+2*2=8 -> 10 -> 10+2*4=18 -> 22 -> 22+2*8=38;
    # offset -1 -> -1 -> -1-2=-3 -> -3 -> -3-4=-7 -> -7 -> -7-8=-15; stride 8.
    bb = create_backbone("tiny_cnn")
    assert bb.geometry == Geometry(stride=8, receptive_field=38, rf_offset=-15)
    assert bb.receptive_field == 38
    # cell (0, 0) sees [-15, 23) clipped to the image; cell (2, 3) sees rows [1, 39), cols [9, 47)
    assert bb.geometry.cell_box(0, 0, 64, 64) == (0, 0, 23, 23)
    assert bb.geometry.cell_box(2, 3, 64, 64) == (9, 1, 47, 39)
    assert bb.geometry.cell_box(7, 7, 64, 64) == (41, 41, 64, 64)


def test_tiny_cnn_s4_receptive_field_by_hand():
    # conv3 -> pool2 -> conv3 -> pool2 -> conv3 -> conv3: RF 3 -> 4 -> 8 -> 10 -> 18 -> 26;
    # offset -1 -> -1 -> -3 -> -3 -> -7 -> -11; stride 4.
    assert create_backbone("tiny_cnn_s4").geometry == Geometry(stride=4, receptive_field=26,
                                                              rf_offset=-11)


def test_tiny_cnn_rf18_receptive_field_by_hand():
    # conv3 -> pool2 -> conv3 -> pool2 -> conv3 -> conv1: RF 3 -> 4 -> 8 -> 10 -> 18 -> 18;
    # offset -1 -> -1 -> -3 -> -3 -> -7 -> -7; stride 4.
    assert create_backbone("tiny_cnn_rf18").geometry == Geometry(stride=4, receptive_field=18,
                                                                rf_offset=-7)


def test_hand_made_sequential_receptive_field():
    # conv5 pad2: RF 5, offset -2; maxpool2: RF 6, jump 2; conv3 pad1: RF 6+2*2=10, offset -2-2=-4
    body = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1))
    assert measure_geometry(body) == Geometry(stride=2, receptive_field=10, rf_offset=-4)


def test_receptive_field_not_hidden_by_dead_relu_or_zero_weights():
    # A ReLU after a conv with all-negative weights kills every gradient of the real network;
    # the measurement must still see the full window (5 + 2 = 7, offset -3).
    conv = nn.Conv2d(3, 2, 5, padding=2)
    nn.init.constant_(conv.weight, -1.0)
    body = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    nn.init.zeros_(body[2].weight)
    assert measure_geometry(body) == Geometry(stride=1, receptive_field=7, rf_offset=-3)


def test_stage_selection_gives_smaller_stride():
    expected = {0: (32, 2), 1: (64, 4), 2: (128, 8), -1: (128, 8)}
    for stage, (channels, stride) in expected.items():
        bb = create_backbone("tiny_cnn", stage=stage)
        assert (bb.channels, bb.stride) == (channels, stride), stage
        assert bb(torch.randn(1, 3, 32, 32)).shape == (1, channels, 32 // stride, 32 // stride)
    # stage 0 is one conv + pool: RF 3 + 1 = 4, offset -1
    assert create_backbone("tiny_cnn", stage=0).geometry == Geometry(2, 4, -1)
    r1 = create_backbone("resnet18", stage=1)
    assert (r1.channels, r1.stride) == (64, 4)
    assert r1(torch.randn(1, 3, 64, 64)).shape == (1, 64, 16, 16)


def test_timm_stage_out_of_range_is_user_error():
    with pytest.raises(UserError, match=r"resnet18' has 5 feature stages"):
        create_backbone("resnet18", stage=5)


def test_check_input_errors_are_one_line_user_errors():
    bb = create_backbone("tiny_cnn")
    bb.check_input(torch.zeros(1, 3, 8, 8))  # exactly one cell: fine
    cases = [(torch.zeros(1, 1, 32, 32), "3-channel images, got 1 channels"),
             (torch.zeros(2, 3, 4, 16), "16x4 px is smaller than one feature cell"),
             (torch.zeros(3, 32, 32), "add a batch dimension"),
             (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "expected float images, got "
                                                             "torch.uint8"),
             (torch.zeros(1, 3, 32, 32, dtype=torch.float64), "convert the batch with x.float()")]
    for x, text in cases:
        with pytest.raises(UserError) as info:
            bb.check_input(x)
        assert text in str(info.value)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["cam", "protopnet"])
def test_a_model_called_on_a_wrong_batch_says_so_in_one_line(name):
    """The models run the backbone's check on every call, so the Python API gets the same
    one-line errors as train.py instead of a conv layer's traceback."""
    model = protozoo.create_model(name, backbone="tiny_cnn", num_classes=3)
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))  # a valid batch goes through
    for x, text in [(torch.zeros(1, 1, 32, 32), "3-channel images, got 1 channels"),
                    (torch.zeros(3, 32, 32), "add a batch dimension")]:
        with pytest.raises(UserError) as info:
            model(x)
        assert text in str(info.value) and "\n" not in str(info.value)


def test_pretrained_true_offline_is_user_error(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, *args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Temporary failure in name resolution")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError) as info:
        create_backbone("resnet18", pretrained=True)
    message = str(info.value)
    assert "offline" in message and "model.safetensors" in message and "--pretrained" in message
    assert "\n" not in message and info.value.__cause__ is None


def test_pretrained_true_on_builtin_is_user_error():
    with pytest.raises(UserError, match="no published weights"):
        create_backbone("tiny_cnn", pretrained=True)


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet18"])
def test_pretrained_missing_path_is_user_error(tmp_path, name):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="not found"):
        create_backbone(name, pretrained=missing)


def test_pretrained_safetensors_file_loads_those_weights(tmp_path):
    torch.manual_seed(1)
    source = create_backbone("tiny_cnn")
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_(-1, 1)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.body.state_dict().items()}, str(path))

    torch.manual_seed(2)
    loaded = create_backbone("tiny_cnn", pretrained=str(path))
    for key, value in source.body.state_dict().items():
        assert torch.equal(loaded.body.state_dict()[key], value), key
    # and through the model factory
    model = protozoo.create_model("cam", backbone="tiny_cnn", num_classes=2, pretrained=str(path))
    assert torch.equal(model.backbone.body.stages[0][0].weight, source.body.stages[0][0].weight)


def test_pretrained_file_of_wrong_architecture_is_user_error(tmp_path):
    path = tmp_path / "small.safetensors"
    state = create_backbone("small_cnn").body.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError) as info:
        create_backbone("tiny_cnn", pretrained=str(path))
    message = str(info.value)
    assert "small.safetensors" in message and "unexpected" in message and "\n" not in message


def test_timm_pretrained_file_loads_those_weights(tmp_path):
    import timm

    torch.manual_seed(3)
    full = timm.create_model("resnet18", pretrained=False)  # a full classifier state dict
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    bb = create_backbone("resnet18", pretrained=str(path))
    assert torch.equal(bb.body.conv1.weight, full.conv1.weight)
    assert torch.equal(bb.body.layer4[1].conv2.weight, full.layer4[1].conv2.weight)


def test_builtin_stage_out_of_range_is_user_error():
    assert create_backbone("tiny_cnn", stage=-4).stride == create_backbone("tiny_cnn", stage=0).stride
    for stage in (4, -5):
        with pytest.raises(UserError, match=f"stage {stage} does not exist; choose --stage in "
                                            r"\[-4, 3\]"):
            create_backbone("tiny_cnn", stage=stage)


def test_pretrained_file_that_is_not_weights_is_user_error(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n not weights")
    with pytest.raises(UserError, match="is not a readable .safetensors file or .pth state dict"):
        create_backbone("tiny_cnn", pretrained=str(tmp_path / "photo.png"))
    protozoo.save(protozoo.create_model("cam", backbone="tiny_cnn", num_classes=2), tmp_path / "r")
    with pytest.raises(UserError, match="is a whole protozoo checkpoint, not backbone weights"):
        create_backbone("tiny_cnn", pretrained=str(tmp_path / "r" / "model.safetensors"))
    # timm's download folders also hold model.safetensors beside a config.json: those load
    from safetensors.torch import save_file

    timm_like = tmp_path / "timm"
    timm_like.mkdir()
    state = create_backbone("tiny_cnn", stage=-1).body.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(timm_like / "model.safetensors"))
    (timm_like / "config.json").write_text('{"architecture": "tiny_cnn", "num_classes": 0}')
    loaded = create_backbone("tiny_cnn", pretrained=str(timm_like / "model.safetensors"))
    assert torch.equal(loaded.body.state_dict()["stages.0.0.weight"], state["stages.0.0.weight"])
