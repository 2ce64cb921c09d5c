"""Synthetic "flowers" whose class is decided by one known part, with that part's exact mask.

In the spirit of an8flower (Oramas et al., "Visual Explanation by Interpretation", ICLR 2019): the
ground truth of *where* the evidence is lets explanation methods be scored, not only looked at.

Each image shows one flower: a round body and six elliptical petals at a random position, scale
and rotation, on a noisy background. The six petals always carry the six palette colours, one
each, in random order. Exactly one petal -- at a random slot -- is textured (striped, dotted or
checkered); **the class is the colour and texture of that petal** ("red-striped").

Why whole-image colour statistics carry no class information:

* every image contains all six palette colours on its petals, whatever the class;
* body and background colours are drawn from the same palette independently of the class;
* the texture is *mean-preserving*: light and dark shades of the petal's colour, balanced over the
  visible petal so the petal's average colour equals the solid colour.

So a model must find the one textured petal and read its colour (and, beyond six classes, its
texture); every pixel that carries class evidence lies inside that petal. The petals are drawn
into one ownership map that is also what paints the image, so ``mask`` marks exactly the pixels
painted by the discriminative petal (the body, drawn last, may hide its inner tip).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protozoo.data import generated as gen
from protozoo.data.generated import (  # noqa: F401  (re-exported: the cache's public names)
    PALETTE, SPLIT_CODES, default_cache_dir, read_meta, split_labels,
)

GENERATOR_VERSION = 1

PATTERNS = ("striped", "dotted", "checkered")
NUM_PETALS = len(PALETTE)  # one petal per palette colour: the colour multiset never changes
MAX_CLASSES = len(PALETTE) * len(PATTERNS)

_PALETTE_RGB = gen.PALETTE_RGB
_TEXTURE_CONTRAST = 0.9  # shade offset as a fraction of the room left on each channel
_BACKGROUND_MIX = 0.5  # background = palette colour mixed with grey, so the flower stands out
_BACKGROUND_NOISE = 6.0  # std of per-pixel background noise (grey levels)

PART_DESCRIPTIONS = {
    "background": "palette colour mixed 50% with grey plus per-pixel noise; independent of class",
    "body": "central disc drawn over the petals; solid palette colour independent of class",
    "petals": f"{NUM_PETALS} elliptical petals around the body, each a different palette colour",
    "discriminative_part": "the one textured petal at a random slot; its colour and texture "
    "(light/dark shades of the colour, mean-preserving) are the class; mask = its visible pixels",
}


# -- one sample ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlowerSpec:
    """Every random choice for one image; rendering is a pure function of this."""

    label: int
    colour: int  # palette index of the discriminative petal (its class colour)
    pattern: int  # index into PATTERNS
    centre: tuple[float, float]  # (x, y) in pixels
    petals: tuple[tuple[float, float, float, float], ...]  # (angle, distance, semi-axes a, b)
    petal_colours: tuple[int, ...]  # palette index per petal slot
    slot: int  # which petal is discriminative
    body_radius: float
    body_colour: int
    background: int
    phase: tuple[float, float]  # texture offset along / across the petal
    noise_seed: int


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # uint8 [S, S, 3]
    mask: np.ndarray  # bool [S, S], visible pixels of the discriminative petal
    box: tuple[int, int, int, int]  # xyxy of the whole flower, exclusive x1/y1


def sample_spec(rng: np.random.Generator, label: int, num_classes: int,
                image_size: int) -> FlowerSpec:
    """Draw the random layout of one flower of class ``label``."""
    colour, pattern = class_combos(num_classes)[label]
    radius = rng.uniform(0.30, 0.44) * image_size  # distance from centre to the farthest tip
    cx, cy = rng.uniform(radius + 1.0, image_size - radius - 1.0, size=2)
    start = rng.uniform(0.0, 2.0 * np.pi)
    petals = []
    for k in range(NUM_PETALS):
        angle = start + 2.0 * np.pi * k / NUM_PETALS + rng.uniform(-0.12, 0.12)
        tip = radius * rng.uniform(0.88, 1.0)
        semi_major = 0.36 * radius * rng.uniform(0.92, 1.08)
        semi_minor = 0.20 * radius * rng.uniform(0.92, 1.08)
        petals.append((float(angle), float(tip - semi_major), float(semi_major), float(semi_minor)))
    slot = int(rng.integers(NUM_PETALS))
    others = [c for c in rng.permutation(len(PALETTE)).tolist() if c != colour]
    petal_colours = others[:slot] + [colour] + others[slot:]
    return FlowerSpec(
        label=int(label), colour=colour, pattern=pattern, centre=(float(cx), float(cy)),
        petals=tuple(petals), petal_colours=tuple(petal_colours), slot=slot,
        body_radius=float(0.30 * radius), body_colour=int(rng.integers(len(PALETTE))),
        background=int(rng.integers(len(PALETTE))),
        phase=tuple(float(v) for v in rng.uniform(0.0, 64.0, size=2)),
        noise_seed=int(rng.integers(2**31)),
    )


def _petal_window(spec: FlowerSpec, k: int, image_size: int):
    """(row slice, col slice, u, v) for petal ``k``'s bounding square.

    u runs along the petal, v across it, origin at its centre. Working on the bounding square
    only (not the whole image) is what keeps generation at thousands of images per second.
    """
    angle, dist, semi_major, _ = spec.petals[k]
    cos, sin = np.cos(angle), np.sin(angle)
    px, py = spec.centre[0] + dist * cos, spec.centre[1] + dist * sin
    reach = semi_major + 1.0
    rows = slice(max(0, int(py - reach)), min(image_size, int(np.ceil(py + reach)) + 1))
    cols = slice(max(0, int(px - reach)), min(image_size, int(np.ceil(px + reach)) + 1))
    xs, ys = gen.pixel_grid(image_size)
    dx, dy = xs[rows, cols] - px, ys[rows, cols] - py
    return rows, cols, dx * cos + dy * sin, -dx * sin + dy * cos


def _ownership(spec: FlowerSpec, image_size: int) -> np.ndarray:
    """int8 [S, S]: 0 background, 1..6 petal slot + 1, 7 body (painted last, on top)."""
    owner = np.zeros((image_size, image_size), dtype=np.int8)
    for k, (_, _, semi_major, semi_minor) in enumerate(spec.petals):
        rows, cols, u, v = _petal_window(spec, k, image_size)
        owner[rows, cols][(u / semi_major) ** 2 + (v / semi_minor) ** 2 <= 1.0] = k + 1
    xs, ys = gen.pixel_grid(image_size)
    body = (xs - spec.centre[0]) ** 2 + (ys - spec.centre[1]) ** 2 <= spec.body_radius**2
    owner[body] = NUM_PETALS + 1
    return owner


def _texture_bits(spec: FlowerSpec, mask: np.ndarray, image_size: int) -> np.ndarray:
    """bool per masked pixel (row-major order): the 'light' cells of the class texture."""
    rows, cols, u, v = _petal_window(spec, spec.slot, image_size)
    inside = mask[rows, cols]  # the petal lies inside its window, so this covers the whole mask
    u, v = u[inside] + spec.phase[0], v[inside] + spec.phase[1]
    return gen.pattern_bits(PATTERNS[spec.pattern], u, v, gen.pattern_cell(image_size))


def _textured_colours(spec: FlowerSpec, mask: np.ndarray, image_size: int) -> np.ndarray:
    """float [count, 3] colours of the discriminative petal's pixels, averaging to its colour."""
    bits = _texture_bits(spec, mask, image_size)
    return gen.mean_preserving(_PALETTE_RGB[spec.colour], bits, _TEXTURE_CONTRAST)


def _background(spec: FlowerSpec, image_size: int) -> np.ndarray:
    colour = (1 - _BACKGROUND_MIX) * _PALETTE_RGB[spec.background] + _BACKGROUND_MIX * 128.0
    noise = np.random.default_rng(spec.noise_seed).standard_normal(
        (image_size, image_size, 3), dtype=np.float32)
    return colour + _BACKGROUND_NOISE * noise


def render(spec: FlowerSpec, image_size: int, sentinel=None) -> Rendered:
    """Paint ``spec``. ``sentinel`` (RGB) replaces the discriminative petal's colours (tests)."""
    owner = _ownership(spec, image_size)
    image = _background(spec, image_size)
    for k, colour in enumerate(spec.petal_colours):
        image[owner == k + 1] = _PALETTE_RGB[colour]
    image[owner == NUM_PETALS + 1] = _PALETTE_RGB[spec.body_colour]
    mask = owner == spec.slot + 1  # the same layer paints the part and is its ground truth
    if sentinel is None:
        image[mask] = _textured_colours(spec, mask, image_size)
    else:
        image[mask] = np.asarray(sentinel, dtype=np.float32)
    return Rendered(gen.to_uint8(image), mask, gen.box_of(owner > 0))


# -- the dataset (the steps every generator shares: protozoo.data.generated) -------------------
GENERATOR = gen.PartGenerator(
    name="synthetic-parts", version=GENERATOR_VERSION, patterns=PATTERNS,
    sample_spec=sample_spec, render=render, parts=PART_DESCRIPTIONS, min_image_size=16)
# Module-level names (the API from before GENERATOR). The first six classes use six different
# colours (colour alone separates them once the textured petal is found); later classes reuse
# colours with another texture, so texture matters too.
class_combos = GENERATOR.class_combos
class_names_for = GENERATOR.class_names
iter_specs = GENERATOR.iter_specs
generate_arrays = GENERATOR.arrays
generate_synthetic_parts = GENERATOR.generate
ensure_synthetic_parts = GENERATOR.ensure
