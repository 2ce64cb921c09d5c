"""Prototype pruning (Chen et al. 2019, Sec. 2.5 and the official ``prune.py``).

A prototype is pruned when fewer than ``tau`` (default 3) of the ``k`` (default 6) training images
nearest to it (by their closest patch) belong to its class: such a prototype sits on background or
on a part shared by many classes. The last layer is then optimised again (a separate phase).
"""
from __future__ import annotations

import torch
from torch import nn

from .projection import labels_of, nearest_patches


def find_prunable(model, dataset, k: int = 6, tau: int = 3, batch_size: int = 64,
                  device=None) -> torch.Tensor:
    """Indices of the prototypes Chen et al.'s rule prunes."""
    _, images, _ = nearest_patches(model, dataset, k, batch_size, device)
    same = labels_of(dataset, images) == model.prototype_class.cpu().view(-1, 1)
    return (same.sum(1) < tau).nonzero().flatten()


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
    prune = find_prunable(ctx.model, ctx.data.push, k, tau, ctx.cfg.batch_size, ctx.dist.device)
    if len(prune) == ctx.model.num_prototypes:
        return {"prune/pruned": 0, "prune/note": "rule would prune every prototype; kept all"}
    remove_prototypes(ctx.model, prune)
    after = ctx.evaluate(ctx.data.val)["accuracy"]
    return {"prune/pruned": int(len(prune)), "prune/remaining": ctx.model.num_prototypes,
            "val/accuracy_before_prune": before, "val/accuracy_after_prune": after}
