"""Class specificity of a prototype: does it find its own class's images nearer than the others?

Shared by push (:mod:`.push`: a projection that would be class-agnostic is moved to a
class-specific patch) and pruning (:mod:`.prune`: prototypes below the bar are removed).
"""
from __future__ import annotations

import torch
from scipy.stats import rankdata

MIN_SPECIFICITY = 0.75  # own-class images must be nearer than other images in 3 of 4 pairs


def class_specificity(distances: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``[P]``: the ROC AUC of "own class" against the prototype's distances (smaller = more
    similar): the probability that a random own-class image is nearer than a random image of
    another class, ties counting one half (Mann-Whitney). NaN where a side is empty.
    ``distances`` ``[P, N]``, ``own`` bool ``[P, N]``."""
    ranks = torch.as_tensor(rankdata(-distances.double().cpu().numpy(), axis=1))  # high = near
    own = own.cpu()
    n_own = own.sum(1).double()
    n_other = (~own).sum(1).double()
    u = (ranks * own).sum(1) - n_own * (n_own + 1) / 2
    return u / (n_own * n_other)
