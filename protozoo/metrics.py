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
