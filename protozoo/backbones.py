"""Backbones: timm feature extractors and tiny built-in CNNs behind one registry.

Every backbone is a :class:`Backbone` that maps images ``[B, 3, H, W]`` to one feature map
``[B, C, h, w]`` and describes itself (timm's ``feature_info`` idea) so generic code never guesses:

* ``channels`` – C;
* ``stride`` – input pixels per feature cell;
* ``receptive_field`` and ``rf_offset`` – the input window one feature cell can see: cell ``(i, j)``
  sees rows ``[i*stride + rf_offset, i*stride + rf_offset + receptive_field)`` (same for columns);
* ``global_field`` – every cell sees the whole image (global attention in a ViT, the global pooling
  of squeeze-and-excitation blocks in an EfficientNet): a cell's box is then the whole image.

timm models are built with ``features_only=True``; those that take ``dynamic_img_size`` (ViT, DeiT,
Swin, EVA, ...) are built with it, so they accept any image size, and token outputs come back as
a ``[B, C, h, w]`` map without class/register tokens (timm's ``forward_intermediates``).
Channels-last feature maps (Swin's NHWC, declared in timm's ``output_fmt``) are permuted. A timm
model that yields no spatial map is a one-line :class:`UserError` when the backbone is created.

The receptive field is *measured*, not computed from per-layer arithmetic
(:mod:`protozoo.receptive_field`): the support of the gradient of one feature cell with respect to
the input is exactly the set of pixels that cell depends on. The original ProtoPNet code
hard-codes kernel/stride/padding lists per architecture, which breaks on any architecture it was
not written for; this works for all of them.
"""
from __future__ import annotations

import functools
import math
import os
import torch
from torch import nn

from .errors import UserError
from .receptive_field import Geometry, GeometryError, feature_map, measure_geometry, output_format
from .registry import Registry, unknown_name_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BUILTIN = Registry("backbone")
_GEOMETRY_CACHE: dict[tuple, Geometry] = {}


class Backbone(nn.Module):
    """A feature extractor plus its self-description (channels, stride, receptive field, norm)."""

    def __init__(self, body: nn.Module, name: str, stage: int = -1, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, in_chans: int = 3,
                 fixed_size: tuple[int, int] | None = None):
        super().__init__()
        self.body = body
        # (H, W) for a model built for one input size only (timm's fixed_input_size without
        # dynamic_img_size); None: any size
        self.fixed_size = tuple(int(v) for v in fixed_size) if fixed_size else None
        self.name = name
        self.stage = stage
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.in_chans = in_chans
        info = getattr(body, "feature_info", None)
        if info is not None and callable(getattr(info, "channels", None)):
            self.channels, self.stride = int(info.channels()[-1]), int(info.reduction()[-1])
        else:
            self.channels, self.stride = int(body.out_channels), int(body.reduction)

    @property
    def geometry(self) -> Geometry:
        """Stride and receptive field; measured on first use and cached per architecture+stage."""
        key = (self.name, self.stage, self.in_chans)
        if key not in _GEOMETRY_CACHE:
            try:
                _GEOMETRY_CACHE[key] = measure_geometry(self.body, self.in_chans,
                                                        fixed_size=self.fixed_size)
            except GeometryError as exc:
                height, width = exc.args
                raise UserError(f"cannot measure the receptive field of backbone '{self.name}': "
                                f"it fails on a {width}x{height} px probe image "
                                f"({_first_line(exc.__cause__)}); use another backbone for a "
                                "model that needs it (ProtoPNet's push)") from exc
        return _GEOMETRY_CACHE[key]

    @property
    def receptive_field(self) -> int:
        return self.geometry.receptive_field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)  # a wrong batch is a one-line UserError, not a conv traceback
        try:
            return feature_map(self.body, x)
        except (AssertionError, RuntimeError) as exc:
            # timm's own size checks (patch, window and block divisibility) are assertions; a
            # map too small for a kernel, or odd sizes that do not meet, are RuntimeErrors
            # naming a size (other RuntimeErrors -- memory, device -- pass through)
            if isinstance(exc, RuntimeError) and "size" not in str(exc).lower():
                raise
            raise UserError(self._size_error(x, exc)) from exc

    def _size_error(self, x: torch.Tensor, exc: BaseException) -> str:
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (0, 0, 0))[-1]
        hint = f"--image-size {size} (its default)" if size else "another --image-size"
        return (f"backbone '{self.name}' fails on {x.shape[-1]}x{x.shape[-2]} px images "
                f"({_first_line(exc)}); it may not take this size: try "
                f"{hint} or another backbone")

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a one-line UserError for inputs this backbone cannot take."""
        if x.ndim != 4:
            raise UserError(f"expected a batch of images [B, {self.in_chans}, H, W], got shape "
                            f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)")
        if not x.is_floating_point():
            raise UserError(f"expected float images, got {x.dtype}; convert and normalise them "
                            "first (x.float() / 255, then the model's mean/std)")
        if x.dtype == torch.float64:
            weight = next(self.body.parameters(), None)
            if weight is not None and weight.dtype != torch.float64:
                raise UserError(f"images are float64 but the model's weights are "
                                f"{weight.dtype}; convert the batch with x.float()")
        if x.shape[1] != self.in_chans:
            raise UserError(f"expected {self.in_chans}-channel images, got {x.shape[1]} channels; "
                            "convert grayscale/RGBA images to RGB first (PIL: img.convert('RGB'))")
        if self.fixed_size and tuple(x.shape[-2:]) != self.fixed_size:
            h, w = self.fixed_size
            raise UserError(
                f"backbone '{self.name}' takes only {w}x{h} px images (timm builds it for one "
                f"input size), got {x.shape[-1]}x{x.shape[-2]}; use --image-size {w} or a "
                "backbone that takes any size (a CNN, a ViT such as vit_tiny_patch16_224, a Swin)")
        if min(x.shape[-2:]) < self.stride:
            raise UserError(
                f"image of {x.shape[-1]}x{x.shape[-2]} px is smaller than one feature cell of "
                f"backbone '{self.name}' ({self.stride} px, {self.geometry.describe()}); use "
                f"images of at least {self.stride} px (e.g. --image-size 64) or a backbone with "
                "a smaller stride")





# ----------------------------------------------------------------------------- built-in backbones

def _conv_block(cin: int, cout: int, pool: bool, stride: int = 1,
                kernel: int = 3) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
              nn.BatchNorm2d(cout),
              nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class StagedCNN(nn.Module):
    """A plain VGG-style CNN built from stages; ``stage`` cuts it after that stage (features_only).

    Returns the list of stage outputs up to ``stage`` like timm's features_only models, so code
    that reads intermediate layers (NIWT) treats built-ins and timm models alike.
    """

    def __init__(self, widths: list[int], pools: list[bool], stage: int = -1,
                 conv_stride: int = 1, kernels: list[int] | None = None):
        super().__init__()
        check_stage(stage, len(widths))
        stage = stage % len(widths)
        cins = [3] + widths[:-1]
        kernels = kernels or [3] * len(widths)
        self.stages = nn.ModuleList(
            _conv_block(ci, co, p, conv_stride, k)
            for ci, co, p, k in zip(cins[: stage + 1], widths[: stage + 1], pools[: stage + 1],
                                    kernels[: stage + 1]))
        self.out_channels = widths[stage]
        self.reduction = 2 ** sum(pools[: stage + 1]) * conv_stride ** (stage + 1)

    def forward(self, x):
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


@BUILTIN.register("tiny_cnn")
def tiny_cnn(stage: int = -1) -> StagedCNN:
    """4 conv stages (32-64-128-128), stride 8: trains on a CPU in minutes at 32-64 px."""
    return StagedCNN([32, 64, 128, 128], [True, True, True, False], stage)


@BUILTIN.register("tiny_cnn_s4")
def tiny_cnn_s4(stage: int = -1) -> StagedCNN:
    """tiny_cnn with its last pooling removed: stride 4, receptive field 26 px."""
    return StagedCNN([32, 64, 128, 128], [True, True, False, False], stage)


@BUILTIN.register("tiny_cnn_rf10")
def tiny_cnn_rf10(stage: int = -1) -> StagedCNN:
    """tiny_cnn_s4 with 1x1 convolutions after the second pooling: stride 4, receptive field
    10 px. ProtoPNet's default: a cell then sees about one small part (at 64 px a petal or a
    bird's head is 9-12 px wide) and little of what surrounds it, so the cell most like a
    prototype is centred *on* the part; with a larger field the cell at the part's outer edge,
    which sees the part against a clean background, wins (measured in docs/protopnet.md)."""
    return StagedCNN([32, 64, 128, 128], [True, True, False, False], stage, kernels=[3, 3, 1, 1])


@BUILTIN.register("small_cnn")
def small_cnn(stage: int = -1) -> StagedCNN:
    """6 conv stages (32-64-64-128-128-256), stride 8, a larger receptive field than tiny_cnn."""
    return StagedCNN([32, 64, 64, 128, 128, 256], [True, False, True, False, True, False], stage)


@BUILTIN.register("rn_cnn")
def rn_cnn(stage: int = -1) -> StagedCNN:
    """Santoro et al. 2017's Sort-of-CLEVR CNN: 4 convs of 24 channels, 3x3 stride 2, BN + ReLU;
    stride 16, 75 px -> 5x5 cells (the paper's 25 "objects"), receptive field 31 px."""
    # Halving the map with the conv itself, not a max-pool, as Santoro et al.'s CNN does.
    return StagedCNN([24, 24, 24, 24], [False] * 4, stage, conv_stride=2)


class WithCellColour(nn.Module):
    """A CNN's last map beside each cell's mean input colour: ``[colour (3); P(features)]``.

    The colour is the input average-pooled to the map's grid (75 px / 5 cells: 15 px tiles), and
    ``P`` is a 1x1 conv initialised to zero, so a fresh model sees the cells' colours alone and
    the learnt features grow in as training finds them useful (the zero-initialised branch of
    Goyal et al. 2017). Why: attention and relation heads trained from scratch on Sort-of-CLEVR
    bind the question's colour to a cell quickly when the cell's colour is given, and slowly
    through a random CNN's features -- measured with SAN on the default 4000 scenes, non-
    relational test accuracy 0.61 after 15 epochs from ``rn_cnn``, 0.95 after 10 from this
    (with the VQA families' 10x lower backbone learning rate)."""

    def __init__(self, cnn: StagedCNN):
        super().__init__()
        self.cnn = cnn
        width = cnn.out_channels
        self.project = nn.Conv2d(width, width, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)
        self.out_channels = width + 3
        self.reduction = cnn.reduction

    def forward(self, x):
        outs = self.cnn(x)
        features = outs[-1]
        colour = nn.functional.adaptive_avg_pool2d(x, features.shape[-2:])
        return [*outs[:-1], torch.cat([colour, self.project(features)], dim=1)]


@BUILTIN.register("rn_cnn_rgb")
def rn_cnn_rgb(stage: int = -1) -> WithCellColour:
    """``rn_cnn`` plus every cell's mean input colour (:class:`WithCellColour`): 27 channels,
    stride 16. The VQA families' default."""
    return WithCellColour(rn_cnn(stage))


# ----------------------------------------------------------------------------- public API

@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def list_backbones(timm_models: bool = True) -> list[str]:
    """Built-in backbone names, then (optionally) every timm architecture name."""
    names = BUILTIN.names()
    return names + (list(_timm_names()) if timm_models else [])


def create_backbone(name: str, pretrained: bool | str = False, stage: int = -1) -> Backbone:
    """Create a backbone by name: a built-in (``tiny_cnn``, ``small_cnn``) or any timm model.

    Args:
        name: built-in name or timm architecture name (``resnet18``, ``convnext_tiny``, ...).
        pretrained: ``False``; ``True`` for timm's published weights (needs the network); or a path
            to a local weights file (``.safetensors`` or ``.pth``/``.bin`` state dict).
        stage: which feature stage to return; ``-1`` (default) is the last, earlier stages give
            higher-resolution maps (NIWT needs layers with non-linear layers above them).
    """
    if name in BUILTIN:
        body = BUILTIN.get(name)(stage=stage)
        if pretrained is True:
            raise UserError(f"built-in backbone '{name}' has no published weights; pass "
                            "pretrained='path/to/weights.safetensors' or pretrained=False")
        if pretrained:
            from .weights import load_state  # a one-line error naming the mismatch

            load_state(body, _read_state_dict(str(pretrained)), source=str(pretrained))
        return Backbone(body, name, stage)
    if name not in _timm_names():
        raise unknown_name_error("backbone", name, list_backbones())
    return _timm_backbone(name, pretrained, stage)


def _timm_backbone(name: str, pretrained, stage: int) -> Backbone:
    import timm

    probe, any_size = _timm_features(name)
    n_stages = len(probe.feature_info)
    check_stage(stage, n_stages, name)
    index = stage % n_stages
    if not pretrained and probe.feature_info.out_indices[-1] % n_stages == index:
        # the probe ends at that stage: the same modules and state dict as a model built for
        # that stage alone (the earlier stages it also returns are not used), so keep it
        return _wrap_timm(probe, name, stage)
    kwargs: dict = dict(features_only=True, out_indices=(index,), **any_size)
    if isinstance(pretrained, str) and pretrained:
        if not os.path.isfile(pretrained):
            raise UserError(f"pretrained weights file '{pretrained}' not found; pass the path to "
                            f"a {name} .safetensors or .pth file")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=os.path.abspath(pretrained)))
    elif pretrained:
        kwargs["pretrained"] = True
    try:
        body = timm.create_model(name, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # network errors come in many types (OSError, HF hub errors, ...)
        if kwargs.get("pretrained") and not isinstance(pretrained, str):
            raise UserError(
                f"could not download pretrained weights for '{name}' ({type(exc).__name__}); "
                f"on an offline machine, download timm's {name} model.safetensors elsewhere and "
                "pass its path: --pretrained path/to/model.safetensors") from None
        raise UserError(f"could not load weights for '{name}' from '{pretrained}': {exc}; check "
                        "that the file holds this architecture's state dict") from None
    return _wrap_timm(body, name, stage)


def _wrap_timm(body: nn.Module, name: str, stage: int) -> Backbone:
    cfg = getattr(body, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    traits = getattr(body, "_traits", None) or {}
    fixed = traits.get("img_size") if traits.get("fixed_input_size") else None
    return Backbone(body, name, stage, mean=mean, std=std, fixed_size=fixed)


# Keyword arguments that let a timm model take any image size (ViT, DeiT, EVA: both; Swin: the
# first; DeepSeek's ViT: the second); a model class that does not know one raises a TypeError
# naming it, and is built without it.
_ANY_SIZE = dict(dynamic_img_size=True, dynamic_img_pad=True)
# What to suggest when a timm model cannot serve.
_SERVING = ("a CNN (resnet18, convnext_atto, efficientnet_b0), a ViT (vit_tiny_patch16_224) or a "
            "Swin (swin_tiny_patch4_window7_224)")


def _timm_features(name: str) -> tuple[nn.Module, dict]:
    """timm's ``features_only`` model of ``name`` with random weights, built to take any image
    size where it can, and the any-size keyword arguments it took. A model that yields no
    spatial feature map is a one-line UserError."""
    import timm

    any_size = dict(_ANY_SIZE)
    while True:
        try:
            body = timm.create_model(name, features_only=True, pretrained=False, **any_size)
            break
        except TypeError as exc:
            unknown = [key for key in any_size if key in str(exc)]
            if unknown:
                del any_size[unknown[0]]  # this class does not take it: build without it
                continue
            reason = _first_line(exc)
        except Exception as exc:  # timm raises several types for "no feature extraction"
            reason = _first_line(exc)
        raise UserError(f"timm model '{name}' cannot serve as a backbone: timm cannot build it "
                        f"as a feature extractor (features_only: {reason}); use {_SERVING}")
    fmt = output_format(body)
    if fmt not in ("NCHW", "NHWC"):
        raise UserError(f"timm model '{name}' cannot serve as a backbone: its features are "
                        f"token sequences ({fmt}), not a spatial feature map; use {_SERVING}")
    return body, any_size


def _first_line(exc: BaseException) -> str:
    """``TypeName: the message's first line`` (shortened), or the type name alone."""
    text = str(exc).strip().splitlines()
    name = type(exc).__name__
    return f"{name}: {text[0][:200]}" if text else name


def check_stage(stage: int, n_stages: int, name: str = "") -> None:
    """``stage`` must name one of ``n_stages`` feature stages (negative counts from the end)."""
    if isinstance(stage, bool) or not isinstance(stage, int) or not -n_stages <= stage < n_stages:
        which = f"backbone '{name}'" if name else "this backbone"
        raise UserError(f"{which} has {n_stages} feature stages, so stage {stage!r} does not "
                        f"exist; choose --stage in [-{n_stages}, {n_stages - 1}] (-1: the last)")


def _read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights file '{path}' not found; pass an existing "
                        ".safetensors or .pth file")
    from .weights import is_checkpoint_weights

    if is_checkpoint_weights(path):
        raise UserError(f"'{path}' is a whole protozoo checkpoint, not backbone weights: load it "
                        "with protozoo.load(its folder), or pass a backbone's weights file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a weights file (an image, a truncated download, a pickle)
        raise UserError(f"pretrained weights file '{path}' is not a readable .safetensors file "
                        "or .pth state dict of tensors; pass one of those") from None


def output_size(size: int, stride: int) -> int:
    """Feature-map side for an input side of ``size`` with 'same' padding (ceil division)."""
    return math.ceil(size / stride)


__all__ = ["Backbone", "Geometry", "create_backbone", "list_backbones", "measure_geometry",
           "IMAGENET_MEAN", "IMAGENET_STD"]


def backbone_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) a backbone expects, without building it (data is prepared before the model)."""
    if name in BUILTIN:
        return IMAGENET_MEAN, IMAGENET_STD
    if name not in _timm_names():
        raise unknown_name_error("backbone", name, list_backbones())
    import timm

    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {})
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
