"""Image overlays: heatmaps blended over images and boxes drawn on them (uint8 arrays)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _resize(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5,
                    cmap: str = "jet") -> np.ndarray:
    """Blend ``heat`` (any size; min-max normalised, upsampled bilinearly) over an RGB uint8
    ``image`` [H, W, 3]; returns uint8 [H, W, 3]."""
    from matplotlib import colormaps

    h, w = image.shape[:2]
    heat = _resize(heat, (h, w)) if heat.shape != (h, w) else np.asarray(heat, dtype=np.float32)
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    colour = colormaps[cmap](norm)[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colour, 0, 255).astype(np.uint8)


def draw_box(image: np.ndarray, box, colour=(255, 255, 0), width: int = 1) -> np.ndarray:
    """Copy of ``image`` with the outline of ``box = (x0, y0, x1, y1)`` (exclusive end)."""
    out = image.copy()
    h, w = out.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return out
    c = np.asarray(colour, dtype=np.uint8)
    out[y0:min(y0 + width, y1), x0:x1] = c
    out[max(y1 - width, y0):y1, x0:x1] = c
    out[y0:y1, x0:min(x0 + width, x1)] = c
    out[y0:y1, max(x1 - width, x0):x1] = c
    return out


def mask_outline(image: np.ndarray, mask: np.ndarray, colour=(230, 0, 0)) -> np.ndarray:
    """Copy of ``image`` with the edge of the boolean ``mask`` [H, W] painted ``colour``: the mask
    pixels with a 4-neighbour outside it (the image wraps around at its borders)."""
    inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) \
        & np.roll(mask, -1, 1)
    out = image.copy()
    out[mask & ~inner] = colour
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling so small images (64 px) stay legible in reports."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def save_png(path, image: np.ndarray) -> None:
    from PIL import Image

    from ..fileio import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
