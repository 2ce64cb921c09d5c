"""What the built-in generators share: the cache, the on-disk layout, label streams, textures.

A ground-truth part generator (synthetic-parts, synthetic-birds) supplies only its drawing --
``sample_spec`` and ``render`` in a :class:`PartGenerator` -- and gets the rest from here: samples
``(label, image uint8 [S,S,3], mask bool [S,S], box (x0, y0, x1, y1))`` are written in the
layout :func:`protozoo.data.folder.load_split_folder` reads (:data:`LAYOUT`), ``meta.json`` last
(its presence marks a complete copy), one copy per parameter set in the cache
(:func:`ensure_generated`, which the other generated datasets use too).

Random streams: a split's balanced labels come from the stream ``(seed, split, 0)`` and image
i's layout from its own stream ``(seed, split, 1, i)`` (:func:`sample_streams`), so an image does
not change when the count does, and train and test never share a stream.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from protozoo.errors import DataError
from protozoo.fileio import sha256_file

SPLIT_CODES = {"train": 1, "test": 2}  # different streams, so train and test never share images
LAYOUT = ("<split>/images/<class>/<id>.png, <split>/masks/<class>/<id>.png (0/255), "
          "<split>/boxes.json {'<class>/<id>.png': [x0, y0, x1, y1]} (exclusive x1/y1)")
# Mid-range colours, so a mean-preserving light/dark texture fits inside 0..255 on every channel.
PALETTE = (
    ("red", (200, 60, 60)),
    ("green", (60, 170, 70)),
    ("blue", (60, 90, 210)),
    ("yellow", (205, 185, 50)),
    ("purple", (150, 60, 185)),
    ("cyan", (50, 175, 190)),
)
PALETTE_RGB = np.array([rgb for _, rgb in PALETTE], dtype=np.float32)
COMPLETE_KEYS = ("generator", "version", "params")  # what must match for a cached copy to count


# -- the cache ----------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("PROTOZOO_CACHE") or Path.home() / ".cache" / "protozoo")


def read_meta(root) -> dict | None:
    """The dataset's meta.json, or None when it is missing or unreadable (incomplete copy)."""
    try:
        with open(Path(root) / "meta.json") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def is_complete(root: Path, expected: dict, keys=COMPLETE_KEYS) -> bool:
    """Whether ``root`` holds a finished copy whose meta matches ``expected`` on ``keys``
    (all of it when ``keys`` is None)."""
    meta = read_meta(root)
    if keys is None:
        return meta == expected
    return bool(meta) and all(meta.get(k) == expected[k] for k in keys)


MANIFEST = "checksums.sha256"  # `sha256sum -c` reads it; every file but itself and meta.json


def _data_files(root: Path):
    """The files of a generated copy but meta.json and the manifest, as relative posix paths
    (a generator: a large copy is checked without a list of its names in memory)."""
    for folder, _, files in os.walk(root):
        for name in files:
            rel = Path(folder, name).relative_to(root).as_posix()
            if rel not in (MANIFEST, "meta.json"):
                yield rel


def write_manifest(root) -> Path:
    """Write ``root/checksums.sha256``: the SHA-256 of every file of a generated copy."""
    root = Path(root)
    lines = [f"{sha256_file(root / rel)}  {rel}\n" for rel in sorted(_data_files(root))]
    (root / MANIFEST).write_text("".join(lines))
    return root / MANIFEST


def damage(root) -> str | None:
    """What is wrong with the files of a generated copy, checked against its manifest (the
    number of files, then each listed file's checksum), or None when every file is as
    generated. Streams the manifest: memory does not grow with the copy."""
    root = Path(root)
    found = sum(1 for _ in _data_files(root))
    listed = 0
    try:
        with open(root / MANIFEST) as fh:
            for line in fh:
                digest, sep, rel = line.rstrip("\n").partition("  ")
                if not sep:
                    return f"{MANIFEST} is damaged"
                listed += 1
                try:
                    if sha256_file(root / rel) != digest:
                        return f"{rel} changed"
                except FileNotFoundError:
                    return f"{found} files where {MANIFEST} lists more, {rel} missing"
                except OSError:
                    return f"{rel} unreadable"
    except OSError:
        return f"no readable {MANIFEST}"
    if found != listed:  # every listed file is there, so the others were added
        return f"{found} files where {MANIFEST} lists {listed}"
    return None


def ensure_generated(cache_dir, name: str, expected: dict, generate: Callable[[Path], object],
                     keys=COMPLETE_KEYS) -> Path:
    """Return ``cache_dir/name``, calling ``generate(folder)`` only when no complete copy is there.

    ``name`` must carry every parameter, so two configurations never share a folder; ``expected``
    is the meta.json the generator writes. Generation goes to a temporary sibling that is renamed
    into place, so an interrupted run never leaves a half dataset that looks complete; a
    concurrent run that loses the rename race simply uses the winner's copy.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / name

    def valid() -> bool:
        return is_complete(final, expected, keys) and damage(final) is None

    if is_complete(final, expected, keys):
        problem = damage(final)
        if problem is None:
            return final
        print(f"dataset cache '{final}' is damaged ({problem}): generating it again",
              file=sys.stderr, flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache_dir))
    try:
        generate(tmp)
        write_manifest(tmp)
        if final.exists() and not valid():
            shutil.rmtree(final)  # a damaged copy, or one from an older generator version
        try:
            os.replace(tmp, final)
        except OSError:
            if not valid():  # lost a race to a broken copy: fail loudly
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- the on-disk layout -------------------------------------------------------------------------
def save_png(array: np.ndarray, path: Path) -> None:
    mode = "RGB" if array.ndim == 3 else "L"
    Image.fromarray(array, mode).save(path, compress_level=1)  # noise barely compresses anyway


def write_split(split_root: Path, class_names: list[str], count: int, samples: Iterable) -> None:
    """Write ``count`` samples ``(label, image, mask, box)`` of one split (see :data:`LAYOUT`)."""
    for name in class_names:
        (split_root / "images" / name).mkdir(parents=True)
        (split_root / "masks" / name).mkdir(parents=True)
    width = max(5, len(str(count - 1)))
    boxes = {}
    for i, (label, image, mask, box) in enumerate(samples):
        rel = f"{class_names[label]}/{i:0{width}d}.png"
        save_png(image, split_root / "images" / rel)
        save_png(mask.astype(np.uint8) * 255, split_root / "masks" / rel)
        boxes[rel] = [int(v) for v in box]
    with open(split_root / "boxes.json", "w") as fh:
        json.dump(boxes, fh, indent=0, sort_keys=True)


def write_dataset(root, meta: dict, splits: Mapping[str, tuple[int, Iterable]]) -> Path:
    """Write every split (``{split: (count, samples)}``) under ``root`` (which must not exist or
    be empty), then ``meta.json`` last, so its presence marks a complete dataset."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise DataError(f"'{root}' is not empty: generate {meta['generator']} into a new folder")
    root.mkdir(parents=True, exist_ok=True)
    for split, (count, samples) in splits.items():
        write_split(root / split, meta["class_names"], count, samples)
    with open(root / "meta.json", "w") as fh:
        json.dump(meta, fh, indent=2, sort_keys=True)
    return root


def collect_arrays(count: int, image_size: int, samples: Iterable) -> dict:
    """In-memory samples: images uint8 [N,S,S,3], masks bool [N,S,S], boxes int [N,4], labels."""
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((count, image_size, image_size), dtype=bool)
    boxes = np.empty((count, 4), dtype=np.int64)
    labels = np.empty(count, dtype=np.int64)
    for i, (label, image, mask, box) in enumerate(samples):
        images[i], masks[i], boxes[i], labels[i] = image, mask, box, label
    return {"images": images, "masks": masks, "boxes": boxes, "labels": labels}


# -- classes and random streams -----------------------------------------------------------------
def class_combos(num_classes: int, num_colours: int, num_patterns: int,
                 what: str) -> list[tuple[int, int]]:
    """(colour index, pattern index) per class: the first ``num_colours`` classes have different
    colours; later ones reuse a colour with another pattern, so the pattern matters too."""
    most = num_colours * num_patterns
    if not 2 <= num_classes <= most:
        raise DataError(f"num_classes={num_classes} is not supported by {what}: use 2..{most}")
    return [(k % num_colours, (k + k // num_colours) % num_patterns) for k in range(num_classes)]


def split_labels(count: int, num_classes: int, seed: int, split: str) -> np.ndarray:
    """Balanced labels (counts differ by at most one) in a seeded random order."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 0])
    return rng.permutation(np.arange(count) % num_classes)


def sample_streams(count: int, num_classes: int, seed: int, split: str):
    """Yield ``(index, label, rng)``: image i's own random stream ``(seed, split, 1, i)``."""
    if split not in SPLIT_CODES:
        raise DataError(f"unknown split '{split}': use one of {', '.join(SPLIT_CODES)}")
    labels = split_labels(count, num_classes, seed, split)
    for i in range(count):
        yield i, int(labels[i]), np.random.default_rng([seed, SPLIT_CODES[split], 1, i])


# -- drawing ------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(xs, ys): pixel-centre coordinates, computed once per size (read-only)."""
    coords = np.arange(image_size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    ys.setflags(write=False)
    xs.setflags(write=False)
    return xs, ys


def pattern_cell(image_size: int) -> float:
    """Half-period of a texture in pixels: one stripe / check / dot cell."""
    return max(2.0, round(image_size / 24))


def pattern_bits(name: str, u: np.ndarray, v: np.ndarray, half: float) -> np.ndarray:
    """bool per pixel: the 'light' cells of texture ``name`` at part coordinates (u, v).

    ``solid`` has no light cells; ``dotted`` puts a dot over about half of each 2h x 2h cell.
    """
    if name == "solid":
        return np.zeros(u.shape, dtype=bool)
    if name == "striped":
        return np.floor(u / half) % 2 == 0
    if name == "checkered":
        return (np.floor(u / half) + np.floor(v / half)) % 2 == 0
    if name != "dotted":
        raise ValueError(f"unknown pattern '{name}'")
    du = np.mod(u, 2 * half) - half
    dv = np.mod(v, 2 * half) - half
    return du**2 + dv**2 <= (0.8 * half) ** 2


def mean_preserving(base: np.ndarray, bits: np.ndarray, contrast: float) -> np.ndarray:
    """float [count, 3]: light/dark shades of ``base`` (light where ``bits``) that average to
    ``base`` exactly over the given pixels, so a part's mean colour does not reveal its texture.
    ``contrast``: the shade offset as a fraction of the room left on each channel."""
    # float32 like numpy's mean of float32 bits (exact count, one rounding), at a third the cost
    frac = float(np.float32(np.count_nonzero(bits)) / np.float32(bits.size)) if bits.size else 0.0
    if frac in (0.0, 1.0):
        return np.broadcast_to(base, (bits.size, 3))
    offset = contrast * np.minimum(base, 255.0 - base)
    weight = (bits.astype(np.float32) - frac) / max(frac, 1.0 - frac)  # zero mean over the pixels
    return base + weight[:, None] * offset


def box_of(region: np.ndarray) -> tuple[int, int, int, int]:
    """Tight (x0, y0, x1, y1) box of a non-empty bool map, exclusive x1/y1."""
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# -- a generated part dataset -------------------------------------------------------------------
@dataclass(frozen=True)
class PartGenerator:
    """What one ground-truth part generator is (synthetic-parts, synthetic-birds), and the steps
    every such generator takes: classes, per-image streams, arrays, files, meta and cache.

    ``sample_spec(rng, label, num_classes, image_size)`` draws one image's layout (a spec with a
    ``label``) and ``render(spec, image_size)`` paints it (``image``, ``mask``, ``box``); the
    class of a combination is ``"<palette colour>-<pattern>"``.
    """

    name: str  # e.g. "synthetic-parts": the dataset name and the cache folder's prefix
    version: int  # bump when the pixels change, so cached copies are regenerated
    patterns: tuple[str, ...]
    sample_spec: Callable
    render: Callable
    parts: dict  # what each part of an image is, for meta.json
    min_image_size: int

    def class_combos(self, num_classes: int) -> list[tuple[int, int]]:
        """(colour index, pattern index) per class (see :func:`class_combos`)."""
        return class_combos(num_classes, len(PALETTE), len(self.patterns), self.name)

    def class_names(self, num_classes: int) -> list[str]:
        return [f"{PALETTE[c][0]}-{self.patterns[p]}" for c, p in self.class_combos(num_classes)]

    def iter_specs(self, count: int, num_classes: int, image_size: int, seed: int, split: str):
        """Yield (index, spec). Image i's random layout comes from its own stream (seed, split,
        i), so it does not shift when ``count`` changes; only the balanced labels do."""
        for i, label, rng in sample_streams(count, num_classes, seed, split):
            yield i, self.sample_spec(rng, label, num_classes, image_size)

    def samples(self, count: int, num_classes: int, image_size: int, seed: int, split: str):
        """(label, image, mask, box) per image, as :func:`write_split` takes them."""
        for _, spec in self.iter_specs(count, num_classes, image_size, seed, split):
            out = self.render(spec, image_size)
            yield spec.label, out.image, out.mask, out.box

    def arrays(self, count: int, *, num_classes: int = 5, image_size: int = 64, seed: int = 0,
               split: str = "train") -> dict:
        """In-memory samples: images uint8 [N,S,S,3], masks bool [N,S,S], boxes int [N,4],
        labels int [N], class_names."""
        out = collect_arrays(count, image_size,
                             self.samples(count, num_classes, image_size, seed, split))
        return {**out, "class_names": self.class_names(num_classes)}

    def check(self, num_train: int, num_test: int, num_classes: int, image_size: int) -> None:
        self.class_combos(num_classes)
        if image_size < self.min_image_size:
            raise DataError(f"image_size={image_size} is too small for {self.name}: use "
                            f"{self.min_image_size} or more")
        if num_train < num_classes or num_test < num_classes:
            raise DataError(
                f"num_train={num_train} and num_test={num_test} must each be at least "
                f"num_classes={num_classes}, so every class appears in both splits"
            )

    def meta(self, num_train: int, num_test: int, num_classes: int, image_size: int,
             seed: int) -> dict:
        names = self.class_names(num_classes)
        return {
            "generator": f"protozoo.{self.name}",
            "version": self.version,
            "params": {"num_train": num_train, "num_test": num_test, "num_classes": num_classes,
                       "image_size": image_size, "seed": seed},
            "class_names": names,
            "classes": [{"name": n, "colour": PALETTE[c][0], "pattern": self.patterns[p]}
                        for n, (c, p) in zip(names, self.class_combos(num_classes), strict=True)],
            "palette": {name: list(rgb) for name, rgb in PALETTE},
            "parts": self.parts,
            "layout": LAYOUT,
        }

    def generate(self, root, num_train: int = 3000, num_test: int = 1000, num_classes: int = 5,
                 image_size: int = 64, seed: int = 0) -> Path:
        """Write the dataset under ``root`` (which must not exist or be empty); return ``root``.
        ``meta.json`` is written last, so its presence marks a complete dataset."""
        self.check(num_train, num_test, num_classes, image_size)
        splits = {split: (count, self.samples(count, num_classes, image_size, seed, split))
                  for split, count in (("train", num_train), ("test", num_test))}
        return write_dataset(root, self.meta(num_train, num_test, num_classes, image_size, seed),
                             splits)

    def ensure(self, cache_dir=None, num_classes: int = 5, image_size: int = 64, seed: int = 0,
               num_train: int = 3000, num_test: int = 1000) -> Path:
        """A complete generated copy in ``cache_dir`` (default :func:`default_cache_dir`),
        generated only when missing (see :func:`ensure_generated`)."""
        self.check(num_train, num_test, num_classes, image_size)
        folder = f"{self.name}-c{num_classes}-s{image_size}-seed{seed}-n{num_train}-t{num_test}"
        return ensure_generated(
            cache_dir, folder, self.meta(num_train, num_test, num_classes, image_size, seed),
            lambda tmp: self.generate(tmp, num_train, num_test, num_classes, image_size, seed))
