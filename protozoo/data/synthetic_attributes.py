"""Synthetic objects whose classes are combinations of attributes: a zero-shot benchmark with
ground truth.

Every image shows one object on a noisy grey background. The object has three attributes, one
value from each group: a **shape** (circle, square, triangle, cross), a **colour** (red, green,
blue, yellow) and a **pattern** (solid, striped, dotted). A class is one combination
("red-square-striped"), so there are 4 x 4 x 3 = 48 classes and a binary class-attribute matrix
(one-hot per group, 11 named attributes).

A seeded set of combinations (10 by default) is held out as *unseen* classes: the seen classifier
never sees an image of them, and zero-shot methods must recognise them from their attribute
vectors alone. The held-out set is drawn so that, among the seen classes, every attribute value
and every *pair* of values of an unseen class (shape-colour, shape-pattern, colour-pattern) still
occurs, so an unseen class is a new composition of things the seen classes show.

Nuisances that carry no class information: position, size and rotation of the object, a random
colour jitter, the stripe orientation and phase, the dot-lattice phase, the background grey level
and per-pixel noise. Each image comes with the exact mask of the object (the pixels the object
paints) and its box.

The data is generated with numpy in a few seconds and cached (like ``synthetic-parts``) in a
folder whose name carries every parameter; it is written to a temporary sibling and renamed into
place, so an interrupted run never leaves a copy that looks complete. Files: ``train.npz`` (seen
classes only) and ``test.npz`` (seen and unseen classes), each with ``images`` uint8 [N,S,S,3],
``masks`` bool [N,S,S], ``boxes`` int [N,4] (xyxy, exclusive end) and ``labels`` (index into
``meta.json``'s ``class_names``: seen classes first, then unseen); ``meta.json`` last.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protozoo.data.base import ImageDataset, ImageStore
from protozoo.data.generated import default_cache_dir, ensure_generated, pixel_grid, read_meta
from protozoo.data.zero_shot import ZeroShotSplit
from protozoo.errors import DataError

GENERATOR_NAME = "protozoo.synthetic-attributes"
GENERATOR_VERSION = 1
DATA_SEED = 0  # the images and the unseen split do not follow the run seed (see data/__init__)
DEFAULTS = {"num_train": 7600, "num_test": 2400, "num_unseen": 10}

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = (("red", (205, 50, 45)), ("green", (45, 165, 60)), ("blue", (45, 80, 215)),
           ("yellow", (225, 200, 35)))
PATTERNS = ("solid", "striped", "dotted")
GROUPS = (("shape", SHAPES), ("colour", tuple(n for n, _ in COLOURS)), ("pattern", PATTERNS))
ATTRIBUTE_NAMES = [f"{group}:{value}" for group, values in GROUPS for value in values]

_RGB = np.array([rgb for _, rgb in COLOURS], dtype=np.float32)
_SHADE = 0.45  # stripes and dots are the object's colour at this brightness
_SPLIT_CODES = {"train": 1, "test": 2}  # separate random streams: no image is in both splits


# -- classes and the unseen split --------------------------------------------------------------
def all_combos() -> list[tuple[int, int, int]]:
    """(shape, colour, pattern) indices of every class, in grid order."""
    return list(itertools.product(range(len(SHAPES)), range(len(COLOURS)), range(len(PATTERNS))))


def combo_name(combo: tuple[int, int, int]) -> str:
    shape, colour, pattern = combo
    return f"{COLOURS[colour][0]}-{SHAPES[shape]}-{PATTERNS[pattern]}"


def combo_attributes(combo: tuple[int, int, int]) -> np.ndarray:
    """The binary attribute vector (one-hot per group) of a class."""
    vec = np.zeros(len(ATTRIBUTE_NAMES), dtype=np.float32)
    offsets = np.cumsum([0] + [len(values) for _, values in GROUPS[:-1]])
    for offset, value in zip(offsets, combo):
        vec[offset + value] = 1.0
    return vec


def _covered(unseen: list[tuple], seen: list[tuple]) -> bool:
    """Every value, and every pair of values of each unseen class, occurs among the seen."""
    for g in range(len(GROUPS)):
        if {c[g] for c in seen} != set(range(len(GROUPS[g][1]))):
            return False
    for combo in unseen:
        for a, b in itertools.combinations(range(len(GROUPS)), 2):
            if not any(c[a] == combo[a] and c[b] == combo[b] for c in seen):
                return False
    return True


def unseen_combos(num_unseen: int, seed: int) -> list[tuple[int, int, int]]:
    """A seeded held-out set satisfying :func:`_covered`, with the values of every group spread
    as evenly as possible over the unseen classes (so no value is mostly unseen)."""
    combos = all_combos()
    if not 1 <= num_unseen <= len(combos) // 2:
        raise DataError(f"num_unseen={num_unseen} is not supported by synthetic-attributes: use "
                        f"1..{len(combos) // 2} (the seen classes must cover every attribute)")
    rng = np.random.default_rng([seed, 7])
    for _ in range(10_000):
        picked = [combos[i] for i in sorted(rng.choice(len(combos), num_unseen, replace=False))]
        counts_ok = all(
            max(np.bincount([c[g] for c in picked], minlength=len(values)))
            <= -(-num_unseen // len(values))
            for g, (_, values) in enumerate(GROUPS))
        seen = [c for c in combos if c not in picked]
        if counts_ok and _covered(picked, seen):
            return picked
    raise DataError(f"could not draw {num_unseen} unseen classes that keep every attribute "
                    "seen; use fewer unseen classes")


def class_split(num_unseen: int, seed: int) -> tuple[list[tuple], list[tuple]]:
    """(seen combos, unseen combos), each in grid order."""
    unseen = unseen_combos(num_unseen, seed)
    return [c for c in all_combos() if c not in unseen], unseen


# -- one image ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectSpec:
    """Every random choice for one image; rendering is a pure function of this."""

    combo: tuple[int, int, int]
    centre: tuple[float, float]
    radius: float
    angle: float
    rgb: tuple[float, float, float]
    texture_angle: float
    texture_phase: tuple[float, float]
    background: float
    noise_seed: int


def sample_spec(rng: np.random.Generator, combo, image_size: int) -> ObjectSpec:
    radius = float(rng.uniform(0.30, 0.42) * image_size)
    cx, cy = rng.uniform(radius, image_size - radius, size=2)
    jitter = rng.uniform(-18, 18, size=3)
    return ObjectSpec(
        combo=tuple(int(v) for v in combo), centre=(float(cx), float(cy)), radius=radius,
        angle=float(rng.uniform(0, 2 * np.pi)),
        rgb=tuple(float(v) for v in np.clip(_RGB[combo[1]] + jitter, 0, 255)),
        texture_angle=float(rng.uniform(0, np.pi)),
        texture_phase=tuple(float(v) for v in rng.uniform(0, 16, size=2)),
        background=float(rng.uniform(95, 165)), noise_seed=int(rng.integers(2**31)))


def _local_coords(spec: ObjectSpec, image_size: int, angle: float):
    """Pixel-centre coordinates rotated by ``angle`` about the object centre."""
    xs, ys = pixel_grid(image_size)
    dx, dy = xs - spec.centre[0], ys - spec.centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * cos + dy * sin, -dx * sin + dy * cos


def shape_mask(spec: ObjectSpec, image_size: int) -> np.ndarray:
    """bool [S, S]: the pixels whose centre lies inside the (rotated) shape."""
    u, v = _local_coords(spec, image_size, spec.angle)
    u, v = u / spec.radius, v / spec.radius  # the shape fits the unit disc
    name = SHAPES[spec.combo[0]]
    if name == "circle":
        return u * u + v * v <= 0.85
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if name == "triangle":  # equilateral, circumradius 1: three half-planes at 120 degrees
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            t = 2 * np.pi * k / 3
            inside &= u * np.cos(t) + v * np.sin(t) <= 0.5
        return inside
    arm = 0.3  # cross: two bars of half-width 0.3
    return ((np.abs(u) <= arm) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= arm) & (np.abs(u) <= 0.95))


def pattern_mask(spec: ObjectSpec, image_size: int) -> np.ndarray:
    """bool [S, S]: where the object shows its dark shade (stripes or dots; none when solid)."""
    period = max(4.0, image_size / 8)
    u, v = _local_coords(spec, image_size, spec.texture_angle)
    u, v = u + spec.texture_phase[0], v + spec.texture_phase[1]
    name = PATTERNS[spec.combo[2]]
    if name == "striped":
        return np.mod(u, period) < period / 2
    if name == "dotted":
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return du * du + dv * dv <= (0.3 * period) ** 2
    return np.zeros((image_size, image_size), dtype=bool)


def render(spec: ObjectSpec, image_size: int):
    """(image uint8 [S,S,3], mask bool [S,S], box (x0, y0, x1, y1) exclusive end)."""
    noise = np.random.default_rng(spec.noise_seed).standard_normal(
        (image_size, image_size, 3), dtype=np.float32)
    image = spec.background + 7.0 * noise
    mask = shape_mask(spec, image_size)
    colour = np.asarray(spec.rgb, dtype=np.float32)
    image[mask] = colour
    image[mask & pattern_mask(spec, image_size)] = _SHADE * colour
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, box


# -- splits, cache -----------------------------------------------------------------------------
def _labels_round_robin(count: int, num_classes: int, rng) -> np.ndarray:
    """Balanced labels (counts differ by at most one) in a seeded order."""
    return rng.permutation(np.arange(count) % num_classes)


def generate_split(combos: list[tuple], label_offset: int, count: int, image_size: int,
                   seed: int, split: str) -> dict:
    """``count`` images spread evenly over ``combos``; label = ``label_offset`` + combo index."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], label_offset])
    labels = _labels_round_robin(count, len(combos), rng)
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((count, image_size, image_size), dtype=bool)
    boxes = np.empty((count, 4), dtype=np.int64)
    for i, k in enumerate(labels):
        images[i], masks[i], boxes[i] = render(sample_spec(rng, combos[k], image_size), image_size)
    return {"images": images, "masks": masks, "boxes": boxes, "labels": labels + label_offset}


def _check_args(num_train: int, num_test: int, num_unseen: int, image_size: int) -> None:
    total = len(all_combos())
    if image_size < 16:
        raise DataError(f"image_size={image_size} is too small for synthetic-attributes: use 16 "
                        "or more")
    if num_train < total - num_unseen or num_test < total:
        raise DataError(f"num_train={num_train} must be at least the {total - num_unseen} seen "
                        f"classes and num_test={num_test} at least all {total} classes")


def _meta(num_train, num_test, num_unseen, image_size, seed) -> dict:
    seen, unseen = class_split(num_unseen, seed)
    combos = seen + unseen
    return {
        "generator": GENERATOR_NAME, "version": GENERATOR_VERSION,
        "params": {"num_train": num_train, "num_test": num_test, "num_unseen": num_unseen,
                   "image_size": image_size, "seed": seed},
        "class_names": [combo_name(c) for c in combos],
        "num_seen": len(seen),
        "attribute_names": ATTRIBUTE_NAMES,
        "attribute_groups": {g: [f"{g}:{v}" for v in values] for g, values in GROUPS},
        "class_attributes": [combo_attributes(c).astype(int).tolist() for c in combos],
    }


def generate_synthetic_attributes(root, num_train: int = DEFAULTS["num_train"],
                                  num_test: int = DEFAULTS["num_test"],
                                  num_unseen: int = DEFAULTS["num_unseen"], image_size: int = 32,
                                  seed: int = DATA_SEED) -> Path:
    """Write the dataset into ``root`` (new or empty); ``meta.json`` last marks it complete.

    ``num_train`` images of the seen classes only; ``num_test`` images spread over all classes
    (seen and unseen), for generalised zero-shot evaluation."""
    _check_args(num_train, num_test, num_unseen, image_size)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise DataError(f"'{root}' is not empty: generate synthetic-attributes into a new folder")
    root.mkdir(parents=True, exist_ok=True)
    meta = _meta(num_train, num_test, num_unseen, image_size, seed)
    seen, unseen = class_split(num_unseen, seed)
    np.savez(root / "train.npz", **generate_split(seen, 0, num_train, image_size, seed, "train"))
    np.savez(root / "test.npz", **generate_split(seen + unseen, 0, num_test, image_size, seed,
                                                 "test"))
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return root


def ensure_synthetic_attributes(cache_dir, num_train: int = DEFAULTS["num_train"],
                                num_test: int = DEFAULTS["num_test"],
                                num_unseen: int = DEFAULTS["num_unseen"], image_size: int = 32,
                                seed: int = DATA_SEED) -> Path:
    """A complete cached copy (generated only when missing), renamed into place atomically."""
    _check_args(num_train, num_test, num_unseen, image_size)
    name = (f"synthetic-attributes-v{GENERATOR_VERSION}-s{image_size}-seed{seed}-u{num_unseen}"
            f"-n{num_train}-t{num_test}")
    # keys=None: the whole meta must match (it holds the class split, which the seed decides)
    return ensure_generated(
        cache_dir, name, _meta(num_train, num_test, num_unseen, image_size, seed),
        lambda tmp: generate_synthetic_attributes(tmp, num_train, num_test, num_unseen,
                                                  image_size, seed), keys=None)


def _dataset(arrays, keep: np.ndarray, labels: np.ndarray, class_names, split: str, mean, std):
    """An in-memory dataset (with masks and boxes) of the items ``keep`` of one split."""
    images = arrays["images"][keep]
    paths = [f"synthetic-attributes/{split}/{class_names[k]}/{i:05d}"
             for i, k in zip(np.flatnonzero(keep), labels)]
    store = ImageStore.from_arrays(images, labels, paths)
    store.masks = torch.from_numpy(arrays["masks"][keep][:, None].astype(np.uint8))
    store.boxes = torch.from_numpy(arrays["boxes"][keep].astype(np.float32))
    store.has_masks = store.has_boxes = True
    return ImageDataset(store, class_names, mean=mean, std=std)


def load_synthetic_attributes(root, mean=(0.5,) * 3, std=(0.5,) * 3):
    """(train of seen classes, test of seen classes, :class:`ZeroShotSplit`) from a generated
    folder. Seen datasets label the seen classes 0..S-1; the unseen test set labels its images
    S..S+U-1, their index in ``ZeroShotSplit.class_names``."""
    root = Path(root)
    meta = read_meta(root)
    if meta is None or meta.get("generator") != GENERATOR_NAME:
        raise DataError(f"'{root}' is not a complete synthetic-attributes folder: delete it and "
                        "generate it again")
    names, num_seen = meta["class_names"], int(meta["num_seen"])
    with np.load(root / "train.npz") as train_npz, np.load(root / "test.npz") as test_npz:
        train_arrays, test_arrays = dict(train_npz), dict(test_npz)
    seen_names = names[:num_seen]
    train = _dataset(train_arrays, np.ones(len(train_arrays["labels"]), bool),
                     train_arrays["labels"], seen_names, "train", mean, std)
    is_seen = test_arrays["labels"] < num_seen
    test = _dataset(test_arrays, is_seen, test_arrays["labels"][is_seen], seen_names, "test",
                    mean, std)
    unseen_test = _dataset(test_arrays, ~is_seen, test_arrays["labels"][~is_seen], names, "test",
                           mean, std)
    split = ZeroShotSplit(class_names=names, num_seen=num_seen,
                          attribute_names=list(meta["attribute_names"]),
                          class_attributes=np.asarray(meta["class_attributes"], np.float32),
                          unseen_test=unseen_test,
                          attribute_groups=dict(meta["attribute_groups"]))
    return train, test, split, meta


def bundle_loader(a: dict):
    """``build_data``'s loader: (train, test, the bundle's ``root``, ``meta`` and ``zero_shot``).

    ``num_train``/``num_test`` configure the generator (defaults 7600/2400); ``num_classes``, if
    given, must equal the number of seen classes (the grid fixes it)."""
    num_seen = len(all_combos()) - DEFAULTS["num_unseen"]
    if a.get("num_classes") is not None and int(a["num_classes"]) != num_seen:
        raise DataError(f"num_classes={a['num_classes']} but synthetic-attributes has {num_seen} "
                        "seen classes (the attribute grid fixes them): leave num_classes unset")
    root = ensure_synthetic_attributes(
        a["cache_dir"] if a.get("cache_dir") is not None else default_cache_dir(),
        num_train=a.get("num_train") or DEFAULTS["num_train"],
        num_test=a.get("num_test") or DEFAULTS["num_test"], image_size=a["image_size"])
    train, test, split, meta = load_synthetic_attributes(root, a["mean"], a["std"])
    return train, test, {"root": str(root), "meta": meta, "zero_shot": split}
