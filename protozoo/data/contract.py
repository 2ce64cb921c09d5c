"""The data contract: what one item of a dataset must be, the check made once before training,
and the adapter that makes any map-style ``torch.utils.data.Dataset`` meet it.

A **sample** is either a tuple ``(image, label)`` -- what ``torchvision.datasets.ImageFolder``,
CIFAR-style datasets and ``TensorDataset(images, labels)`` yield -- or a dict with at least
``image`` and ``label``::

    image       float tensor [3, S, S], normalised as the model expects:
                (x / 255 - model.mean) / model.std (transforms.ToTensor() then
                transforms.Normalize(model.mean, model.std)); every item the same size
    label       int class index in 0 .. num_classes - 1
    mask        optional float tensor [1, S, S] in {0, 1}: the part that decides the class
                (explanation metrics score the maps against it)
    box         optional float tensor [4], xyxy in pixels, exclusive x1/y1: the object's box
    raw_image   optional uint8 [S, S, 3] (or [3, S, S]): the picture the report draws; without
                it the report denormalises ``image`` with the model's mean and std
    path        optional str naming the item (a file); reports and push provenance show it
    question, question_length
                for VQA models: long [L] token ids (0 pads) and the number of real tokens

:func:`adapt` wraps such a dataset (or a ``DataLoader``, read through its ``dataset``) in a
:class:`ContractDataset`: items become dicts with ``index`` and ``path`` added, and the dataset
gains what training needs beyond the items -- ``labels`` (read from ``targets``/``labels``
attributes or a ``TensorDataset``'s second tensor without decoding an image, else from one pass
over the items), ``paths`` (ImageFolder's files, else ``"<type>[i]"``), ``raw_image(i)``,
``class_names`` (a ``classes`` attribute) and ``subset(indices)``.

:func:`check_samples` reads a few items spread over the dataset and every label, and raises a
one-line :class:`~protozoo.errors.DataError` naming the item and the field that is missing or
wrong (and the fix) -- before any training, so a ProtoPNet does not die at its prune phase
minutes in. Every later item is still checked against the first one's shape when it is read.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from protozoo.errors import DataError

CHECKED_ITEMS = 8  # items read by check_samples, spread over the dataset

_HINTS = {
    "image": "a sample is (image, label) or a dict with 'image' (float [3, S, S]) and 'label'",
    "label": "a sample is (image, label) or a dict with 'image' and 'label' (an int class index)",
    "question": "a VQA model needs 'question' (long [L] token ids) in every item",
    "question_length": "a VQA model needs 'question_length' (the number of real tokens)",
}
_TO_TENSOR = ("transforms.ToTensor() then transforms.Normalize(model.mean, model.std)")


def denormalize(image, mean=(0.5,) * 3, std=(0.5,) * 3) -> np.ndarray:
    """Undo the normalisation of one item's image: float [3,H,W] -> uint8 [H,W,3]."""
    x = torch.as_tensor(image, dtype=torch.float32).detach().cpu()
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3, H, W], got {tuple(x.shape)}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    pixels = ((x * std_t + mean_t) * 255.0).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy().copy()


def conforms(dataset) -> bool:
    """Does ``dataset`` already offer what training needs beyond its items (protozoo's own
    datasets, a :class:`ContractDataset`)?"""
    return all(hasattr(dataset, name) for name in ("subset", "labels", "paths", "raw_image"))


def adapt(data, what: str, mean=(0.5,) * 3, std=(0.5,) * 3):
    """``data`` (a map-style Dataset or a DataLoader over one) as a dataset that meets the
    contract: protozoo's own datasets as they are, any other wrapped in a
    :class:`ContractDataset`. ``what`` names it in errors (``"train_data"``); ``mean``/``std``
    denormalise images for reports when items carry no ``raw_image``."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, IterableDataset):
        raise DataError(f"{what} is an IterableDataset, which cannot be split, shuffled or read "
                        "twice: give a map-style Dataset (with __len__ and __getitem__)")
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise DataError(f"{what} is {_a(type(data).__name__)}: give a torch Dataset (or a "
                        "DataLoader over one) whose items are (image, label) or dicts")
    return data if conforms(data) else ContractDataset(data, what, mean, std)


# ----------------------------------------------------------------------------- the adapter
class ContractDataset(Dataset):
    """A view over a user's dataset whose items are dicts that meet the contract (module doc).
    Views made by :meth:`subset` share the source and what was read from it."""

    def __init__(self, source, what: str = "data", mean=(0.5,) * 3, std=(0.5,) * 3):
        self._source, self.what = source, what
        self.mean, self.std = tuple(mean), tuple(std)
        self._positions = np.arange(len(source))
        self._all_labels: np.ndarray | None = _known_labels(source)
        self._all_paths = _known_paths(source)
        self.class_names = _known_classes(source)
        # set by check_samples
        self.image_size: int | None = None
        self.has_masks = self.has_boxes = False
        self._shape: tuple | None = None

    def __len__(self) -> int:
        return int(self._positions.size)

    def subset(self, indices, augment: bool | None = None) -> ContractDataset:
        """Some of this view's items (indices relative to it). ``augment`` is accepted for the
        interface of protozoo's datasets and ignored: the user's transforms are the user's."""
        view = copy.copy(self)
        view._positions = self._positions[np.asarray(indices, dtype=np.int64).reshape(-1)]
        return view

    def _path(self, j: int) -> str:
        return self._all_paths[j] if self._all_paths is not None \
            else f"{type(self._source).__name__}[{j}]"

    @property
    def paths(self) -> list[str]:
        return [self._path(int(j)) for j in self._positions]

    @property
    def labels(self) -> list[int]:
        if self._all_labels is None:  # no attribute holds them: one pass over the items
            self._all_labels = np.array([as_sample(self._source[j], self.what, j)["label"]
                                         for j in range(len(self._source))], dtype=np.int64)
        return self._all_labels[self._positions].tolist()

    def __getitem__(self, i: int) -> dict:
        j = int(self._positions[i])
        item = as_sample(self._source[j], self.what, j)
        item["index"] = int(i) if i >= 0 else int(i) + len(self)
        item.setdefault("path", self._path(j))
        image = item.get("image")
        if self._shape is not None and torch.is_tensor(image) and tuple(image.shape) != \
                self._shape:
            raise DataError(f"{self.what} item {j}: 'image' is {_shape(image)} but the first "
                            f"item's is {_shape(self._shape)}: resize every image to one size "
                            "(e.g. transforms.Resize((S, S)))")
        return item

    def raw_image(self, i: int) -> np.ndarray:
        """The picture a report draws, uint8 [S, S, 3]: the item's ``raw_image``, the source's
        ``raw_image(j)``, or the image denormalised with the model's mean and std."""
        j = int(self._positions[i])
        if hasattr(self._source, "raw_image"):
            return np.asarray(self._source.raw_image(j), dtype=np.uint8)
        item = self[i]
        raw = item.get("raw_image")
        if raw is None:
            return denormalize(item["image"], self.mean, self.std)
        raw = torch.as_tensor(np.asarray(raw)).to(torch.uint8)
        return (raw.permute(1, 2, 0) if raw.shape[0] == 3 and raw.shape[-1] != 3 else
                raw).numpy().copy()


def as_sample(raw, what: str, j: int) -> dict:
    """One item of a user's dataset as a dict (a copy): ``(image, label)`` or a dict; the label
    becomes an int. One-line errors for any other shape of item."""
    if isinstance(raw, dict):
        item = dict(raw)
    elif isinstance(raw, (tuple, list)) and len(raw) == 2:
        item = {"image": raw[0], "label": raw[1]}
    elif isinstance(raw, (tuple, list)):
        raise DataError(f"{what} item {j} is {_a(type(raw).__name__)} of {len(raw)} values: a "
                        "tuple sample is (image, label); give more fields as a dict "
                        "{'image': ..., 'label': ..., 'mask': ...}")
    else:
        raise DataError(f"{what} item {j} is {_a(type(raw).__name__)}: a sample is (image, label) "
                        "or a dict with 'image' and 'label'")
    if "label" in item:
        item["label"] = _int_label(item["label"], what, j)
    return item


def _int_label(label, what: str, j: int) -> int:
    value = label.item() if torch.is_tensor(label) and label.numel() == 1 else label
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{what} item {j}: 'label' is {label!r}; a label is an int class index "
                        "(0 .. num_classes - 1), not a one-hot vector or a name")
    return value


def _a(name: str) -> str:
    """``"a Tensor"``, ``"an int"``."""
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def _shape(image) -> str:
    return "x".join(str(n) for n in (image.shape if torch.is_tensor(image) else image))


# ----------------------------------------------------------------------------- source facts
def _known_labels(source) -> np.ndarray | None:
    """Every item's label from attributes, without decoding an image; None when none holds
    them."""
    if isinstance(source, Subset):
        inner = _known_labels(source.dataset)
        return None if inner is None else inner[np.asarray(source.indices, dtype=np.int64)]
    if isinstance(source, TensorDataset) and len(source.tensors) >= 2:
        values = source.tensors[1]
        return values.long().numpy() if values.ndim == 1 else None
    for name in ("targets", "labels"):
        values = getattr(source, name, None)
        if values is None or callable(values):
            continue
        try:
            array = np.asarray(values.cpu() if torch.is_tensor(values) else values)
        except (TypeError, ValueError):
            continue
        if array.ndim == 1 and len(array) == len(source) and np.issubdtype(array.dtype,
                                                                             np.integer):
            return array.astype(np.int64)
    return None


def _known_paths(source) -> list[str] | None:
    """Every item's file when the source says (ImageFolder's ``samples``, a ``paths`` list)."""
    if isinstance(source, Subset):
        inner = _known_paths(source.dataset)
        return None if inner is None else [inner[int(i)] for i in source.indices]
    samples = getattr(source, "samples", None) or getattr(source, "imgs", None)
    if isinstance(samples, list) and len(samples) == len(source) and samples and \
            isinstance(samples[0], (tuple, list)) and isinstance(samples[0][0], str):
        return [str(s[0]) for s in samples]
    paths = getattr(source, "paths", None)
    if isinstance(paths, list) and len(paths) == len(source):
        return [str(p) for p in paths]
    return None


def _known_classes(source) -> list[str] | None:
    if isinstance(source, Subset):
        return _known_classes(source.dataset)
    for name in ("classes", "class_names"):
        values = getattr(source, name, None)
        if isinstance(values, (list, tuple)) and values:
            return [str(c) for c in values]
    return None


# ----------------------------------------------------------------------------- the check
def check_samples(dataset, what: str, num_classes: int,
                  fields: tuple[str, ...] = ("image", "label"),
                  count: int = CHECKED_ITEMS) -> None:
    """Check ``dataset`` against the contract (module doc): ``count`` items spread over it, and
    every label against ``num_classes``. Raises a one-line DataError naming the item, the field
    and the fix. A :class:`ContractDataset` learns its image size, whether it has masks and
    boxes, and the shape every later item must have."""
    n = len(dataset)
    if n == 0:
        raise DataError(f"{what} is empty: give at least one item per class")
    positions = sorted({int(round(p)) for p in np.linspace(0, n - 1, min(n, count))})
    first: dict | None = None
    read = {}
    for i in positions:
        item = read[i] = dataset[i]
        if not isinstance(item, dict):
            raise DataError(f"{what} item {i} is {_a(type(item).__name__)}: a dataset's items "
                            "must be dicts (protozoo.data.contract)")
        missing = [f for f in fields if f not in item]
        if missing:
            raise DataError(f"{what} item {i} has no '{missing[0]}': "
                            f"{_HINTS.get(missing[0], 'the model reads it')}")
        _check_image(item["image"], what, i, first["image"] if first else None)
        _check_optional(item, what, i, first)
        empty = [k for k, v in item.items() if v is None]
        if empty:
            raise DataError(f"{what} item {i}: '{empty[0]}' is None, which cannot be batched: "
                            "leave the field out instead")
        first = first or item
    labels = np.asarray(dataset.labels, dtype=np.int64)
    for i, item in read.items():
        if int(item["label"]) != int(labels[i]):
            raise DataError(f"{what} item {i} has label {item['label']} but the dataset's "
                            f"labels (targets) say {labels[i]}: make them agree (a "
                            "target_transform changes the items only)")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{what} item {i} has label {labels[i]} but the model has {num_classes} "
                        f"classes (0..{num_classes - 1}): build the model with num_classes="
                        f"{int(labels.max()) + 1}, or fix the labels")
    _warn_unnormalised(first["image"], what)
    if isinstance(dataset, ContractDataset):
        dataset._shape = tuple(first["image"].shape)
        dataset.image_size = int(first["image"].shape[-1])
        dataset.has_masks, dataset.has_boxes = "mask" in first, "box" in first


def _check_image(image, what: str, i: int, first) -> None:
    where = f"{what} item {i}: 'image'"
    if not torch.is_tensor(image):
        kind = "a PIL image" if hasattr(image, "getpixel") else _a(type(image).__name__)
        raise DataError(f"{where} is {kind}; it must be a float tensor [3, S, S] normalised "
                        f"with the model's mean and std: add {_TO_TENSOR}")
    if not image.is_floating_point():
        raise DataError(f"{where} is {image.dtype}; it must be float and normalised with the "
                        f"model's mean and std: add {_TO_TENSOR}")
    if image.ndim != 3:
        more = " (one image, not a batch)" if image.ndim == 4 else ""
        raise DataError(f"{where} has shape [{_shape(image).replace('x', ', ')}]; it must be "
                        f"[3, S, S]{more}")
    if image.shape[0] != 3:
        fix = ("permute it to [3, H, W]" if image.shape[-1] == 3 else
               "give 3 channels (transforms.Grayscale(num_output_channels=3) for grey images)")
        raise DataError(f"{where} has {image.shape[0]} channel(s) (shape "
                        f"{_shape(image)}); the models take RGB [3, S, S]: {fix}")
    if image.shape[1] != image.shape[2]:
        raise DataError(f"{where} is {image.shape[1]}x{image.shape[2]} (HxW), not square; "
                        "reports, push boxes and checkpoints assume square images: resize to "
                        "S x S (transforms.Resize((S, S)))")
    if first is not None and image.shape != first.shape:
        raise DataError(f"{where} is {_shape(image)} but the first item's is {_shape(first)}: "
                        "resize every image to one size (e.g. transforms.Resize((S, S)))")


def _check_optional(item: dict, what: str, i: int, first: dict | None) -> None:
    side = item["image"].shape[-1]
    expected = {"mask": (1, side, side), "box": (4,)}
    for name, shape in expected.items():
        if first is not None and (name in item) != (name in first):
            raise DataError(f"{what} item {i} {'has' if name in item else 'lacks'} '{name}' "
                            "unlike the first item: give it in every item or in none")
        if name in item and (not torch.is_tensor(item[name]) or tuple(item[name].shape) != shape):
            got = _shape(item[name]) if torch.is_tensor(item[name]) else type(item[name]).__name__
            raise DataError(f"{what} item {i}: '{name}' is {got}; it must be a float tensor "
                            f"{list(shape)}")


def _warn_unnormalised(image: torch.Tensor, what: str) -> None:
    """Images in [0, 1] were most likely not normalised (ToTensor without Normalize)."""
    if float(image.min()) >= 0.0 and float(image.max()) <= 1.0:
        warnings.warn(f"{what}'s images lie in [0, 1]: were they normalised with the model's "
                      "mean and std (transforms.Normalize(model.mean, model.std))?", stacklevel=3)
