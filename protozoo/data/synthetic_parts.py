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

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from protozoo.errors import DataError

GENERATOR_NAME = "protozoo.synthetic-parts"
GENERATOR_VERSION = 1

# Mid-range colours, so a mean-preserving light/dark texture fits inside 0..255 on every channel.
PALETTE = (
    ("red", (200, 60, 60)),
    ("green", (60, 170, 70)),
    ("blue", (60, 90, 210)),
    ("yellow", (205, 185, 50)),
    ("purple", (150, 60, 185)),
    ("cyan", (50, 175, 190)),
)
PATTERNS = ("striped", "dotted", "checkered")
NUM_PETALS = len(PALETTE)  # one petal per palette colour: the colour multiset never changes
MAX_CLASSES = len(PALETTE) * len(PATTERNS)
SPLIT_CODES = {"train": 1, "test": 2}  # different streams, so train and test never share images

_PALETTE_RGB = np.array([rgb for _, rgb in PALETTE], dtype=np.float32)
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


# -- classes ------------------------------------------------------------------------------------
def class_combos(num_classes: int) -> list[tuple[int, int]]:
    """(colour index, pattern index) per class.

    The first six classes use six different colours (colour alone separates them once the textured
    petal is found); later classes reuse colours with another texture, so texture matters too.
    """
    if not 2 <= num_classes <= MAX_CLASSES:
        raise DataError(
            f"num_classes={num_classes} is not supported by synthetic-parts: use 2..{MAX_CLASSES}"
        )
    n_col, n_pat = len(PALETTE), len(PATTERNS)
    return [(k % n_col, (k + k // n_col) % n_pat) for k in range(num_classes)]


def class_names_for(num_classes: int) -> list[str]:
    return [f"{PALETTE[c][0]}-{PATTERNS[p]}" for c, p in class_combos(num_classes)]


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


@lru_cache(maxsize=8)
def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, computed once per size."""
    coords = np.arange(image_size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    ys.setflags(write=False)
    xs.setflags(write=False)
    return xs, ys


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
    xs, ys = _grid(image_size)
    dx, dy = xs[rows, cols] - px, ys[rows, cols] - py
    return rows, cols, dx * cos + dy * sin, -dx * sin + dy * cos


def _ownership(spec: FlowerSpec, image_size: int) -> np.ndarray:
    """int8 [S, S]: 0 background, 1..6 petal slot + 1, 7 body (painted last, on top)."""
    owner = np.zeros((image_size, image_size), dtype=np.int8)
    for k, (_, _, semi_major, semi_minor) in enumerate(spec.petals):
        rows, cols, u, v = _petal_window(spec, k, image_size)
        owner[rows, cols][(u / semi_major) ** 2 + (v / semi_minor) ** 2 <= 1.0] = k + 1
    xs, ys = _grid(image_size)
    body = (xs - spec.centre[0]) ** 2 + (ys - spec.centre[1]) ** 2 <= spec.body_radius**2
    owner[body] = NUM_PETALS + 1
    return owner


def _texture_bits(spec: FlowerSpec, mask: np.ndarray, image_size: int) -> np.ndarray:
    """bool per masked pixel (row-major order): the 'light' cells of the class texture."""
    rows, cols, u, v = _petal_window(spec, spec.slot, image_size)
    inside = mask[rows, cols]  # the petal lies inside its window, so this covers the whole mask
    half = max(2.0, round(image_size / 24))  # stripe / cell width in pixels
    u, v = u[inside] + spec.phase[0], v[inside] + spec.phase[1]
    name = PATTERNS[spec.pattern]
    if name == "striped":
        return np.floor(u / half) % 2 == 0
    if name == "checkered":
        return (np.floor(u / half) + np.floor(v / half)) % 2 == 0
    du = np.mod(u, 2 * half) - half  # dotted: dots covering ~half of each 2h x 2h cell
    dv = np.mod(v, 2 * half) - half
    return du**2 + dv**2 <= (0.8 * half) ** 2


def _textured_colours(spec: FlowerSpec, mask: np.ndarray, image_size: int) -> np.ndarray:
    """float [count, 3] colours of the discriminative petal's pixels, averaging to its colour."""
    base = _PALETTE_RGB[spec.colour]
    bits = _texture_bits(spec, mask, image_size).astype(np.float32)
    frac = float(bits.mean()) if bits.size else 0.0
    if frac in (0.0, 1.0):
        return np.broadcast_to(base, (bits.size, 3))
    offset = _TEXTURE_CONTRAST * np.minimum(base, 255.0 - base)
    weight = (bits - frac) / max(frac, 1.0 - frac)  # zero mean over the visible petal
    return base + weight[:, None] * offset


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
    rows, cols = np.flatnonzero((owner > 0).any(1)), np.flatnonzero((owner > 0).any(0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return Rendered(np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, box)


# -- many samples -------------------------------------------------------------------------------
def split_labels(count: int, num_classes: int, seed: int, split: str) -> np.ndarray:
    """Balanced labels (counts differ by at most one) in a seeded random order."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 0])
    return rng.permutation(np.arange(count) % num_classes)


def iter_specs(count: int, num_classes: int, image_size: int, seed: int, split: str):
    """Yield (index, spec).

    Image i's random layout comes from its own stream (seed, split, i), so it does not shift when
    ``count`` changes; only the balanced label sequence depends on ``count``.
    """
    if split not in SPLIT_CODES:
        raise DataError(f"unknown split '{split}': use one of {', '.join(SPLIT_CODES)}")
    labels = split_labels(count, num_classes, seed, split)
    for i in range(count):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], 1, i])
        yield i, sample_spec(rng, int(labels[i]), num_classes, image_size)


def generate_arrays(count: int, *, num_classes: int = 5, image_size: int = 64, seed: int = 0,
                    split: str = "train") -> dict:
    """In-memory samples: images uint8 [N,S,S,3], masks bool [N,S,S], boxes int [N,4], labels."""
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((count, image_size, image_size), dtype=bool)
    boxes = np.empty((count, 4), dtype=np.int64)
    labels = np.empty(count, dtype=np.int64)
    for i, spec in iter_specs(count, num_classes, image_size, seed, split):
        out = render(spec, image_size)
        images[i], masks[i], boxes[i], labels[i] = out.image, out.mask, out.box, spec.label
    return {"images": images, "masks": masks, "boxes": boxes, "labels": labels,
            "class_names": class_names_for(num_classes)}


def _check_args(num_train: int, num_test: int, num_classes: int, image_size: int) -> None:
    class_combos(num_classes)
    if image_size < 16:
        raise DataError(f"image_size={image_size} is too small for synthetic-parts: use 16 or more")
    if num_train < num_classes or num_test < num_classes:
        raise DataError(
            f"num_train={num_train} and num_test={num_test} must each be at least "
            f"num_classes={num_classes}, so every class appears in both splits"
        )


def _save_png(array: np.ndarray, path: Path) -> None:
    mode = "RGB" if array.ndim == 3 else "L"
    Image.fromarray(array, mode).save(path, compress_level=1)  # noise barely compresses anyway


def _write_split(split_root: Path, count: int, num_classes: int, image_size: int, seed: int,
                 split: str) -> None:
    names = class_names_for(num_classes)
    for name in names:
        (split_root / "images" / name).mkdir(parents=True)
        (split_root / "masks" / name).mkdir(parents=True)
    width = max(5, len(str(count - 1)))
    boxes = {}
    for i, spec in iter_specs(count, num_classes, image_size, seed, split):
        out = render(spec, image_size)
        rel = f"{names[spec.label]}/{i:0{width}d}.png"
        _save_png(out.image, split_root / "images" / rel)
        _save_png(out.mask.astype(np.uint8) * 255, split_root / "masks" / rel)
        boxes[rel] = list(out.box)
    with open(split_root / "boxes.json", "w") as fh:
        json.dump(boxes, fh, indent=0, sort_keys=True)


def _meta(num_train: int, num_test: int, num_classes: int, image_size: int, seed: int) -> dict:
    names = class_names_for(num_classes)
    return {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "params": {"num_train": num_train, "num_test": num_test, "num_classes": num_classes,
                   "image_size": image_size, "seed": seed},
        "class_names": names,
        "classes": [{"name": n, "colour": PALETTE[c][0], "pattern": PATTERNS[p]}
                    for n, (c, p) in zip(names, class_combos(num_classes), strict=True)],
        "palette": {name: list(rgb) for name, rgb in PALETTE},
        "parts": PART_DESCRIPTIONS,
        "layout": "<split>/images/<class>/<id>.png, <split>/masks/<class>/<id>.png (0/255), "
        "<split>/boxes.json {'<class>/<id>.png': [x0, y0, x1, y1]} (exclusive x1/y1)",
    }


def generate_synthetic_parts(root, num_train: int = 3000, num_test: int = 1000,
                             num_classes: int = 5, image_size: int = 64, seed: int = 0) -> Path:
    """Write the dataset under ``root`` (which must not exist or be empty); return ``root``.

    ``meta.json`` is written last, so its presence marks a complete dataset.
    """
    _check_args(num_train, num_test, num_classes, image_size)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise DataError(f"'{root}' is not empty: generate synthetic-parts into a new folder")
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        _write_split(root / split, count, num_classes, image_size, seed, split)
    meta = _meta(num_train, num_test, num_classes, image_size, seed)
    with open(root / "meta.json", "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    return root


def read_meta(root) -> dict | None:
    """The dataset's meta.json, or None when it is missing or unreadable (incomplete copy)."""
    try:
        with open(Path(root) / "meta.json") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _is_complete(root: Path, expected: dict) -> bool:
    meta = read_meta(root)
    keys = ("generator", "version", "params")
    return bool(meta) and all(meta.get(k) == expected[k] for k in keys)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PROTOZOO_CACHE") or Path.home() / ".cache" / "protozoo")


def ensure_synthetic_parts(cache_dir=None, num_classes: int = 5, image_size: int = 64,
                           seed: int = 0, num_train: int = 3000, num_test: int = 1000) -> Path:
    """Return a complete generated copy in ``cache_dir``, generating it only when needed.

    The folder name carries every parameter, test count included, so two configurations never
    share a folder. Generation goes to a temporary sibling that is renamed into place, so an
    interrupted run never leaves a half dataset that looks complete; a concurrent run that loses
    the rename race simply uses the winner's copy.
    """
    _check_args(num_train, num_test, num_classes, image_size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"synthetic-parts-c{num_classes}-s{image_size}-seed{seed}-n{num_train}-t{num_test}"
    final = cache_dir / name
    expected = _meta(num_train, num_test, num_classes, image_size, seed)
    if _is_complete(final, expected):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        generate_synthetic_parts(tmp, num_train, num_test, num_classes, image_size, seed)
        if final.exists() and not _is_complete(final, expected):
            shutil.rmtree(final)  # stale copy from an older generator version
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final, expected):  # lost a race to a broken copy: give up loudly
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
