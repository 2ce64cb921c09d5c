"""Backbones: timm feature extractors and tiny built-in CNNs behind one registry.

Every backbone is a :class:`Backbone` that maps images ``[B, 3, H, W]`` to one feature map
``[B, C, h, w]`` and describes itself (timm's ``feature_info`` idea) so generic code never guesses:

* ``channels`` – C;
* ``stride`` – input pixels per feature cell;
* ``receptive_field`` and ``rf_offset`` – the input window one feature cell can see: cell ``(i, j)``
  sees rows ``[i*stride + rf_offset, i*stride + rf_offset + receptive_field)`` (same for columns).

The receptive field is *measured*, not computed from per-layer arithmetic: the support of the
gradient of one central feature cell with respect to the input is exactly the set of pixels that
cell depends on. The original ProtoPNet code hard-codes kernel/stride/padding lists per
architecture, which breaks on any architecture it was not written for; this works for all of them.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
import torch
from torch import nn

from .errors import UserError
from .registry import Registry, unknown_name_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BUILTIN = Registry("backbone")


@dataclass(frozen=True)
class Geometry:
    """How feature cells map to input pixels (see the module docstring)."""

    stride: int
    receptive_field: int
    rf_offset: int

    def cell_box(self, i: int, j: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)`` (exclusive end) of cell (i, j), clipped to the image."""
        y0 = i * self.stride + self.rf_offset
        x0 = j * self.stride + self.rf_offset
        y1, x1 = y0 + self.receptive_field, x0 + self.receptive_field
        return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


class Backbone(nn.Module):
    """A feature extractor plus its self-description (channels, stride, receptive field, norm)."""

    def __init__(self, body: nn.Module, name: str, stage: int = -1, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, in_chans: int = 3):
        super().__init__()
        self.body = body
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
            _GEOMETRY_CACHE[key] = measure_geometry(self.body, self.in_chans)
        return _GEOMETRY_CACHE[key]

    @property
    def receptive_field(self) -> int:
        return self.geometry.receptive_field

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)  # a wrong batch is a one-line UserError, not a conv traceback
        return _features(self.body, x)

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
        if min(x.shape[-2:]) < self.stride:
            raise UserError(
                f"image of {x.shape[-1]}x{x.shape[-2]} px is smaller than one feature cell of "
                f"backbone '{self.name}' ({self.stride} px, receptive field "
                f"{self.receptive_field} px); use images of at least {self.stride} px "
                "(e.g. --image-size 64) or a backbone with a smaller stride")


def _features(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = body(x)
    return out[-1] if isinstance(out, (list, tuple)) else out


_GEOMETRY_CACHE: dict[tuple, Geometry] = {}


def measure_geometry(body: nn.Module, in_chans: int = 3, start_size: int = 96,
                     max_size: int = 1536) -> Geometry:
    """Measure stride and receptive field of ``body`` from gradient support.

    The measurement runs on a *probe copy* whose weights are all positive (scaled by 1/fan-in so
    activations stay O(1)), whose batch-norm statistics are reset and whose max-pools are average
    pools, in float64 on positive inputs. Then no ReLU is inactive, no max-pool hides a window and
    no zero-initialised residual branch (timm's default) cuts a path, so the gradient support is
    the full set of pixels the cell depends on. The input grows until that support no longer
    touches the border, so the field is not clipped.
    """
    probe = _geometry_probe(body)
    size = start_size
    with torch.enable_grad():
        while True:
            geometry, touches_border = _support_geometry(probe, in_chans, size)
            if not touches_border or size >= max_size:
                return geometry
            size *= 2


def _geometry_probe(body: nn.Module) -> nn.Module:
    import copy

    probe = copy.deepcopy(body).float().eval().cpu()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in probe.parameters():
            fan_in = max(param[0].numel(), 1) if param.ndim > 1 else 1
            param.copy_((torch.rand(param.shape, generator=generator, dtype=param.dtype) + 0.5)
                        / fan_in)
    for module in probe.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
        for child_name, child in module.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(module, child_name, nn.AvgPool2d(child.kernel_size, child.stride,
                                                         child.padding, child.ceil_mode))
    return probe


def _support_geometry(probe: nn.Module, in_chans: int, size: int):
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(1, in_chans, size, size, generator=generator, dtype=torch.float32) + 0.5)
    x.requires_grad_(True)
    feats = _features(probe, x)
    h, w = feats.shape[-2:]
    stride = size // h if h > 0 else size
    ci, cj = h // 2, w // 2
    (grad,) = torch.autograd.grad(feats[:, :, ci, cj].sum(), x)
    support = grad.abs().sum(dim=(0, 1)) > 0
    rows = support.any(dim=1).nonzero().flatten()
    cols = support.any(dim=0).nonzero().flatten()
    if len(rows) == 0:  # a constant feature map: nothing to measure, fall back to the stride
        return Geometry(stride, stride, 0), False
    rf = int(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
    offset = int(cols[0]) - cj * stride
    touches = bool(rows[0] == 0 or cols[0] == 0 or rows[-1] == size - 1 or cols[-1] == size - 1)
    return Geometry(stride, rf, offset), touches


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


@BUILTIN.register("tiny_cnn_rf18")
def tiny_cnn_rf18(stage: int = -1) -> StagedCNN:
    """tiny_cnn_s4 with a 1x1 last convolution: stride 4, receptive field 18 px. ProtoPNet's
    default: at 64 px a cell sees about one part (a petal, a bird's head), so the cell most like
    a prototype is centred on the part rather than beside it (measured in docs/protopnet.md)."""
    return StagedCNN([32, 64, 128, 128], [True, True, False, False], stage, kernels=[3, 3, 3, 1])


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

    kwargs: dict = dict(features_only=True)
    probe = timm.create_model(name, features_only=True, pretrained=False)
    n_stages = len(probe.feature_info)
    check_stage(stage, n_stages, name)
    kwargs["out_indices"] = (stage % n_stages,)
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
    cfg = getattr(body, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return Backbone(body, name, stage, mean=mean, std=std)


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
