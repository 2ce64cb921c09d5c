"""The output dataclasses every model's ``forward`` returns.

Each carries ``logits`` plus its family's explanation tensors at *feature* resolution and the
``stride`` that maps a feature cell to input pixels (cell (i, j) is centred near
``((j + 0.5) * stride, (i + 0.5) * stride)``). Code that needs a plain tensor (Grad-CAM, Captum)
uses :meth:`protozoo.models.base.ZooModel.logits_view`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
