"""The output dataclasses every model's ``forward`` returns, and the evidence ``explain`` returns.

Each output carries ``logits`` plus its family's explanation tensors at *feature* resolution and
the ``stride`` that maps a feature cell to input pixels (cell (i, j) is centred near
``((j + 0.5) * stride, (i + 0.5) * stride)``). Code that needs a plain tensor (Grad-CAM, Captum,
ONNX) uses :meth:`protozoo.models.base.ZooModel.logits_view`.

The outputs are registered as pytree nodes (:func:`register_output`), so ``torch.export``,
``torch.compile`` and ``torch.utils._pytree`` see through them: the tensors are the node's
children, ``stride`` (an int fixed by the architecture) and which optional fields are None are
its context. ``torch.export.export(model, (x,))`` then returns the same dataclass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

STATIC_FIELDS = ("stride",)  # ints fixed by the architecture: pytree context, not children


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, K]
    stride: int


@dataclass
class CAMOutput(ModelOutput):
    """Zhou et al. 2016: ``cams[b, k] = sum_c W[k, c] * features[b, c]`` for every class k."""

    features: torch.Tensor  # [B, C, h, w], the map that feeds global average pooling
    cams: torch.Tensor  # [B, K, h, w]


@dataclass
class PrototypeOutput(ModelOutput):
    """Chen et al. 2019: class score = sum over prototypes of similarity x last-layer weight."""

    features: torch.Tensor  # [B, D, h, w], add-on layer output (the space prototypes live in)
    distances: torch.Tensor  # [B, P, h, w], squared L2 distance of every cell to every prototype
    min_distances: torch.Tensor  # [B, P], global min-pool of ``distances``
    similarities: torch.Tensor  # [B, P], similarity of the closest cell (what the last layer sees)
    similarity_maps: torch.Tensor  # [B, P, h, w]


@dataclass
class VQAOutput(ModelOutput):
    """Attention VQA (Yang et al. 2016; Malinowski et al. 2018): where the model looked.

    ``attention[b, t]`` sums to 1 over the cells for every hop t: SAN's softmax of hop t; hard
    attention's kept cells, uniformly; 1/N for the baselines, which attend nowhere in particular.
    """

    attention: torch.Tensor  # [B, hops, h, w]
    scores: torch.Tensor | None = None  # [B, h, w] hard attention: presence (embedding L2 norm)
    kept: torch.Tensor | None = None  # [B, h, w] bool, hard attention: cells the reasoning saw
    glimpse_logits: torch.Tensor | None = None  # [B, K] han's training signal, not its answer
    read_logits: torch.Tensor | None = None  # [B, K] han's word reads' answer, training only
    word_attention: torch.Tensor | None = None  # [B, L, h, w] han's word reads: word l's weights


# ----------------------------------------------------------------------------- evidence
@dataclass
class CAMEvidence:
    """:meth:`protozoo.models.cam.CAMNet.explain`: Zhou et al.'s maps and boxes at image size."""

    logits: torch.Tensor  # [B, K]
    classes: torch.Tensor  # [B] the class each box localises (default: the prediction)
    maps: torch.Tensor  # [B, K, H, W] every class's CAM, upsampled bilinearly to the image
    boxes: torch.Tensor  # [B, 4] long xyxy (exclusive x1/y1): 20%-of-max rule on classes[b]'s map


@dataclass
class PrototypeEvidence:
    """:meth:`protozoo.models.protopnet.ProtoPNet.explain`: "this looks like that" as tensors
    (Chen et al. 2019, Fig. 3), for the prototypes asked for (default: all)."""

    logits: torch.Tensor  # [B, K]
    prototypes: torch.Tensor  # [P'] which prototypes the other fields describe
    prototype_class: torch.Tensor  # [P'] the class of each
    similarities: torch.Tensor  # [B, P'] similarity of each prototype's closest patch
    contributions: torch.Tensor  # [B, K, P'] similarity x last-layer weight (sums to the logits
    # over all prototypes)
    similarity_maps: torch.Tensor  # [B, P', H, W] upsampled bicubically to the image
    boxes: torch.Tensor  # [B, P', 4] long xyxy evidence boxes: the region around each map's
    # peak, as the report draws them (protozoo.maps.peak_region_box)
    high_activation_boxes: torch.Tensor  # [B, P', 4] Chen et al.'s box of every pixel at or
    # above the map's percentile (protozoo.maps.percentile_boxes)


# ----------------------------------------------------------------------------- pytree nodes
def register_output(cls: type) -> type:
    """Register dataclass ``cls`` as a pytree node: the fields that hold a value are its
    children; :data:`STATIC_FIELDS` and which optional fields are None are its context.
    Returns ``cls`` (usable as a decorator)."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in STATIC_FIELDS]
    static = [f.name for f in dataclasses.fields(cls) if f.name in STATIC_FIELDS]

    def context(output) -> tuple:
        present = tuple(n for n in names if getattr(output, n) is not None)
        return tuple(getattr(output, n) for n in static), present

    def flatten(output):
        ctx = context(output)
        return [getattr(output, n) for n in ctx[1]], ctx

    def flatten_with_keys(output):
        ctx = context(output)
        return [(pytree.GetAttrKey(n), getattr(output, n)) for n in ctx[1]], ctx

    def unflatten(values, ctx):
        fixed, present = ctx
        absent = {n: None for n in names if n not in present}
        return cls(**dict(zip(present, values)), **absent, **dict(zip(static, fixed)))

    kwargs = dict(serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    try:
        pytree.register_pytree_node(cls, flatten, unflatten,
                                    flatten_with_keys_fn=flatten_with_keys, **kwargs)
    except TypeError:  # torch < 2.2 has no flatten_with_keys_fn (and no torch.export to need it)
        pytree.register_pytree_node(cls, flatten, unflatten, **kwargs)
    return cls


for _cls in (ModelOutput, CAMOutput, PrototypeOutput, VQAOutput, CAMEvidence, PrototypeEvidence):
    register_output(_cls)
