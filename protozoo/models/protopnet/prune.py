"""Prototype pruning (Chen et al. 2019, Sec. 2.5 and the official ``prune.py``), and the check for
class-agnostic prototypes.

Two rules, both computed from every prototype's distance to every push image's closest patch
(:func:`protozoo.models.protopnet.push.image_distances`, what the logits use):

* **Chen et al.'s rule**: a prototype is pruned when fewer than ``tau`` (3) of the ``k`` (6)
  training images nearest to it belong to its class -- it sits on background or on a part shared
  by many classes. Near-ties are not broken by dataset order (which, with class-sorted folders,
  favours the first class): images whose distance lies within :data:`TIE` (relative) of the
  ``k``-th nearest share the remaining places, and the rule counts their expected own-class share.
* **Class specificity**: the probability that an image of the prototype's class is nearer to it
  than an image of another class (the ROC AUC of its distances, own class against the rest, ties
  counting one half). A prototype that matches every image about equally -- a border cell that
  sees mostly the zero padding every image shares, or a colour every image shows -- scores about
  0.5, and it is pruned when the score is below :data:`MIN_SPECIFICITY`: its similarity is then a
  constant bonus to its class, not evidence found in the image.

A class whose prototypes all fail keeps its most specific one, so that every class can still be
explained by evidence of its own. The specificity of every kept prototype is stored in its push provenance (``class_specificity``)
and shown in the report. The last layer is then optimised again (a separate phase).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .push import image_distances
from .specificity import MIN_SPECIFICITY, class_specificity

__all__ = ["MIN_SPECIFICITY", "assess_prototypes", "class_specificity",
           "expected_own_among_nearest", "find_prunable", "prune_action", "remove_prototypes"]

TIE = 1e-3  # distances within 0.1% of the k-th nearest tie with it


def expected_own_among_nearest(distances: torch.Tensor, own: torch.Tensor, k: int = 6,
                               tie: float = TIE) -> torch.Tensor:
    """``[P]``: the expected number of own-class images among each prototype's ``k`` nearest
    images, with images tied with the ``k``-th nearest (within ``tie`` relative) sharing the
    places left. ``distances`` ``[P, N]``, ``own`` bool ``[P, N]``."""
    k = min(k, distances.shape[1])
    kth = distances.sort(1).values[:, k - 1:k]
    band = tie * kth.abs() + 1e-12
    inside = distances < kth - band
    tied = (distances - kth).abs() <= band
    n_in, own_in = inside.sum(1), (inside & own).sum(1)
    share = (tied & own).sum(1).double() / tied.sum(1).clamp_min(1).double()
    return own_in.double() + (k - n_in).double() * share


def assess_prototypes(model, dataset, k: int = 6, tau: int = 3, batch_size: int = 64,
                      device=None, amp: str = "auto") -> dict[str, torch.Tensor]:
    """Both rules for every prototype: ``{"own_nearest": [P], "specificity": [P],
    "prune": bool [P]}``."""
    distances = image_distances(model, dataset, batch_size, device, amp)
    labels = torch.as_tensor(np.asarray(dataset.labels))
    own = labels.view(1, -1) == model.prototype_class.cpu().view(-1, 1)
    own_nearest = expected_own_among_nearest(distances, own, k)
    specificity = class_specificity(distances, own)
    prune = (own_nearest < tau) | (specificity < MIN_SPECIFICITY)
    classes = model.prototype_class.cpu()
    for c in classes.unique():  # a class keeps its most specific prototype
        mine = (classes == c).nonzero().flatten()
        if bool(prune[mine].all()):
            prune[mine[specificity[mine].nan_to_num(-1.0).argmax()]] = False
    return {"own_nearest": own_nearest, "specificity": specificity, "prune": prune}


def find_prunable(model, dataset, k: int = 6, tau: int = 3, batch_size: int = 64,
                  device=None) -> torch.Tensor:
    """Indices of the prototypes the two rules prune."""
    return assess_prototypes(model, dataset, k, tau, batch_size, device)["prune"].nonzero().flatten()


def record_specificity(model, specificity: torch.Tensor) -> None:
    """Write each prototype's class specificity into its push provenance."""
    for record, value in zip(model.metadata.get("prototypes") or [], specificity.tolist()):
        record["class_specificity"] = round(float(value), 4)


def remove_prototypes(model, prune: torch.Tensor) -> None:
    """Drop prototypes ``prune`` from ``model`` in place (vectors, classes, last-layer columns,
    provenance); the constructor arguments follow through ``model.config()``."""
    keep = torch.ones(model.num_prototypes, dtype=torch.bool)
    keep[prune.cpu()] = False
    device = model.prototypes.device
    keep_d = keep.to(device)
    classes = model.prototype_class[keep_d]
    model.prototypes = nn.Parameter(model.prototypes.detach()[keep_d].clone())
    model.prototype_class = classes
    model.class_identity = nn.functional.one_hot(classes, model.num_classes).float()
    old = model.last_layer
    model.last_layer = nn.Linear(int(keep.sum()), model.num_classes, bias=False).to(device)
    with torch.no_grad():
        model.last_layer.weight.copy_(old.weight[:, keep_d])
    model.num_prototypes = int(keep.sum())
    records = model.metadata.get("prototypes")
    if records:
        kept = [dict(r) for r, k in zip(records, keep.tolist()) if k]
        for j, r in enumerate(kept):
            r["original_index"] = r.get("original_index", r["prototype"])
            r["prototype"] = j
        model.metadata["prototypes"] = kept


def prune_action(ctx, k: int = 6, tau: int = 3) -> dict:
    """The engine's ``prune`` phase: prune, reporting validation accuracy before and after."""
    before = ctx.evaluate(ctx.data.val)["accuracy"]
    verdict = assess_prototypes(ctx.model, ctx.data.push, k, tau, ctx.cfg.batch_size,
                                ctx.dist.device, ctx.cfg.amp)
    record_specificity(ctx.model, verdict["specificity"])
    prune = verdict["prune"].nonzero().flatten()
    agnostic = int((verdict["specificity"] < MIN_SPECIFICITY).sum())
    remove_prototypes(ctx.model, prune)
    after = ctx.evaluate(ctx.data.val)["accuracy"]
    return {"prune/pruned": int(len(prune)), "prune/class_agnostic": agnostic,
            "prune/remaining": ctx.model.num_prototypes,
            "val/accuracy_before_prune": before, "val/accuracy_after_prune": after}
