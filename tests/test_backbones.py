"""Backbones: self-description (channels, stride, measured receptive field), input checks,
pretrained weights from files and the offline error."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import protozoo
from protozoo.backbones import Backbone, Geometry, create_backbone, measure_geometry
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


def test_tiny_cnn_rf10_receptive_field_by_hand():
    # conv3 -> pool2 -> conv3 -> pool2 -> conv1 -> conv1: RF 3 -> 4 -> 8 -> 10 -> 10 -> 10;
    # offset -1 -> -1 -> -3 -> -3 -> -3 -> -3; stride 4.
    assert create_backbone("tiny_cnn_rf10").geometry == Geometry(stride=4, receptive_field=10,
                                                                rf_offset=-3)


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


# ----------------------------------------------------------------------------- timm families

@pytest.mark.parametrize("name, size", [("test_vit", 48), ("vit_tiny_patch16_224", 32),
                                        ("deit_tiny_distilled_patch16_224", 48)])
def test_vit_at_any_size_gives_its_patch_tokens_as_a_map(name, size):
    """ViTs take any image size (timm's dynamic_img_size), and the map is the last block's patch
    tokens on their grid: the class (and distillation) tokens are dropped."""
    bb = create_backbone(name).eval()
    vit = bb.body.model
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fmap, tokens = bb(x), vit.forward_features(x)  # its final norm is pruned: the same block
    side = size // 16
    assert fmap.shape == (2, bb.channels, side, side) and bb.stride == 16
    assert tokens.shape[1] == vit.num_prefix_tokens + side * side
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens[:, vit.num_prefix_tokens:])
    with torch.no_grad():  # a size that is no multiple of the patch is padded, not refused
        assert bb(torch.randn(1, 3, size + 3, size + 3)).shape[-1] == side + 1


def test_channels_last_features_are_permuted():
    bb = create_backbone("test_mambaout").eval()  # timm declares its features NHWC
    assert str(bb.body.output_fmt.value) == "NHWC"
    raw = bb.body(torch.randn(1, 3, 64, 64))[-1]
    assert raw.shape == (1, 2, 2, bb.channels)
    torch.testing.assert_close(bb(torch.randn(1, 3, 64, 64)).shape, (1, bb.channels, 2, 2))


def test_global_field_is_detected_and_boxes_are_the_whole_image():
    class Excite(nn.Module):  # squeeze-and-excitation: every cell is gated by the global mean
        def forward(self, x):
            return x * x.mean(dim=(2, 3), keepdim=True)

    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), Excite())
    geometry = measure_geometry(body)
    assert geometry.global_field and geometry.stride == 2
    assert geometry.cell_box(0, 0, 40, 30) == (0, 0, 30, 40)
    assert "whole image" in geometry.describe()
    local = create_backbone("tiny_cnn").geometry
    assert not local.global_field and local.describe() == "receptive field 38 px"
    vit = create_backbone("test_vit").geometry
    assert vit.global_field and vit.stride == 16


class _ResidualConvNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1)

    def forward(self, x):
        return x + self.norm(self.conv(x))


class _Attend(nn.Module):
    """Softmax attention of every cell over all cells (one channel, no projections)."""

    def forward(self, x):
        tokens = x.flatten(2)  # [B, 1, N]
        weights = torch.softmax(tokens.transpose(1, 2) @ tokens, dim=-1)  # [B, N, N]
        return (tokens @ weights.transpose(1, 2)).view_as(x)


def test_large_field_is_measured_on_a_strip_to_its_edge():
    """A field wider than the first probe (96 px) is measured on a wide strip; its edge, where
    the gradient is a product of 60 small weights (~1e-57, below float32's range), counts."""
    body = nn.Sequential(*[_ResidualConvNorm() for _ in range(60)])
    # 60 3x3 convs: 1 + 2 * 60 = 121 px, offset -60
    assert measure_geometry(body, in_chans=1) == Geometry(1, 121, -60)


def test_deep_batch_norm_net_does_not_saturate_attention_in_the_probe():
    """30 residual blocks double the positive probe's activations 30 times unless its batch
    norms are calibrated; an attention softmax over such values is one-hot and hides the global
    field."""
    body = nn.Sequential(*[_ResidualConvNorm() for _ in range(30)], _Attend())
    assert measure_geometry(body, in_chans=1, start_size=32, max_size=128).global_field


def test_model_for_one_input_size_says_so_in_one_line():
    bb = create_backbone("test_vit_relpos")  # no dynamic_img_size: timm builds it for 160 px
    assert bb.fixed_size == (160, 160)
    with pytest.raises(UserError) as info:
        bb.check_input(torch.zeros(1, 3, 64, 64))
    message = str(info.value)
    assert "takes only 160x160 px images" in message and "--image-size 160" in message
    assert "\n" not in message
    assert bb.geometry.global_field  # measured at the one size it takes


def test_backbone_failing_on_an_image_size_is_a_one_line_user_error():
    class Picky(nn.Module):
        out_channels, reduction = 3, 1

        def forward(self, x):
            assert x.shape[-1] % 7 == 0, f"width {x.shape[-1]} is no multiple of 7"
            if x.shape[-1] > 14:
                raise RuntimeError("Expected all tensors to be on the same device")
            return x

    bb = Backbone(Picky(), "picky")
    bb(torch.zeros(1, 3, 14, 14))
    with pytest.raises(UserError) as info:
        bb(torch.zeros(1, 3, 16, 16))
    message = str(info.value)
    assert "'picky' fails on 16x16 px images (AssertionError: width 16 is no multiple of 7)" \
        in message and "\n" not in message
    with pytest.raises(RuntimeError, match="same device"):  # not a size problem: as it is
        bb(torch.zeros(1, 3, 21, 21))


def test_timm_model_without_spatial_features_is_a_one_line_user_error(monkeypatch):
    import timm

    real = timm.create_model

    def no_features(name, *args, **kwargs):
        if name == "resnet18":
            raise RuntimeError("features_only not implemented for resnet18\nsecond line")
        body = real("test_resnet", *args, **kwargs)
        body.output_fmt = "NLC"  # a token sequence, no grid
        return body

    monkeypatch.setattr(timm, "create_model", no_features)
    for name, text in [("resnet18", "timm cannot build it as a feature extractor "
                                    "(features_only: RuntimeError: features_only not implemented"),
                       ("test_resnet", "its features are token sequences (NLC)")]:
        with pytest.raises(UserError) as info:
            create_backbone(name)
        message = str(info.value)
        assert f"timm model '{name}' cannot serve as a backbone" in message and text in message
        assert "use a CNN" in message and "\n" not in message


def test_swin_channels_last_features_serve_a_model():
    """timm's Swin gives channels-last (NHWC) maps; they reach the head as [B, C, h, w] (this
    was a channel-mismatch error) at a size that is not 224."""
    model = protozoo.create_model("cam", backbone="swin_tiny_patch4_window7_224", num_classes=3)
    assert str(model.backbone.body.output_fmt.value) == "NHWC"
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.cams.shape == (1, 3, 2, 2) and model.backbone.channels == 768


def test_vit_pretrained_file_loads_and_takes_any_size(tmp_path):
    import timm

    full = timm.create_model("test_vit", pretrained=False)
    path = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    bb = create_backbone("test_vit", pretrained=str(path)).eval()
    assert torch.equal(bb.body.model.blocks[-1].mlp.fc2.weight, full.blocks[-1].mlp.fc2.weight)
    with torch.no_grad():  # trained at 160 px, used at 48
        assert bb(torch.randn(1, 3, 48, 48)).shape == (1, 64, 3, 3)
