"""scikit-learn's bundled 8x8 digits as small real RGB images (no download needed).

The 1797 images ship inside scikit-learn, so tests and the default run have real data without
network access. They are upscaled bilinearly to ``image_size`` (default 32) so CNN backbones with a
few pooling stages still have a spatial map to explain. The train/test split is stratified with a
*fixed* seed, independent of the run's seed, so test accuracy is comparable across runs.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from protozoo.data.base import ImageDataset, ImageStore, stratified_split
from protozoo.errors import DataError

SPLIT_SEED = 0  # never the run seed: the test set must not move between runs
TEST_FRACTION = 0.25
CLASS_NAMES = [str(d) for d in range(10)]


@lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """(images float [N, 8, 8] in 0..16, labels [N]); cached read-only: every split needs them."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def upscale(images: np.ndarray, image_size: int) -> np.ndarray:
    """float [N, 8, 8] in 0..16 -> uint8 [N, S, S, 3] (gray replicated to RGB), bilinear."""
    x = torch.from_numpy(images)[:, None] * (255.0 / 16.0)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    gray = x.round().clamp_(0, 255).to(torch.uint8)[:, 0]
    return gray[..., None].expand(-1, -1, -1, 3).numpy()


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices into the 1797 images for ``split`` (fixed stratified 75/25 split)."""
    train, test = stratified_split(labels, TEST_FRACTION, SPLIT_SEED)
    if split == "train":
        return train
    if split == "test":
        return test
    raise DataError(f"unknown digits split '{split}': use train or test")


def digits_labels(split: str = "train") -> list[int]:
    """Labels of a split without building images (to choose subsets first)."""
    _, labels = _load_raw()
    return labels[split_indices(labels, split)].tolist()


class DigitsDataset(ImageDataset):
    """One split of the digits; ``indices`` keeps a subset (positions within the split)."""

    def __init__(self, split: str = "train", image_size: int = 32, mean=(0.5,) * 3,
                 std=(0.5,) * 3, augment: bool = False, indices=None):
        if image_size < 8:
            raise DataError(f"image_size={image_size} is too small for digits: use 8 or more")
        images, labels = _load_raw()
        chosen = split_indices(labels, split)
        if indices is not None:
            chosen = chosen[np.asarray(indices, dtype=np.int64)]
        paths = [f"digits/{split}/{i:05d}" for i in chosen]  # i = index in load_digits()
        store = ImageStore.from_arrays(upscale(images[chosen], image_size), labels[chosen], paths)
        super().__init__(store, CLASS_NAMES, mean=mean, std=std, augment=augment)
        self.split = split
