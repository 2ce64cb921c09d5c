"""Accuracy and explanation metrics, batched on the device.

Explanation metrics compare a model's maps with ground truth (part masks and object boxes). Each
function takes batched tensors and returns *per-image* values so callers can sum them across
batches and processes; every explanation figure has a ``_chance`` companion, the score of a map
that carries no information, so a figure is always read against what vague evidence gets.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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


# ----------------------------------------------------------------------------- maps against parts
# Every metric below compares a pixel map ``[B, H, W]`` (larger = more evidence) with a binary
# ground-truth mask of the part that decides the class, and comes with its *chance level*: the
# score of a map that says nothing, i.e. a uniform map (equivalently a whole-image box). A vague
# explanation therefore scores chance, a map peaked on the part 1, a map peaked off it 0. The
# containment test used before 2026-12 ("the box covers most of the part") gave a whole-image box
# 1.0; these never do.

TIE = 1e-5  # pixels within TIE x the map's largest magnitude of its maximum tie for the peak


def region_side(image_size: int, fraction: float = 1 / 16) -> int:
    """Side in pixels of the fixed-size region around a peak: ``fraction`` of the image side,
    odd (so the region is centred on the peak pixel) and at least 3 (5 px at 64 px, 15 at 224).
    In the spirit of Huang et al.'s consistency score (EvalProtoPNet, ICCV 2023), which scores a
    fixed region around a prototype's peak against part annotations; smaller here, because a
    region larger than the part could never lie wholly on it."""
    side = max(3, int(round(image_size * fraction)))
    return side if side % 2 else side + 1


def peak_pixels(maps: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H, W]``: the pixels tied for each map's maximum (all of them for a flat map)."""
    flat = maps.float().flatten(1)
    top = flat.amax(1)
    scale = flat.abs().amax(1)
    return maps.float() >= (top - TIE * scale).view(-1, 1, 1)


def part_share(masks: torch.Tensor) -> torch.Tensor:
    """``[B]``: the part's share of the image -- the chance level of :func:`pointing` and of
    :func:`relevance_mass` (what a uniform map scores)."""
    return (masks > 0.5).flatten(1).float().mean(1)


def pointing(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Strict pointing game (Zhang et al., ECCV 2016, with no tolerance): does the map's maximum
    lie on the part? ``[B]`` in [0, 1]: the share of the maximal pixels on the part, so a single
    peak scores 1 or 0 and ties are shared rather than broken by pixel order -- a uniform map
    scores exactly :func:`part_share` (chance)."""
    peaks = peak_pixels(maps)
    hits = (peaks & (masks > 0.5)).flatten(1).sum(1).float()
    return hits / peaks.flatten(1).sum(1).float()


def region_fractions(masks: torch.Tensor, side: int) -> torch.Tensor:
    """``[B, H, W]``: for every pixel, the fraction of the ``side`` x ``side`` square centred on
    it that lies on the part (pixels outside the image count as off the part)."""
    if side % 2 == 0:
        raise ValueError(f"region side must be odd (centred on a pixel), got {side}")
    truth = (masks > 0.5).float()[:, None]
    return F.avg_pool2d(truth, side, stride=1, padding=side // 2, count_include_pad=True)[:, 0]


def region_on_part(maps: torch.Tensor, masks: torch.Tensor, side: int) -> torch.Tensor:
    """``[B]``: the fraction of the fixed ``side``-pixel square around the map's peak that lies on
    the part (averaged over tied peaks). Chance: :func:`region_chance`."""
    peaks = peak_pixels(maps).float()
    return (region_fractions(masks, side) * peaks).flatten(1).sum(1) / peaks.flatten(1).sum(1)


def region_chance(masks: torch.Tensor, side: int) -> torch.Tensor:
    """``[B]``: :func:`region_on_part` of a uniform map (a peak anywhere)."""
    return region_fractions(masks, side).flatten(1).mean(1)


def relevance_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Relevance mass accuracy (Arras et al., "CLEVR-XAI", Information Fusion 2022): the share
    of the map's positive mass that lies on the part, ``[B]``. Chance: :func:`part_share` (a
    uniform map; a map with no positive value is scored as uniform)."""
    positive = maps.float().clamp_min(0).flatten(1)
    total = positive.sum(1)
    on_part = (positive * (masks > 0.5).flatten(1)).sum(1)
    return torch.where(total > 0, on_part / total.clamp_min(1e-30), part_share(masks))


def map_scores(maps: torch.Tensor, masks: torch.Tensor, side: int,
               prefix: str = "") -> dict[str, torch.Tensor]:
    """Pointing, region-on-part and relevance mass of ``maps`` against ``masks``, each beside its
    ``_chance`` level: ``{prefix + name: [B]}``."""
    share = part_share(masks)
    return {f"{prefix}pointing": pointing(maps, masks), f"{prefix}pointing_chance": share,
            f"{prefix}region_on_part": region_on_part(maps, masks, side),
            f"{prefix}region_on_part_chance": region_chance(masks, side),
            f"{prefix}relevance_mass": relevance_mass(maps, masks),
            f"{prefix}relevance_mass_chance": share}


def localization_hits(maps: torch.Tensor, boxes: torch.Tensor, correct: torch.Tensor,
                      fraction: float = 0.2, min_iou: float = 0.5) -> torch.Tensor:
    """Zhou et al.'s localisation accuracy per image: right class and the box of the largest
    connected component of ``map >= fraction * max`` overlaps the true box with IoU >= 0.5."""
    maps_np, boxes_np = maps.float().cpu().numpy(), boxes.cpu().numpy()
    ious = [box_iou(threshold_box(m, fraction), b) for m, b in zip(maps_np, boxes_np)]
    return (torch.tensor(ious, device=maps.device) >= min_iou).float() * correct.float()


def cam_metrics(cams: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, image_size,
                masks: torch.Tensor | None = None,
                boxes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image CAM metrics for one batch, each beside its ``_chance`` level (the score of a
    uniform map). Against the part mask, on the *true* class's map (does the explanation of the
    right answer point at the evidence?): :func:`map_scores` (strict pointing, the region around
    the peak, relevance mass) and ``cam_iou``. Against the object's box, on the *predicted*
    class's map: Zhou et al.'s top-1 ``localization_accuracy`` (a uniform map localises the whole
    image, which is its chance level)."""
    idx = torch.arange(len(labels), device=cams.device)
    up = upsample(cams, tuple(image_size))
    out: dict[str, torch.Tensor] = {}
    if masks is not None:
        true_maps, m = up[idx, labels], masks[:, 0]
        out.update(map_scores(true_maps, m, region_side(int(image_size[-1]))))
        out["cam_iou"] = mask_iou(true_maps, m)
        out["cam_iou_chance"] = mask_iou(torch.ones_like(true_maps), m)
    if boxes is not None:
        correct = preds == labels
        out["localization_accuracy"] = localization_hits(up[idx, preds], boxes, correct)
        out["localization_accuracy_chance"] = localization_hits(
            torch.ones_like(up[idx, preds]), boxes, torch.ones_like(correct))
    return out
