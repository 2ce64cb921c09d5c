"""Explainers: one pixel map ``[B, H, W]`` per image of why an image model gives class
``target[b]`` (larger = more evidence for it), batched, for any zoo image classifier.

The post-hoc methods see only the logits (:meth:`~protozoo.models.base.ZooModel.logits_view`)
and run through Captum (Kokhlikyan et al., 2020), not re-implementations; ``intrinsic`` is the
model's own explanation (:meth:`~protozoo.models.base.ZooModel.intrinsic_map`), and ``random``
a control that knows nothing about the model. Every explainer runs the model in eval mode and
fp32 on the images' device, explains the prediction unless ``target`` is given, and keeps the
memory of one batch (Captum's internal batches are capped at the batch's size).

"0 after normalisation" below is the value of the normalisation mean (the backbone's ``mean``:
grey 0.5 for the built-in CNNs, ImageNet's mean colour for timm backbones).
"""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..maps import upsample
from ..registry import unknown_name_error

EXPLAINERS: dict[str, type[Explainer]] = {}


def _register(cls):
    EXPLAINERS[cls.name] = cls
    return cls


def list_explainers() -> list[str]:
    """The explainer names, in the order reports show them (intrinsic first, random last)."""
    return list(EXPLAINERS)


class Explainer:
    """One method: its parameters are the dataclass fields; :meth:`maps` does the work."""

    name = ""
    needs_captum = True

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def maps(self, model, images: torch.Tensor, target: torch.Tensor,
             output=None) -> torch.Tensor:
        """``[B, H, W]`` float32 maps; ``output``: the model's forward pass on ``images`` if the
        caller has it (only ``intrinsic`` reads it)."""
        raise NotImplementedError


def _captum():
    try:
        import captum.attr as attr
    except ImportError:
        raise UserError("the post-hoc explainers need Captum: pip install 'protozoo[explain]' "
                        "(or pip install captum)") from None
    return attr


@contextmanager
def _quiet():
    """Captum's notices that it set requires_grad / hooked ReLUs (expected here, every call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*required_grads has been set automatically")
        warnings.filterwarnings("ignore", message=".*Setting backward hooks on ReLU")
        yield


def _channel_max_abs(attr: torch.Tensor) -> torch.Tensor:
    return attr.detach().abs().amax(1).float()


@_register
@dataclass
class Intrinsic(Explainer):
    """The model's own explanation (:meth:`ZooModel.intrinsic_map`): CAM's class activation map
    (Zhou et al., CVPR 2016), ProtoPNet's contribution-weighted similarity maps (Chen et al.,
    NeurIPS 2019), upsampled to the image as the family draws it (``model.map_upsampling``:
    bilinear, bicubic for ProtoPNet). No parameters: one forward pass."""

    name = "intrinsic"
    needs_captum = False

    def maps(self, model, images, target, output=None):
        if output is None:
            with torch.no_grad():
                output = model(images)
        cells = model.intrinsic_map(output, target)
        if cells is None:
            family = model.model_name or type(model).__name__
            raise UserError(f"model '{family}' has no intrinsic explanation map; drop "
                            "'intrinsic' from the explainers")
        mode = getattr(model, "map_upsampling", "bilinear")
        return upsample(cells.detach().float()[:, None], tuple(images.shape[-2:]), mode)[:, 0]


@_register
@dataclass
class Gradient(Explainer):
    """Gradient saliency (Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks",
    ICLR 2014 workshop): ``|d logit_target / d x|``, the maximum over colour channels (as in the
    paper). One forward and one backward pass."""

    name = "gradient"

    def maps(self, model, images, target, output=None):
        attr = _captum().Saliency(model.logits_view()).attribute(images, target=target, abs=True)
        return _channel_max_abs(attr)


@_register
@dataclass
class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al., "SmoothGrad: removing noise by adding noise", 2017): the mean
    of ``|gradient|`` over ``samples`` copies of the image with Gaussian noise of standard
    deviation ``noise`` x the pixel range (the paper's 10-20%; the range [0, 1] of a pixel is
    ``1 / std`` after normalisation, the mean over channels), then the maximum over channels.
    Noise is drawn from ``seed``. Cost: ``samples`` gradient passes (the paper uses 50)."""

    name = "smoothgrad"
    samples: int = 16
    noise: float = 0.15
    seed: int = 0

    def maps(self, model, images, target, output=None):
        attr = _captum()
        std = float(torch.tensor(model.std).mean())
        tunnel = attr.NoiseTunnel(attr.Saliency(model.logits_view()))
        with torch.random.fork_rng(devices=_cuda(images)):
            torch.manual_seed(self.seed)
            out = tunnel.attribute(images, target=target, nt_type="smoothgrad",
                                   nt_samples=self.samples, nt_samples_batch_size=1,
                                   stdevs=self.noise / std, abs=True)
        return _channel_max_abs(out)


@_register
@dataclass
class IntegratedGradients(Explainer):
    """Integrated Gradients (Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep
    Networks", ICML 2017): ``(x - x') * integral of the gradient along the straight path from
    the baseline x' = 0 after normalisation`` (the normalisation mean), ``steps`` points
    (Gauss-Legendre, Captum's default), summed over colour channels and signed: by completeness
    the map sums to ``logit(x) - logit(x')``, positive where a pixel adds evidence for the
    class. Cost: ``steps`` gradient passes, in batches of the images' batch size."""

    name = "integrated_gradients"
    steps: int = 32

    def maps(self, model, images, target, output=None):
        ig = _captum().IntegratedGradients(model.logits_view())
        attr = ig.attribute(images, baselines=0.0, target=target, n_steps=self.steps,
                            internal_batch_size=len(images))
        return attr.detach().sum(1).float()


@_register
@dataclass
class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
    ECCV 2014): a ``window`` x ``window`` square of all channels, set to 0 after normalisation
    (the paper's grey square), slides over the image with ``stride``; a pixel's value is the mean
    drop of the target logit over the windows that cover it. ``window`` defaults to 1/8 of the
    image side (at least 3 px), ``stride`` to the window (non-overlapping: 64 positions; half
    the window gives finer maps at 3.5x the cost). Cost: one forward pass per window position,
    ((H - window) / stride + 1)^2, one batch at a time."""

    name = "occlusion"
    window: int | None = None
    stride: int | None = None

    def geometry(self, size: int) -> tuple[int, int]:
        window = self.window or max(3, size // 8)
        return window, self.stride or window

    def maps(self, model, images, target, output=None):
        window, stride = self.geometry(int(images.shape[-1]))
        channels = int(images.shape[1])
        attr = _captum().Occlusion(model.logits_view()).attribute(
            images, target=target, sliding_window_shapes=(channels, window, window),
            strides=(channels, stride, stride), baselines=0.0, perturbations_per_eval=1)
        return attr.detach().mean(1).float()


@_register
@dataclass
class GradCAM(Explainer):
    """Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017): ``ReLU(sum_c alpha_c A_c)`` with ``alpha_c`` the
    spatial mean of ``d logit_target / d A_c``, at the output of ``layer`` (a submodule name of
    the zoo model; default ``backbone``: the backbone's feature map), upsampled bilinearly to the
    image. One forward and one backward pass."""

    name = "gradcam"
    layer: str = "backbone"

    def maps(self, model, images, target, output=None):
        module = resolve_layer(model, self.layer)
        cam = _captum().LayerGradCam(model.logits_view(), module)
        attr = cam.attribute(images, target=target, relu_attributions=True)
        return upsample(attr.detach().float().sum(1, keepdim=True),
                        tuple(images.shape[-2:]))[:, 0]


@_register
@dataclass
class GuidedBackprop(Explainer):
    """Guided Backpropagation (Springenberg et al., "Striving for Simplicity: The All
    Convolutional Net", ICLR 2015 workshop): the gradient with negative gradients zeroed at
    every ``nn.ReLU`` module on the way back, ``|.|`` and the maximum over colour channels.
    Adebayo et al. (2018) showed it barely changes when the model's weights are randomised.
    One forward and one backward pass."""

    name = "guided_backprop"

    def maps(self, model, images, target, output=None):
        attr = _captum().GuidedBackprop(model.logits_view()).attribute(images, target=target)
        return _channel_max_abs(attr)


@_register
@dataclass
class Random(Explainer):
    """A control that ignores the model: independent uniform noise per pixel, drawn from
    ``seed`` (the same maps for the same batch, whatever the model). Any explanation worth its
    cost must beat it on faithfulness and ground truth, and the sanity checks must flag it."""

    name = "random"
    needs_captum = False
    seed: int = 0

    def maps(self, model, images, target, output=None):
        g = torch.Generator().manual_seed(self.seed)
        b, _, h, w = images.shape
        return torch.rand(b, h, w, generator=g).to(images.device)


def _cuda(images: torch.Tensor) -> list:
    return [images.device] if images.device.type == "cuda" else []


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of the zoo model (or a module attribute such as NIWT's
    ``backbone``); a one-line UserError naming close matches otherwise."""
    names = [n for n, _ in model.named_modules() if n]
    if name in names:
        return model.get_submodule(name)
    found = getattr(model, name, None) if "." not in name else None
    if isinstance(found, nn.Module):
        return found
    raise unknown_name_error("layer", name, names, " (a submodule name of the model)")


def create_explainer(name: str | Explainer, **params) -> Explainer:
    """The explainer ``name`` with ``params`` (its dataclass fields); one-line UserErrors for an
    unknown name (listing the valid ones) or parameter."""
    if isinstance(name, Explainer):
        return dataclasses.replace(name, **params) if params else name
    if name not in EXPLAINERS:
        raise UserError(f"unknown explainer '{name}': choose from "
                        f"{', '.join(EXPLAINERS)} (or 'all')")
    cls = EXPLAINERS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        takes = ", ".join(fields) or "no parameters"
        raise UserError(f"explainer '{name}' has no parameter {', '.join(unknown)}: it takes "
                        f"{takes}")
    return cls(**params)


def has_intrinsic_map(model) -> bool:
    """Does the model's family define :meth:`ZooModel.intrinsic_map` (NIWT, for one, does not)?"""
    from ..models.base import ZooModel

    own = getattr(type(model), "intrinsic_map", None)
    return own is not None and own is not ZooModel.intrinsic_map


def resolve_explainers(names="all", params: dict | None = None, model=None) -> list[Explainer]:
    """``"all"``, one name, or a list of names/explainers -> explainers; ``params``:
    ``{name: {parameter: value}}``. With ``model``, ``"all"`` leaves out ``intrinsic`` for a
    family without an intrinsic map."""
    params = params or {}
    if isinstance(names, str) and "," in names:  # "intrinsic,gradcam", as the command line has it
        names = [n.strip() for n in names.split(",") if n.strip()]
        if "all" in names:
            raise UserError(f"explainers '{','.join(names)}': 'all' stands alone (it means "
                            f"every one of {', '.join(EXPLAINERS)})")
    if isinstance(names, (list, tuple)) and not names:
        raise UserError(f"no explainer named: choose from {', '.join(EXPLAINERS)} (or 'all')")
    if isinstance(names, (str, Explainer)):
        if names == "all":
            names = [n for n in EXPLAINERS
                     if n != "intrinsic" or model is None or has_intrinsic_map(model)]
        else:
            names = [names]
    out = [create_explainer(n, **params.get(n if isinstance(n, str) else n.name, {}))
           for n in names]
    seen = [e.name for e in out]
    if len(set(seen)) != len(seen):
        raise UserError(f"explainers {', '.join(seen)} name one explainer twice")
    return out


def check_explainers(names="all", params: dict | None = None, model=None) -> list[Explainer]:
    """:func:`resolve_explainers`, and a one-line UserError before any work when one of them
    needs Captum and Captum is not installed."""
    methods = resolve_explainers(names, params, model)
    need = [e.name for e in methods if e.needs_captum]
    if need:
        try:
            import captum.attr  # noqa: F401
        except ImportError:
            raise UserError(f"explainer{'s' if len(need) > 1 else ''} {', '.join(need)} "
                            f"need{'' if len(need) > 1 else 's'} Captum, which is not installed: "
                            "pip install 'protozoo[explain]' (intrinsic and random run "
                            "without it)") from None
    return methods


def check_image_model(model) -> None:
    """One-line UserError for a model that does not explain an image alone (a VQA model takes a
    question with it)."""
    if not getattr(model, "explains_images", True):
        from ..registry import models_for_task

        family = getattr(model, "model_name", "") or type(model).__name__
        raise UserError(f"model '{family}' does not take an image alone (it answers questions "
                        "about images), so the image explainers cannot run on it; use an image "
                        f"classifier ({', '.join(models_for_task('classify'))})")


def predict(model, images: torch.Tensor):
    """``(output, predicted class [B])`` in eval mode without gradients."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(images)
    finally:
        model.train(was)
    return output, output.logits.argmax(1)


def explain(model, images: torch.Tensor, explainer: str | Explainer = "intrinsic",
            target: torch.Tensor | None = None, output=None, **params) -> torch.Tensor:
    """Maps ``[B, H, W]`` (float32, on the images' device) of ``explainer`` for class
    ``target[b]`` (default: the model's prediction) on ``images`` ``[B, 3, H, W]``, normalised as
    the model expects. ``params`` set the explainer's parameters (see each class: e.g.
    ``steps`` for integrated_gradients, ``window`` for occlusion, ``layer`` for gradcam).
    ``output``: the model's forward pass on ``images``, if the caller already has it."""
    check_image_model(model)
    method = create_explainer(explainer, **params)
    images = images.float()
    if target is None:
        output, target = predict(model, images)
    target = torch.as_tensor(target, device=images.device).long().reshape(-1)
    if len(target) != len(images):
        raise UserError(f"{len(target)} targets for {len(images)} images; give one class per "
                        "image (or none: the prediction)")
    was = model.training
    model.eval()
    try:
        with _quiet(), torch.enable_grad():
            maps = method.maps(model, images.detach(), target, output)
    finally:
        model.train(was)
    return maps.float()
