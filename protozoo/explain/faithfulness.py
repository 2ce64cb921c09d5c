"""Faithfulness: does the map rank first the pixels the prediction depends on?

Deletion and insertion (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation
of Black-box Models", BMVC 2018): pixels are removed from the image (deletion) or added to a
baseline image (insertion) in the order of the map, highest first, ``steps`` equal blocks at a
time, and the curve is the softmax probability of the target class after each block. A faithful
map makes the deletion curve fall fast (low area under it) and the insertion curve rise fast
(high area). The area is the trapezoid rule over the *fraction* of pixels changed, in [0, 1].

The x-axis is the number of pixels changed, counted on the masks actually applied: it rises by
``H * W / steps`` (rounded) per step, so both curves are monotone in it by construction; the
probabilities need not be. Ties in a map (a flat region, a map clipped at 0) are broken in a
random order drawn from ``seed``, never in raster order, which would favour the top-left.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError

BASELINES = ("zero", "blur")


def baseline_images(images: torch.Tensor, baseline: str = "zero",
                    blur_sigma: float | None = None) -> torch.Tensor:
    """What a removed pixel becomes. ``zero``: 0 after normalisation, i.e. the normalisation
    mean (grey for the built-in CNNs); ``blur``: the image under a Gaussian blur of standard
    deviation ``blur_sigma`` pixels (default: image side / 16), Petsiuk et al.'s insertion
    baseline, which removes detail without adding a colour the data never shows."""
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline != "blur":
        raise UserError(f"unknown deletion baseline '{baseline}': use one of "
                        f"{', '.join(BASELINES)}")
    sigma = float(blur_sigma or images.shape[-1] / 16)
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    radius_h, radius_w = min(radius, images.shape[-2] - 1), min(radius, images.shape[-1] - 1)
    out = F.pad(images, (radius_w, radius_w, radius_h, radius_h), mode="reflect")
    if radius_w < radius or radius_h < radius:  # a kernel wider than the image: pad the rest
        extra_w, extra_h = radius - radius_w, radius - radius_h
        out = F.pad(out, (extra_w, extra_w, extra_h, extra_h), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def pixel_order(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``[B, H*W]``: each pixel's position in the map's order (0 = the highest value); ties in
    a seeded random order."""
    b, n = maps.shape[0], maps[0].numel()
    g = torch.Generator().manual_seed(seed)
    shuffle = torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).to(maps.device)
    values = maps.reshape(b, n).float().gather(1, shuffle)
    ranked = shuffle.gather(1, torch.argsort(values, dim=1, descending=True, stable=True))
    position = torch.empty_like(ranked)
    position.scatter_(1, ranked, torch.arange(n, device=maps.device).expand(b, -1))
    return position


def step_counts(num_pixels: int, steps: int) -> list[int]:
    """Pixels changed after each of the ``steps + 1`` evaluations, 0 to ``num_pixels``."""
    if steps < 1:
        raise UserError(f"deletion steps must be at least 1, got {steps}")
    return [round(i * num_pixels / steps) for i in range(steps + 1)]


@torch.no_grad()
def deletion_insertion(model, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                       steps: int = 16, baseline: str = "zero", blur_sigma: float | None = None,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves of ``maps`` ``[B, H, W]`` on ``images`` ``[B, C, H, W]``.

    Returns ``pixels`` ``[steps + 1]`` (pixels changed, counted on the masks applied, identical
    for every image), ``deletion`` and ``insertion`` ``[B, steps + 1]`` (softmax probability of
    ``target``) and ``deletion_auc``, ``insertion_auc`` ``[B]``. Deletion starts at the original
    image and ends at the baseline image; insertion starts at the baseline and ends at the
    original. Memory: one batch of images at a time (``2 * (steps + 1)`` forward passes)."""
    was = model.training
    model.eval()
    try:
        base = baseline_images(images, baseline, blur_sigma)
        position = pixel_order(maps, seed).view(maps.shape)[:, None]  # [B, 1, H, W]
        counts = step_counts(maps[0].numel(), steps)
        pixels, deletion, insertion = [], [], []
        idx = torch.arange(len(images), device=images.device)
        for k in counts:
            changed = position < k
            n = changed.flatten(1).sum(1)
            if not bool((n == n[0]).all()):
                raise RuntimeError("deletion masks of one step changed different pixel counts")
            pixels.append(int(n[0]))
            for curve, start, end in ((deletion, images, base), (insertion, base, images)):
                x = torch.where(changed, end, start)
                curve.append(torch.softmax(model(x).logits.float(), 1)[idx, target])
    finally:
        model.train(was)
    deletion_t, insertion_t = torch.stack(deletion, 1), torch.stack(insertion, 1)
    fractions = torch.tensor(pixels, dtype=torch.float32, device=images.device) / maps[0].numel()
    return {"pixels": torch.tensor(pixels), "deletion": deletion_t, "insertion": insertion_t,
            "deletion_auc": torch.trapezoid(deletion_t, fractions, dim=1),
            "insertion_auc": torch.trapezoid(insertion_t, fractions, dim=1)}


def remove_top(images: torch.Tensor, maps: torch.Tensor, fraction: float,
               fill: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """ROAR's modification (Hooker et al., NeurIPS 2019): the ``fraction`` of pixels the map
    ranks highest (ties in a seeded random order) set to ``fill`` (``[C]``, e.g. the training
    set's per-channel mean), in every channel."""
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"a fraction of pixels must lie in [0, 1], got {fraction}")
    k = round(fraction * maps[0].numel())
    changed = (pixel_order(maps, seed).view(maps.shape) < k)[:, None]
    return torch.where(changed, fill.view(1, -1, 1, 1).to(images), images)
