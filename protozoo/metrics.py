"""Accuracy and explanation metrics, batched on the device.

Explanation metrics compare a model's maps with ground truth (masks and boxes from
``synthetic-parts`` or CUB). Each function takes batched tensors and returns *per-image* values so
callers can sum them across batches and processes.
"""
from __future__ import annotations

import numpy as np
import torch

from .maps import box_iou, threshold_box, upsample


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class (NaN for classes absent from ``labels``)."""
    acc = np.full(num_classes, np.nan)
    for k in range(num_classes):
        hit = labels == k
        if hit.any():
            acc[k] = float((preds[hit] == k).mean())
    return acc


def mean_class_accuracy(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    return float(np.nanmean(per_class_accuracy(preds, labels, num_classes)))


def mask_iou(maps: torch.Tensor, masks: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    """IoU of ``maps >= fraction * max`` with binary ``masks``; both ``[B, H, W]`` -> ``[B]``."""
    peak = maps.flatten(1).amax(1).view(-1, 1, 1)
    pred = maps >= fraction * peak
    truth = masks > 0.5
    inter = (pred & truth).flatten(1).sum(1).float()
    union = (pred | truth).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: float = 15.0) -> torch.Tensor:
    """Zhang et al.'s pointing game: 1 where the map's maximum lies within ``tolerance`` pixels of
    the mask (0 = strictly inside); ``[B, H, W]`` maps and masks -> ``[B]`` of 0/1."""
    b, h, w = maps.shape
    flat = maps.flatten(1).argmax(1)
    py, px = (flat // w).view(b, 1, 1).float(), (flat % w).view(b, 1, 1).float()
    ys = torch.arange(h, device=maps.device).view(1, h, 1).float()
    xs = torch.arange(w, device=maps.device).view(1, 1, w).float()
    dist2 = (ys - py) ** 2 + (xs - px) ** 2
    dist2 = torch.where(masks > 0.5, dist2, torch.full_like(dist2, float("inf")))
    return (dist2.flatten(1).amin(1) <= tolerance ** 2).float()


def localization_hits(maps: torch.Tensor, boxes: torch.Tensor, correct: torch.Tensor,
                      fraction: float = 0.2, min_iou: float = 0.5) -> torch.Tensor:
    """Zhou et al.'s localisation accuracy per image: right class and the box of the largest
    connected component of ``map >= fraction * max`` overlaps the true box with IoU >= 0.5."""
    maps_np, boxes_np = maps.float().cpu().numpy(), boxes.cpu().numpy()
    ious = [box_iou(threshold_box(m, fraction), b) for m, b in zip(maps_np, boxes_np)]
    return (torch.tensor(ious, device=maps.device) >= min_iou).float() * correct.float()


def cam_metrics(cams: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, image_size,
                masks: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                tolerance: float = 15.0) -> dict[str, torch.Tensor]:
    """Per-image CAM metrics for one batch: ``cam_iou`` and ``pointing_game`` on the true class's
    map (does the explanation of the right answer point at the part?), ``localization_accuracy``
    on the predicted class's map (the paper's top-1 localisation)."""
    idx = torch.arange(len(labels), device=cams.device)
    up = upsample(cams, tuple(image_size))
    out: dict[str, torch.Tensor] = {}
    if masks is not None:
        true_maps, m = up[idx, labels], masks[:, 0]
        out["cam_iou"] = mask_iou(true_maps, m)
        out["pointing_game"] = pointing_game(true_maps, m, tolerance)
        out["pointing_game_strict"] = pointing_game(true_maps, m, 0.0)
    if boxes is not None:
        out["localization_accuracy"] = localization_hits(up[idx, preds], boxes, preds == labels)
    return out


# ----------------------------------------------------------------------------- ProtoPNet evidence
# "Overlaps the part" for a box and a ground-truth mask: the overlap coefficient (Szymkiewicz-
# Simpson) |box & mask| / min(|box|, |mask|) is at least 0.5, i.e. the box lies mostly on the part
# or covers most of it. IoU would punish a small box sitting entirely on a large part (or a box
# slightly larger than a tiny part), and both are the evidence we want to count.
PART_OVERLAP = 0.5


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes ``[N, 4]`` ``(x0, y0, x1, y1)`` (exclusive end, pixels) -> bool masks ``[N, H, W]``
    of the pixels whose centre lies inside each box."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    ys = torch.arange(height, device=boxes.device, dtype=torch.float32).view(1, -1, 1) + 0.5
    xs = torch.arange(width, device=boxes.device, dtype=torch.float32).view(1, 1, -1) + 0.5
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def box_mask_overlap(boxes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Overlap coefficient ``|box & mask| / min(|box|, |mask|)`` of boxes ``[N, 4]`` and binary
    masks ``[N, H, W]`` -> ``[N]`` in [0, 1]; 0 where the box or the mask is empty."""
    truth = masks > 0.5
    inside = box_masks(torch.as_tensor(boxes).to(masks.device), *truth.shape[-2:])
    inter = (inside & truth).flatten(1).sum(1).float()
    smaller = torch.minimum(inside.flatten(1).sum(1), truth.flatten(1).sum(1)).float()
    return torch.where(smaller > 0, inter / smaller.clamp(min=1), torch.zeros_like(inter))


def prototype_purity(provenance: list[dict], push_dataset,
                     threshold: float = PART_OVERLAP) -> float:
    """Fraction of prototypes whose source patch lies on the class-discriminative part.

    A prototype's source patch is the high-activation box of its push provenance (95th percentile
    of its similarity map on its source image, Chen et al.); the part is the ground-truth mask of
    that image (``push_dataset[image_index]["mask"]``). The patch counts when the overlap
    coefficient ``|box & mask| / min(|box|, |mask|) >= threshold`` (0.5): the box lies mostly on
    the part, or covers most of it. NaN when there are no prototypes.
    """
    if not provenance:
        return float("nan")
    if not getattr(push_dataset, "has_masks", True):
        raise ValueError("prototype_purity needs a dataset with part masks (has_masks=True)")
    masks = torch.stack([push_dataset[int(r["image_index"])]["mask"][0] for r in provenance])
    boxes = torch.tensor([r["high_activation_box"] for r in provenance], dtype=torch.float32)
    return float((box_mask_overlap(boxes, masks) >= threshold).float().mean())


def evidence_on_part(model, output, batch: dict, percentile: float = 95.0,
                     threshold: float = PART_OVERLAP) -> torch.Tensor:
    """Per test image: does the model's strongest evidence for its prediction lie on the part?

    The evidence is the prototype with the largest contribution (similarity x last-layer weight)
    to the predicted class; its patch on the image is the high-activation box of its similarity
    map upsampled to the image (``percentile``-th percentile, :func:`maps.percentile_box`, the
    same rule as push provenance and the evidence report). A hit is an overlap coefficient
    ``|box & mask| / min(|box|, |mask|) >= threshold`` (0.5) with ``batch["mask"]``
    ``[B, 1, H, W]``: the box lies mostly on the part, or covers most of it. Returns float ``[B]``
    of 0/1.
    """
    from .maps import percentile_box

    masks = batch["mask"][:, 0]
    idx = torch.arange(len(masks), device=output.logits.device)
    preds = output.logits.argmax(1)
    top = model.contributions(output)[idx, preds].argmax(1)  # [B]
    maps = output.similarity_maps[idx, top]  # [B, h, w]
    up = upsample(maps[:, None], tuple(masks.shape[-2:]))[:, 0].cpu().numpy()
    boxes = torch.tensor([percentile_box(m, percentile) for m in up], dtype=torch.float32)
    return (box_mask_overlap(boxes, masks) >= threshold).float()
