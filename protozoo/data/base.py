"""The dataset every loader returns: a shared pixel store plus cheap views over it.

Why a store and views: the engine needs the training split three times (augmented ``train``,
un-augmented ``push`` for ProtoPNet projection, and the held-out ``val``). Decoding the images
once into a uint8 tensor and handing out index views keeps memory at one copy and makes every
epoch after the first free of JPEG/PNG decoding, which is what dominates on a 2-core CPU.
Normalisation happens per item (a multiply-add), so the store stays uint8 (4x smaller than float).

Item contract (``__getitem__``)::

    image  float32 [3, S, S], (x/255 - mean) / std
    label  int
    index  int, position in *this* dataset (``ds[item["index"]]`` is the same item)
    path   str, the source file (or a synthetic id)
    mask   float32 [1, S, S] in {0, 1}      only when ``has_masks``
    box    float32 [4] xyxy, exclusive x1/y1 in resized pixels      only when ``has_boxes``

A training dataset may also define ``groups``: one integer per item; items with the same value
are shuffled as a block and batched together by the engine's sampler
(:class:`protozoo.engine.GroupedSampler`), e.g. the questions about one image, whose image then
runs through the CNN once per batch. Datasets without it are shuffled item by item.
"""
from __future__ import annotations

import copy
import os
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

from protozoo.data.images import Decoded, decode_sample, header_mode, header_size
from protozoo.errors import DataError

# Keep decoded images in memory below this many bytes (N*S*S*3); larger sets decode per access.
PRELOAD_LIMIT_BYTES = 1_500_000_000


def _workers() -> int:
    # PIL releases the GIL while decoding and resizing, so threads give a real speed-up.
    return max(1, min(8, os.cpu_count() or 1))


def parallel_map(fn, items):
    """``map`` over a thread pool that stops at the first error instead of finishing the rest.

    (A plain ``with ThreadPoolExecutor`` would decode every remaining image before re-raising,
    which on a large folder means minutes of waiting for a message about one bad file.)
    """
    pool = ThreadPoolExecutor(_workers())
    try:
        yield from pool.map(fn, items)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def native_size(paths, source: str) -> int:
    """The side of the images at ``paths`` when they all share one square size, read from their
    headers only. Used when no ``--image-size`` is given, so images are never resized without
    being asked; differing or non-square sizes are a one-line error that asks for one."""
    sizes = Counter(parallel_map(header_size, [str(p) for p in paths]))
    if not sizes:
        raise DataError(f"no images found in {source}: add images, one folder per class")
    if len(sizes) > 1:
        (a, _), (b, _) = sizes.most_common(2)
        raise DataError(f"the images in {source} are not all one size ({a[0]}x{a[1]}, "
                        f"{b[0]}x{b[1]}, {len(sizes)} sizes in all): pass --image-size S "
                        "(image_size=S) to resize them all to SxS")
    ((width, height),) = sizes
    if width != height:
        raise DataError(f"the images in {source} are {width}x{height}, not square: pass "
                        "--image-size S (image_size=S) to resize them to SxS")
    return int(width)


def should_preload(preload, count: int, image_size: int) -> bool:
    """Resolve ``preload`` ("auto", True, False) for ``count`` images of ``image_size``."""
    if not (isinstance(preload, bool) or preload == "auto"):
        raise DataError(f"preload={preload!r} is not valid: use 'auto', True or False")
    if preload == "auto":
        return count * image_size * image_size * 3 < PRELOAD_LIMIT_BYTES
    return bool(preload)


def warn_converted(converted: int, total: int, source: str) -> None:
    """One warning per dataset (never per image), so a mostly-grayscale set stays readable."""
    if converted:
        warnings.warn(
            f"{converted} of {total} images in {source} were grayscale, palette or RGBA and were "
            "converted to RGB (transparency composited onto white)",
            stacklevel=3,
        )


class ImageStore:
    """Pixels, masks and boxes of one source at one resolution, shared by all views."""

    def __init__(self, paths, labels, image_size: int, *, mask_paths=None, boxes=None,
                 crops=None, preload="auto", source: str = ""):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.image_size = int(image_size)
        self.mask_paths = None if mask_paths is None else [str(p) for p in mask_paths]
        self.orig_boxes = None if boxes is None else np.asarray(boxes, dtype=np.float32)
        self.crops = None if crops is None else np.asarray(crops, dtype=np.float32)
        self.has_masks = self.mask_paths is not None
        self.has_boxes = self.orig_boxes is not None
        self.images = self.masks = self.boxes = None
        if should_preload(preload, len(self.paths), self.image_size):
            self._preload(source)
        else:
            self._scan_headers(source)

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels, paths) -> ImageStore:
        """A store for images already in memory (uint8 [N, S, S, 3]), e.g. scikit-learn digits."""
        store = cls.__new__(cls)
        store.paths = [str(p) for p in paths]
        store.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        store.image_size = int(images.shape[1])
        store.mask_paths = store.orig_boxes = store.crops = None
        store.has_masks = store.has_boxes = False
        pixels = torch.from_numpy(np.ascontiguousarray(images))
        store.images = pixels.permute(0, 3, 1, 2).contiguous()
        store.masks = store.boxes = None
        return store

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, j: int) -> Decoded:
        return decode_sample(
            self.paths[j],
            self.image_size,
            mask_path=None if self.mask_paths is None else self.mask_paths[j],
            box=None if self.orig_boxes is None else self.orig_boxes[j],
            crop=None if self.crops is None else self.crops[j],
        )

    def _preload(self, source: str) -> None:
        n, s = len(self.paths), self.image_size
        self.images = torch.empty((n, 3, s, s), dtype=torch.uint8)
        self.masks = torch.empty((n, 1, s, s), dtype=torch.uint8) if self.has_masks else None
        self.boxes = torch.empty((n, 4), dtype=torch.float32) if self.has_boxes else None
        converted = 0
        for j, item in enumerate(parallel_map(self._decode, range(n))):
            self._put(j, item)
            converted += item.converted
        warn_converted(converted, n, source)

    def _put(self, j: int, item: Decoded) -> None:
        self.images[j] = torch.from_numpy(item.image).permute(2, 0, 1)
        if self.masks is not None:
            self.masks[j, 0] = torch.from_numpy(item.mask)
        if self.boxes is not None:
            self.boxes[j] = torch.from_numpy(item.box)

    def _scan_headers(self, source: str) -> None:
        """Lazy mode still checks every header up front: a missing or non-image file fails now."""
        modes = list(parallel_map(header_mode, self.paths))
        warn_converted(sum(m != "RGB" for m in modes), len(modes), source)

    def get(self, j: int):
        """(image uint8 [3,S,S], mask uint8 [1,S,S] or None, box float32 [4] or None)."""
        if self.images is not None:
            mask = None if self.masks is None else self.masks[j]
            box = None if self.boxes is None else self.boxes[j]
            return self.images[j], mask, box
        item = self._decode(j)
        image = torch.from_numpy(item.image).permute(2, 0, 1)
        mask = None if item.mask is None else torch.from_numpy(item.mask)[None]
        box = None if item.box is None else torch.from_numpy(item.box)
        return image, mask, box


def _as_vector(values, name: str) -> torch.Tensor:
    vec = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if vec.numel() == 1:
        vec = vec.repeat(3)
    if vec.numel() != 3:
        raise DataError(f"{name}={tuple(values)} must have 1 or 3 values (one per RGB channel)")
    if name == "std" and bool((vec <= 0).any()):
        raise DataError(f"std={tuple(values)} must be positive")
    return vec.view(3, 1, 1)


class StoreView(Dataset):
    """A dataset whose items are read from an :class:`ImageStore` (``self._store``) and labelled
    by ``self.class_names``: what every such view shares."""

    _store: ImageStore
    class_names: list[str]

    @property
    def image_size(self) -> int:
        return self._store.image_size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ImageDataset(StoreView):
    """A view (subset, augmentation on/off) over an :class:`ImageStore`; see the module doc."""

    def __init__(self, store: ImageStore, class_names, *, mean=(0.5,) * 3, std=(0.5,) * 3,
                 augment: bool = False, indices=None):
        self._store = store
        self.class_names = [str(c) for c in class_names]
        self.mean = tuple(float(v) for v in _as_vector(mean, "mean").flatten())
        self.std = tuple(float(v) for v in _as_vector(std, "std").flatten())
        # (x/255 - mean)/std == x * scale + shift: one fused multiply-add per item.
        std_vec = _as_vector(std, "std")
        self._scale = 1.0 / (255.0 * std_vec)
        self._shift = -_as_vector(mean, "mean") / std_vec
        self.augment = bool(augment)
        positions = np.arange(len(store)) if indices is None else np.asarray(indices, np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(store)):
            raise DataError(f"indices must lie in 0..{len(store) - 1}")
        self._positions = positions.reshape(-1)

    # -- metadata -------------------------------------------------------------------------
    @property
    def labels(self) -> list[int]:
        return self._store.labels[self._positions].tolist()

    @property
    def paths(self) -> list[str]:
        return [self._store.paths[j] for j in self._positions]

    @property
    def has_masks(self) -> bool:
        return self._store.has_masks

    @property
    def has_boxes(self) -> bool:
        return self._store.has_boxes

    def __len__(self) -> int:
        return int(self._positions.size)

    def subset(self, indices, augment: bool | None = None) -> ImageDataset:
        """A view of some of this dataset's items (indices relative to this view), same store."""
        view = copy.copy(self)
        view._positions = self._positions[np.asarray(indices, dtype=np.int64).reshape(-1)]
        view.augment = self.augment if augment is None else bool(augment)
        return view

    # -- items ----------------------------------------------------------------------------
    def raw_image(self, i: int) -> np.ndarray:
        """The resized, un-normalised, un-augmented image as uint8 [S, S, 3] (for reports)."""
        image, _, _ = self._store.get(int(self._positions[i]))
        return image.permute(1, 2, 0).numpy().copy()

    def __getitem__(self, i: int) -> dict:
        j = int(self._positions[i])  # IndexError past the end keeps plain iteration working
        image, mask, box = self._store.get(j)
        if self.augment and bool(torch.rand(()) < 0.5):
            image, mask, box = _hflip(image, mask, box, self.image_size)
        item = {
            "image": image.float().mul_(self._scale).add_(self._shift),
            "label": int(self._store.labels[j]),
            "index": int(i) if i >= 0 else int(i) + len(self),
            "path": self._store.paths[j],
        }
        if mask is not None:
            item["mask"] = mask.float()
        if box is not None:
            item["box"] = box.clone()
        return item


def _hflip(image, mask, box, size: int):
    """Mirror left-right; the box's x range is mirrored too (exclusive x1 -> size - x0)."""
    image = image.flip(-1)
    mask = None if mask is None else mask.flip(-1)
    if box is not None:
        box = torch.stack([size - box[2], box[1], size - box[0], box[3]])
    return image, mask, box


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held-out) with ``fraction`` of every class held out.

    Each class with at least two items gives at least one item to the held-out part and keeps at
    least one, so a small validation set still covers every class. Seeded and sorted, so the same
    seed always yields the same split.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if members.size < 2:
            continue
        count = int(np.clip(round(fraction * members.size), 1, members.size - 1))
        held.append(rng.permutation(members)[:count])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept_idx = np.setdiff1d(np.arange(labels.size), held_idx)
    return kept_idx, held_idx


def pick_examples(labels, count: int, seed: int = 0) -> list[int]:
    """``count`` indices spread over the classes (round-robin), seeded: the items a report shows."""
    rng = np.random.default_rng(seed)
    by_class = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[int(label)].append(i)
    queues = [list(rng.permutation(v)) for _, v in sorted(by_class.items())]
    picked: list[int] = []
    while len(picked) < count and any(queues):
        for q in queues:
            if q and len(picked) < count:
                picked.append(int(q.pop(0)))
    return picked
