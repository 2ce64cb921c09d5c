"""Receptive fields measured, not computed: which input pixels each feature cell depends on.

:func:`measure_geometry` reads the support of the gradient of one feature cell with respect to the
input on a probe copy of the network, so it works for any architecture -- CNNs, ViTs (global
attention: every cell sees the whole image, ``Geometry.global_field``), Swin's shifted windows,
squeeze-and-excitation -- where per-layer kernel/stride/padding arithmetic (the original
ProtoPNet code's) breaks on the next architecture. :func:`feature_map` is how a backbone's body
gives its last map, ``[B, C, h, w]`` whatever timm's output format.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class Geometry:
    """How feature cells map to input pixels (see :mod:`protozoo.backbones`)."""

    stride: int
    receptive_field: int
    rf_offset: int
    # True: every cell depends on every pixel of any image up to the largest probe (1536 px);
    # receptive_field/rf_offset then describe only that probe (the whole of it).
    global_field: bool = False

    def cell_box(self, i: int, j: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Pixel box ``(x0, y0, x1, y1)`` (exclusive end) of cell (i, j), clipped to the image;
        the whole image for a global field."""
        if self.global_field:
            return 0, 0, width, height
        y0 = i * self.stride + self.rf_offset
        x0 = j * self.stride + self.rf_offset
        y1, x1 = y0 + self.receptive_field, x0 + self.receptive_field
        return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)

    def describe(self) -> str:
        """``receptive field 38 px`` or ``receptive field: the whole image (global)``."""
        if self.global_field:
            return "receptive field: the whole image (global)"
        return f"receptive field {self.receptive_field} px"


def feature_map(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last feature map of ``body`` as ``[B, C, h, w]`` (timm's channels-last outputs,
    e.g. Swin's, declared by ``output_fmt``, are permuted)."""
    out = body(x)
    out = out[-1] if isinstance(out, (list, tuple)) else out
    return out.permute(0, 3, 1, 2) if output_format(body) == "NHWC" else out


def output_format(body: nn.Module) -> str:
    fmt = getattr(body, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt))


def measure_geometry(body: nn.Module, in_chans: int = 3, start_size: int = 96,
                     max_size: int = 1536,
                     fixed_size: tuple[int, int] | None = None) -> Geometry:
    """Measure stride and receptive field of ``body`` from gradient support.

    The measurement runs on a *probe copy* whose weights are all positive (scaled by 1/fan-in),
    whose max-pools are average pools, and whose batch norms have running mean 0 and running
    variance set to the mean square of their input on the probe image, in float64 on positive
    inputs. Then no ReLU is inactive, no max-pool hides a window and no zero-initialised residual
    branch (timm's default) cuts a path, so the gradient support is the full set of pixels the
    cell depends on. The norms keep activations O(1) however deep the network (otherwise
    positive weights and residual sums grow them past any float range, or saturate an attention
    softmax, and the gradient vanishes or becomes NaN); float64 keeps the gradient at the edge of
    the field, a product of one small weight per layer (~1e-57 after 60 3x3 convolutions), above
    zero.

    The probe starts square (``start_size``). A support that touches the left or right border
    is measured again on a strip ``max_size`` wide and one cell high (cheap, even for a ViT's
    attention; ``start_size`` high for a model that does not take that): fields are square in
    every architecture, and a cell's column extent does not depend on the image's height, so
    the strip's unclipped column extent is the field. When even the *first* cell of a row
    depends on every column of the widest probe, every cell sees the whole of any image up to
    that size: a global field (attention over all tokens, the global pooling of squeeze-and-
    excitation), ``global_field=True``. A model built for one input size (``fixed_size``,
    ``(H, W)``) is measured at that size only; one that fails on the square probe, at its timm
    default size.
    """
    probe = _geometry_probe(body)
    sizes = [tuple(fixed_size) if fixed_size else (start_size, start_size)]
    default = tuple((getattr(body, "pretrained_cfg", None) or {}).get("input_size", ())[-2:])
    if not fixed_size and len(default) == 2 and default != sizes[0]:
        sizes.append(default)  # a model with size constraints takes its default size
    for n, (height, width) in enumerate(sizes):
        try:
            geometry, touches, whole = _measure_at(probe, in_chans, height, width)
            break
        except (AssertionError, RuntimeError) as exc:
            if n == len(sizes) - 1:
                raise GeometryError(height, width) from exc
    if touches and n == 0 and not fixed_size:
        for height in (geometry.stride, start_size):
            try:
                geometry, touches, whole = _measure_at(probe, in_chans, height, max_size)
                break
            except (AssertionError, RuntimeError):
                continue  # it does not take this strip; with none, the square's field stands
    return replace(geometry, global_field=whole)


class GeometryError(RuntimeError):
    """The receptive field could not be measured: the model fails on every probe image (the
    last probe's size in ``args``, the model's error as ``__cause__``)."""


def _measure_at(probe: nn.Module, in_chans: int, height: int, width: int):
    _calibrate_norms(probe, _probe_input(in_chans, height, width))
    with torch.enable_grad():
        return _support_geometry(probe, in_chans, height, width)


def _geometry_probe(body: nn.Module) -> nn.Module:
    probe = copy.deepcopy(body).double().eval().cpu()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in probe.parameters():
            fan_in = max(param[0].numel(), 1) if param.ndim > 1 else 1
            param.copy_((torch.rand(param.shape, generator=generator, dtype=param.dtype) + 0.5)
                        / fan_in)
    for module in probe.modules():
        for child_name, child in module.named_children():
            average = _average_pool_like(child) if isinstance(child, nn.MaxPool2d) else None
            if average is not None:
                setattr(module, child_name, average)
    return probe


def _average_pool_like(pool: nn.MaxPool2d) -> nn.Module | None:
    """An average pool with ``pool``'s windows and output shape; None for a kind not known."""
    if pool.dilation not in (1, (1, 1)):
        return None
    if type(pool) is nn.MaxPool2d:
        return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode)
    try:  # timm's TF-style 'same' max pool pads in forward, so its padding attribute is 0
        from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    except ImportError:
        return None
    if type(pool) is MaxPool2dSame:
        return AvgPool2dSame(pool.kernel_size, pool.stride, ceil_mode=pool.ceil_mode)
    return None


def _calibrate_norms(probe: nn.Module, x: torch.Tensor) -> None:
    """Set every batch norm's running mean to 0 and its running variance to the mean square of
    its input on ``x`` (in one pass: each norm sees its input after the norms before it are
    set), so activations stay positive and O(1) however deep the network."""

    def set_stats(module, args):
        inp = args[0].detach()
        dims = [d for d in range(inp.ndim) if d != 1]
        module.running_mean.zero_()
        module.running_var.copy_(inp.pow(2).mean(dims).clamp_min(1e-12))

    norms = [m for m in probe.modules()
             if isinstance(getattr(m, "running_mean", None), torch.Tensor)
             and isinstance(getattr(m, "running_var", None), torch.Tensor)]
    handles = [m.register_forward_pre_hook(set_stats) for m in norms]
    try:
        with torch.no_grad():
            feature_map(probe, x)
    finally:
        for handle in handles:
            handle.remove()


def _probe_input(in_chans: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, in_chans, height, width, generator=generator, dtype=torch.float64) + 0.5


def _support_geometry(probe: nn.Module, in_chans: int, height: int, width: int):
    """``(geometry, touches a side border, whole)`` from the gradient support of the central
    cell on one ``height x width`` probe image; ``whole``: the first cell of its row depends on
    every column too."""
    x = _probe_input(in_chans, height, width).requires_grad_(True)
    feats = feature_map(probe, x)
    h, w = feats.shape[-2:]
    stride = width // w if w > 0 else width
    ci, cj = h // 2, w // 2
    rows, cols = _support(feats[:, :, ci, cj], x, retain=True)
    if len(rows) == 0:  # a constant feature map: nothing to measure, fall back to the stride
        return Geometry(stride, stride, 0), False, False
    col_extent = int(cols[-1] - cols[0] + 1)
    rf = col_extent if width > height else max(int(rows[-1] - rows[0] + 1), col_extent)
    offset = int(cols[0]) - cj * stride
    left, right = bool(cols[0] == 0), bool(cols[-1] == width - 1)
    whole = False
    if left and right:
        _, first = _support(feats[:, :, ci, 0], x)
        whole = len(first) == width
    return Geometry(stride, rf, offset), left or right, whole


def _support(cell: torch.Tensor, x: torch.Tensor, retain: bool = False):
    """Rows and columns of ``x`` on which ``cell`` (its channels summed) depends."""
    (grad,) = torch.autograd.grad(cell.sum(), x, retain_graph=retain)
    support = (grad != 0).any(dim=1)[0]  # NaN (an overflow on a path that exists) counts too
    return support.any(dim=1).nonzero().flatten(), support.any(dim=0).nonzero().flatten()


__all__ = ["Geometry", "GeometryError", "feature_map", "measure_geometry", "output_format"]
