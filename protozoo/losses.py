"""Loss terms as pure functions of tensors, each tested against hand-computed values."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, computed in fp32 even under mixed precision."""
    return F.cross_entropy(logits.float(), labels)


def cluster_cost(min_distances: torch.Tensor, own_class: torch.Tensor) -> torch.Tensor:
    """Chen et al.'s Clst: mean over images of the smallest distance between the image's patches
    and the prototypes of its own class.

    Args:
        min_distances: ``[B, P]`` smallest patch distance of each image to each prototype.
        own_class: ``[B, P]`` 1 where prototype j belongs to image b's class, else 0.
    """
    has_any = own_class.sum(1) > 0  # after pruning a class may have no prototype left
    if not bool(has_any.any()):
        return min_distances.sum() * 0
    masked = torch.where(own_class > 0, min_distances, torch.full_like(min_distances, float("inf")))
    return masked.amin(1)[has_any].mean()


def separation_cost(min_distances: torch.Tensor, own_class: torch.Tensor) -> torch.Tensor:
    """The smallest distance from each image to prototypes of *other* classes, averaged.

    Sign convention: the paper defines Sep as *minus* this quantity with a positive coefficient;
    the official code logs the distance itself and gives it the coefficient -0.08. Both minimise
    the same objective; this function follows the official code, so a larger value is better
    separated and the default coefficient is -0.08.
    """
    return cluster_cost(min_distances, 1 - own_class)


def last_layer_l1(weight: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """L1 norm of the last-layer weights that connect prototypes to classes other than their
    own (``weight`` ``[K, P]``, ``class_identity`` ``[P, K]`` one-hot)."""
    return (weight * (1 - class_identity.t())).abs().sum()
