"""Prototype projection ("push", Chen et al. 2019, Sec. 2.2): replace each prototype by its nearest
feature patch among the training images of its own class.

Three separate steps, as the design asks: :func:`compute_push` is pure computation and returns a
:class:`PushResult` with provenance; :func:`apply_push` writes it into the model; rendering reads
the provenance from ``model.metadata["prototypes"]`` (saved with the checkpoint, so reports work
after ``protozoo.load``).

Vectorised over prototypes and images: every batch updates a running best (distance, image,
cell, feature vector) for *all* prototypes with a handful of tensor operations on the device
(the official code loops over prototypes in Python for every batch). Memory is one batch of
feature and distance maps plus ``P x D x h x w`` for the best images' feature maps, whatever the
dataset size. Distances are exact fp32 squared L2, so after push each prototype *equals* a
feature vector of a real training image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from .engine import autocast_for, to_device
from .maps import percentile_boxes, upsample


@dataclass
class PushResult:
    vectors: torch.Tensor  # [P, D] the projected prototypes
    distances: torch.Tensor  # [P] distance from the old prototype to its new patch
    image_index: torch.Tensor  # [P] index in the push dataset
    cell: torch.Tensor  # [P, 2] (row, col) of the patch in the feature map
    similarity_maps: torch.Tensor  # [P, h, w] the new prototype's similarity over its source image
    provenance: list[dict]


@torch.no_grad()
def scan_nearest(model, dataset, batch_size: int = 64, device=None, own_class: bool = True,
                 amp: str = "auto"):
    """One pass over ``dataset``: for every prototype, the closest patch (and the feature map of
    the image holding it). ``own_class`` restricts candidates to images of the prototype's class.

    Returns ``(best_dist [P], best_image [P], best_cell [P, 2], best_features [P, D, h, w])``.
    """
    device = device or next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    classes = model.prototype_class.to(device)
    P = model.num_prototypes
    best = torch.full((P,), float("inf"), device=device)
    best_image = torch.full((P,), -1, dtype=torch.long, device=device)
    best_cell = torch.zeros(P, 2, dtype=torch.long, device=device)
    best_feats = None
    autocast, _ = autocast_for(device, amp)
    was_training = model.training
    model.eval()
    offset = 0
    for batch in loader:
        batch = to_device(batch, device)
        with autocast:
            features = model.add_on(model.backbone(batch["image"]))
        features = features.float()
        dist = model.distances_from_features(features)  # [B, P, h, w] fp32
        B, _, h, w = dist.shape
        if own_class:
            allowed = batch["label"].view(B, 1) == classes.view(1, P)  # [B, P]
            dist = dist.masked_fill(~allowed.view(B, P, 1, 1), float("inf"))
        flat = dist.permute(1, 0, 2, 3).reshape(P, -1)  # [P, B*h*w]
        value, where = flat.min(1)
        better = value < best
        if best_feats is None:
            best_feats = torch.zeros(P, features.shape[1], h, w, device=device)
        image_in_batch = where // (h * w)
        cell = where % (h * w)
        best = torch.where(better, value, best)
        best_image = torch.where(better, image_in_batch + offset, best_image)
        best_cell = torch.where(better.view(P, 1),
                                torch.stack([cell // w, cell % w], 1), best_cell)
        best_feats[better] = features[image_in_batch[better]]
        offset += B
    model.train(was_training)
    return best, best_image, best_cell, best_feats


def compute_push(model, dataset, batch_size: int = 64, device=None, amp: str = "auto",
                 percentile: float = 95.0) -> PushResult:
    """Find every prototype's projection and its provenance (no change to the model)."""
    best, image, cell, feats = scan_nearest(model, dataset, batch_size, device, True, amp)
    missing = (image < 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"prototypes {missing[:5]} have no training image of their class to "
                         "project onto; every class needs training images")
    P = len(best)
    vectors = feats[torch.arange(P), :, cell[:, 0], cell[:, 1]]  # exact feature vectors
    with torch.no_grad():
        maps = model.similarity_of(_distances_to(model, feats, vectors))  # [P, h, w]
    provenance = _provenance(model, dataset, image, cell, best, maps, percentile)
    return PushResult(vectors, best, image, cell, maps, provenance)


def _distances_to(model, feats: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Distance of prototype p's new vector to every cell of its own source image: ``[P, h, w]``."""
    if model.similarity == "cosine":
        feats = torch.nn.functional.normalize(feats, dim=1)
        vectors = torch.nn.functional.normalize(vectors, dim=1)
    diff = feats - vectors[:, :, None, None]
    return (diff * diff).sum(1)


def _provenance(model, dataset, image, cell, best, maps, percentile) -> list[dict]:
    size = model.metadata.get("image_size") or _image_size(dataset)
    geometry = model.backbone.geometry
    # upsample + high-activation boxes for all prototypes at once, on the device
    boxes = percentile_boxes(upsample(maps[:, None], (size, size))[:, 0], percentile).tolist()
    paths = getattr(dataset, "paths", None)
    records = []
    for j in range(len(best)):
        i, r, c = int(image[j]), int(cell[j, 0]), int(cell[j, 1])
        records.append({
            "prototype": j,
            "class": int(model.prototype_class[j]),
            "image_index": i,
            "image_path": str(paths[i]) if paths is not None else None,
            "cell": [r, c],
            "distance": float(best[j]),
            "receptive_field_box": list(geometry.cell_box(r, c, size, size)),
            "high_activation_box": boxes[j],
        })
    return records


def _image_size(dataset) -> int:
    return int(dataset[0]["image"].shape[-1])


def apply_push(model, result: PushResult) -> None:
    """Copy the projected vectors into the model and store provenance in its metadata."""
    with torch.no_grad():
        model.prototypes.copy_(result.vectors.to(model.prototypes.dtype))
    model.metadata["prototypes"] = result.provenance


def push_action(ctx) -> dict:
    """The engine's ``push`` phase: validation accuracy before and after, then the projection."""
    before = ctx.evaluate(ctx.data.val)["accuracy"]
    result = compute_push(ctx.model, ctx.data.push, ctx.cfg.batch_size, ctx.dist.device,
                          ctx.cfg.amp)
    apply_push(ctx.model, result)
    after = ctx.evaluate(ctx.data.val)["accuracy"]
    return {"val/accuracy_before_push": before, "val/accuracy_after_push": after,
            "push/mean_distance": float(result.distances.mean())}


def nearest_patches(model, dataset, k: int = 6, batch_size: int = 64, device=None,
                    amp: str = "auto"):
    """The ``k`` training images whose closest patch is nearest to each prototype (one patch per
    image, as the official ``find_k_nearest_patches_to_prototypes``), any class.

    Returns ``(distances [P, k], image_index [P, k], cell [P, k, 2])`` sorted nearest first.
    """
    device = device or next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    autocast, _ = autocast_for(device, amp)
    P = model.num_prototypes
    top_d = torch.full((P, 0), float("inf"), device=device)
    top_i = torch.zeros((P, 0), dtype=torch.long, device=device)
    top_c = torch.zeros((P, 0, 2), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    offset = 0
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            with autocast:
                features = model.add_on(model.backbone(batch["image"]))
            dist = model.distances_from_features(features.float())  # [B, P, h, w]
            B, _, h, w = dist.shape
            value, where = dist.flatten(2).min(2)  # [B, P]
            cells = torch.stack([where // w, where % w], -1).transpose(0, 1)  # [P, B, 2]
            idx = torch.arange(offset, offset + B, device=device).expand(P, B)
            all_d = torch.cat([top_d, value.t()], 1)
            all_i = torch.cat([top_i, idx], 1)
            all_c = torch.cat([top_c, cells], 1)
            keep = all_d.topk(min(k, all_d.shape[1]), dim=1, largest=False).indices
            top_d = all_d.gather(1, keep)
            top_i = all_i.gather(1, keep)
            top_c = all_c.gather(1, keep[..., None].expand(-1, -1, 2))
            offset += B
    model.train(was_training)
    return top_d, top_i, top_c


def labels_of(dataset, indices: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(dataset.labels))
    return labels[indices.cpu()]
