"""Datasets for protozoo: one entry point, :func:`build_data`, returning a :class:`DataBundle`,
and one registration per data source, :func:`register_dataset`.

Every dataset yields the documented sample (:mod:`protozoo.data.contract`; protozoo's own
loaders: :mod:`protozoo.data.base`): ``image`` (normalised float [3,S,S]), ``label``, ``index``,
``path``, plus ``mask`` / ``box`` when the dataset has them.

The validation split is a seeded, stratified part of the *training* split -- never the test split
-- so model selection does not peek at the test set. ``push`` holds the same items as ``train``
without augmentation (ProtoPNet projects prototypes onto them). All training-side views share one
decoded copy of the pixels.

Image size: a dataset registers its default (``synthetic-parts`` 64, ``digits`` 32, ``cub``
224, ...) or None, which keeps the images' own size when they all share one square size and is
a one-line error otherwise (``folder``, ``clevr``): images are never resized unless asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from protozoo.data.base import ImageDataset, native_size, stratified_split
from protozoo.data.clevr import VQADataset, clevr_loader, scene_split
from protozoo.data.contract import adapt, check_samples, conforms, denormalize
from protozoo.data.sort_of_clevr import sort_of_clevr_loader
from protozoo.data.cub import CUBDataset, cub_labels
from protozoo.data.digits import DigitsDataset, digits_labels
from protozoo.data.folder import (
    ImageFolderDataset, images_root, load_split_folder, scan_class_folders,
)
from protozoo.data.generated import default_cache_dir, read_meta
from protozoo.data.synthetic_birds import ensure_synthetic_birds, generate_synthetic_birds
from protozoo.data.synthetic_parts import ensure_synthetic_parts, generate_synthetic_parts
from protozoo.data.synthetic_attributes import bundle_loader as _synthetic_attributes
from protozoo.data.zero_shot import ZeroShotSplit, cub_zsl_loader as _cub_zsl  # noqa: F401
from protozoo.errors import DataError
from protozoo.registry import Registry

# The generated image datasets with a ground-truth part (mask) and object box per image; the
# defaults below configure each of them.
GENERATED_PART_DATASETS = ("synthetic-parts", "synthetic-birds")
SYNTHETIC_DEFAULTS = {"num_classes": 5, "num_train": 3000, "num_test": 1000}
# The generated images do not follow the run seed (which picks the validation split and the
# training randomness): runs with different seeds are then scored on the same test set, and a
# sweep over seeds does not regenerate (and cache) a new dataset per seed.
SYNTHETIC_DATA_SEED = 0

__all__ = [
    "DATASETS", "VQA_DATASETS", "READS_DATA_DIR", "GENERATED_PART_DATASETS", "check_data_dir",
    "DataBundle", "build_data", "register_dataset", "list_datasets", "dataset_entry",
    "denormalize", "stratified_split", "ImageDataset", "ImageFolderDataset", "load_split_folder",
    "CUBDataset", "DigitsDataset", "generate_synthetic_parts", "ensure_synthetic_parts",
    "generate_synthetic_birds", "ensure_synthetic_birds",
]


@dataclass
class DataBundle:
    """The splits and facts the engine needs; see the module doc for what each split is. The
    optional fields are set by the datasets that have them (None otherwise)."""

    train: Dataset  # augmented if augment=True
    val: Dataset  # held out from the training split (never the test split), not augmented
    test: Dataset
    push: Dataset | None  # the same items as `train`, un-augmented (None: evaluation without)
    class_names: list[str]
    image_size: int
    has_masks: bool
    has_boxes: bool
    root: str | None = None  # the folder read: --data-dir, or the generated copy in the cache
    meta: dict | None = None  # a generated dataset's meta.json (generator name, parameters)
    class_attributes: np.ndarray | None = None  # [classes, attributes] per-class values (CUB)
    attribute_names: list[str] | None = None  # the columns of class_attributes
    zero_shot: ZeroShotSplit | None = None  # unseen classes, their attributes and test images
    vocab: list[str] | None = None  # questions: token id -> word, built from the training split
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # model arguments it dictates
    question_types: list[str] | None = None  # names of the items' question_type values
    max_question_length: int | None = None  # tokens per question after padding
    test_split: str | None = None  # the folder's split read as test ("val" for real CLEVR)
    unknown_words: dict[str, int] | None = None  # per split: question words read as <unk>

    def data_metrics(self) -> dict[str, int]:
        """Facts about the test data that belong beside the test metrics: ``unknown_test_words``,
        the test questions' words outside the training vocabulary (read as ``<unk>``)."""
        unknown = (self.unknown_words or {}).get("test")
        return {} if unknown is None else {"unknown_test_words": int(unknown)}


# -- the registry of data sources ----------------------------------------------------------
@dataclass(frozen=True)
class DatasetEntry:
    """How :func:`build_data` reads one registered dataset (see :func:`register_dataset`)."""

    name: str
    loader: Callable[[dict], tuple]
    image_size: int | None = None  # default image size; None: the images' own size
    reads_data_dir: bool = False  # does it read --data-dir (else it is generated or bundled)
    task: str = "classify"  # or "vqa": items carry questions, for the VQA families


DATASET_REGISTRY = Registry("dataset")


def register_dataset(name: str, loader: Callable | None = None, *, image_size: int | None = None,
                     reads_data_dir: bool = False, task: str = "classify"):
    """Register a data source under ``name`` for :func:`build_data`, ``train.py --dataset NAME``
    and ``protozoo-train``; a name registered twice is an error. Usable as a decorator.

    ``loader(args)`` receives a dict with ``data_dir``, ``image_size`` (the flag, else this
    registration's default, which may be None), ``mean``, ``std`` (the model's normalisation),
    ``num_classes``, ``seed``, ``cache_dir``, ``num_train``, ``num_test`` and ``vocab``, and
    returns ``(train, test)`` or ``(train, test, facts)``: the two splits as datasets whose
    items meet the sample contract (:mod:`protozoo.data.contract`; any map-style Dataset of
    ``(image, label)`` will do) and ``facts``, values of the optional :class:`DataBundle`
    fields. Validation is carved out of ``train`` by :func:`build_data`.

    ``image_size``: the default size (None: the images' own); ``reads_data_dir``: whether it
    reads ``--data-dir``; ``task``: ``"classify"`` or ``"vqa"`` (questions about images).
    """
    def add(fn: Callable) -> Callable:
        DATASET_REGISTRY.register(name)(DatasetEntry(name, fn, image_size, reads_data_dir, task))
        return fn

    return add if loader is None else add(loader)


def list_datasets() -> list[str]:
    """The registered dataset names, built-in first (in registration order)."""
    return DATASET_REGISTRY.names(sort=False)


def dataset_entry(name: str) -> DatasetEntry:
    _check_name(name)
    return DATASET_REGISTRY.get(name)


# -- argument checks ------------------------------------------------------------------------
def _check_name(name: str) -> None:
    if name not in DATASET_REGISTRY:
        raise DataError(f"unknown dataset '{name}': choose one of {', '.join(list_datasets())}"
                        " (or register yours with protozoo.register_dataset)")


def check_data_dir(name: str, data_dir) -> None:
    """A ``--data-dir`` given for a dataset that does not read one is a mistake worth saying (a
    CLEVR folder passed with ``--dataset sort-of-clevr`` would be silently replaced by generated
    scenes). Checked on what the user gives (train.py), not on saved configs, which may carry
    a ``data_dir`` from before this check."""
    if data_dir is not None and name in DATASET_REGISTRY and \
            not DATASET_REGISTRY.get(name).reads_data_dir:
        hint = ("; for a CLEVR download use --dataset clevr" if name == "sort-of-clevr" else
                "; for your own images use --dataset folder")
        raise DataError(f"dataset '{name}' is generated and does not read --data-dir "
                        f"'{data_dir}': drop --data-dir{hint}")


def _check_image_size(size: int) -> None:
    if size < 1:
        raise DataError(f"image_size={size} must be a positive number of pixels (e.g. "
                        "--image-size 64), or leave it unset for the dataset's default")


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < float(val_fraction) < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive): a "
                        "validation split is required for model selection (e.g. 0.1)")


def _folder(path: Path, hint: str) -> Path:
    if not path.is_dir():
        raise DataError(f"data folder '{path}' not found: {hint}")
    if not any(path.iterdir()):
        raise DataError(f"data folder '{path}' is empty: {hint}")
    return path


_HINTS = {
    "folder": "--data-dir must contain train/ and test/ sub-folders, one folder per class",
    "cub": "--data-dir must be the extracted CUB_200_2011 folder",
}


def _data_dir(data_dir, name: str) -> Path:
    if data_dir is None:
        raise DataError(f"dataset '{name}' needs a data folder: {_HINTS[name]}")
    return _folder(Path(data_dir).expanduser(), _HINTS[name])


def _check_classes(num_classes, found: list[str], name: str) -> None:
    if num_classes is not None and int(num_classes) != len(found):
        raise DataError(f"num_classes={num_classes} but dataset '{name}' has {len(found)} classes: "
                        "leave num_classes unset or set it to the dataset's class count")


# -- splitting ------------------------------------------------------------------------------
def _subset_indices(labels, count, seed: int):
    """Indices of a seeded stratified subset of about ``count`` items, or None for all.

    Chosen from the labels alone, before any image is decoded, so a quick run on a big dataset
    only pays for the images it uses.
    """
    if count is None or int(count) >= len(labels):
        return None
    if int(count) < 1:
        raise DataError(f"asked for {count} items: use a positive number or leave it unset")
    return stratified_split(labels, int(count) / len(labels), seed)[1]


def _bundle(train_full: ImageDataset, test: ImageDataset, *, seed: int, val_fraction: float,
            augment: bool, facts: dict) -> DataBundle:
    """Carve validation out of the training split; train/push/val share one pixel store.
    ``facts``: the loader's values of the optional :class:`DataBundle` fields."""
    if isinstance(train_full, VQADataset):  # by whole image: no image in both train and val
        kept, held = scene_split(train_full, val_fraction, seed)
    else:
        kept, held = stratified_split(train_full.labels, val_fraction, seed)
    if held.size == 0:
        raise DataError("the training split is too small for a validation split: give every "
                        "class at least 2 training images")
    return DataBundle(
        train=train_full.subset(kept, augment=augment),
        val=train_full.subset(held, augment=False),
        test=test,
        push=train_full.subset(kept, augment=False),
        class_names=list(train_full.class_names),
        image_size=train_full.image_size,
        has_masks=train_full.has_masks,
        has_boxes=train_full.has_boxes,
        **facts,
    )


# -- per dataset ----------------------------------------------------------------------------
def _generated(ensure, a: dict):
    """A generated part dataset (synthetic-parts, synthetic-birds): ``ensure`` returns its cached
    copy, read by the same split-folder loader as any image folder."""
    root = ensure(
        a["cache_dir"] if a["cache_dir"] is not None else default_cache_dir(),
        num_classes=a["num_classes"] or SYNTHETIC_DEFAULTS["num_classes"],
        image_size=a["image_size"], seed=SYNTHETIC_DATA_SEED,
        num_train=a["num_train"] or SYNTHETIC_DEFAULTS["num_train"],
        num_test=a["num_test"] or SYNTHETIC_DEFAULTS["num_test"],
    )
    meta = read_meta(root)
    common = dict(image_size=a["image_size"], mean=a["mean"], std=a["std"],
                  class_names=meta["class_names"])
    train = load_split_folder(root / "train", **common)
    test = load_split_folder(root / "test", **common)
    return train, test, {"root": str(root), "meta": meta}


def _digits(a: dict):
    common = dict(image_size=a["image_size"], mean=a["mean"], std=a["std"])
    train_idx = _subset_indices(digits_labels("train"), a["num_train"], a["seed"])
    test_idx = _subset_indices(digits_labels("test"), a["num_test"], a["seed"])
    return (DigitsDataset("train", indices=train_idx, **common),
            DigitsDataset("test", indices=test_idx, **common), {})


def _image_folder(a: dict):
    root = _data_dir(a["data_dir"], "folder")
    train_root = _folder(root / "train", _HINTS["folder"])
    test_root = _folder(root / "test", _HINTS["folder"])
    files, labels, names = scan_class_folders(images_root(train_root))
    _check_classes(a["num_classes"], names, "folder")
    test_files, test_labels, _ = scan_class_folders(images_root(test_root), names)
    size = a["image_size"] or native_size(files + test_files, f"'{root}'")
    common = dict(image_size=size, mean=a["mean"], std=a["std"])
    train_idx = _subset_indices(labels, a["num_train"], a["seed"])
    train = load_split_folder(train_root, indices=train_idx, **common)
    test_idx = _subset_indices(test_labels, a["num_test"], a["seed"])
    test = load_split_folder(test_root, class_names=names, indices=test_idx, **common)
    return train, test, {"root": str(root)}


def _cub(a: dict):
    root = _data_dir(a["data_dir"], "cub")
    common = dict(image_size=a["image_size"], mean=a["mean"], std=a["std"])
    train = CUBDataset(root, "train", indices=_subset_indices(
        cub_labels(root, "train"), a["num_train"], a["seed"]), **common)
    _check_classes(a["num_classes"], train.class_names, "cub")
    test = CUBDataset(root, "test", indices=_subset_indices(
        cub_labels(root, "test"), a["num_test"], a["seed"]), **common)
    facts = {"root": str(root), "class_attributes": train.class_attributes,
             "attribute_names": train.attribute_names}
    return train, test, facts


for _name, _loader, _size, _reads, _task in [
        ("synthetic-parts", partial(_generated, ensure_synthetic_parts), 64, False, "classify"),
        ("synthetic-birds", partial(_generated, ensure_synthetic_birds), 64, False, "classify"),
        ("digits", _digits, 32, False, "classify"),
        ("folder", _image_folder, None, True, "classify"),
        ("cub", _cub, 224, True, "classify"),
        ("synthetic-attributes", _synthetic_attributes, 32, False, "classify"),
        ("cub-zsl", _cub_zsl, 224, True, "classify"),
        ("sort-of-clevr", sort_of_clevr_loader, 75, False, "vqa"),
        ("clevr", clevr_loader, None, True, "vqa")]:
    register_dataset(_name, _loader, image_size=_size, reads_data_dir=_reads, task=_task)

# The built-in datasets (register_dataset adds more; list_datasets() names them all).
DATASETS = tuple(list_datasets())
DEFAULT_IMAGE_SIZE = {n: DATASET_REGISTRY.get(n).image_size for n in DATASETS}
# Datasets read from --data-dir; the others are generated (or bundled) and would ignore it.
READS_DATA_DIR = tuple(n for n in DATASETS if DATASET_REGISTRY.get(n).reads_data_dir)
# Datasets of questions about images, for the VQA families (san, han, rn, cnn_lstm).
VQA_DATASETS = tuple(n for n in DATASETS if DATASET_REGISTRY.get(n).task == "vqa")


def _wrap_split(dataset, what: str, a: dict, class_names=None):
    """A registered loader's split that is not one of protozoo's datasets: adapted to the
    contract and checked once (:mod:`protozoo.data.contract`)."""
    if conforms(dataset):
        return dataset
    wrapped = adapt(dataset, what, a["mean"], a["std"])
    names = class_names or wrapped.class_names or [str(k) for k in range(
        int(max(wrapped.labels, default=0)) + 1)]
    wrapped.class_names = list(names)
    check_samples(wrapped, what, len(names))
    return wrapped


def build_data(name: str, *, data_dir=None, image_size=None, mean=(0.5,) * 3, std=(0.5,) * 3,
               num_classes=None, seed: int = 0, val_fraction: float = 0.1, augment: bool = False,
               cache_dir=None, num_train=None, num_test=None, vocab=None) -> DataBundle:
    """Build train/val/test/push for dataset ``name`` (see :func:`list_datasets`).

    ``image_size`` defaults per dataset (synthetic-parts and synthetic-birds 64, digits 32,
    cub 224; folder and clevr: the images' own size, which they must share). For the generated
    part datasets (:data:`GENERATED_PART_DATASETS`: synthetic-parts, synthetic-birds),
    ``num_classes``/``num_train``/``num_test`` configure the generator (defaults 5/3000/1000);
    its images use a fixed generator seed (``SYNTHETIC_DATA_SEED``), not ``seed``, and are
    cached in ``cache_dir`` (default ``$PROTOZOO_CACHE`` or ``~/.cache/protozoo``). For the
    other datasets ``num_classes`` is only checked against the data, and
    ``num_train``/``num_test`` keep a seeded stratified subset of about that many items (quick
    runs). ``val_fraction`` of every class of the training split becomes ``val``.
    VQA data (sort-of-clevr, clevr; see :mod:`protozoo.data.clevr`): ``num_train``/``num_test``
    count images (scenes), ``val`` holds out whole images, ``vocab`` (a model's word list)
    encodes the questions instead of the vocabulary built from the training questions.
    """
    entry = dataset_entry(name)
    _check_fraction(val_fraction)
    size = int(image_size) if image_size is not None else entry.image_size
    if size is not None:
        _check_image_size(size)
    args = dict(data_dir=data_dir, image_size=size, mean=mean, std=std, num_classes=num_classes,
                seed=int(seed), cache_dir=cache_dir, num_train=num_train, num_test=num_test,
                vocab=vocab)
    train_full, test, *rest = entry.loader(args)
    facts = rest[0] if rest else {}
    train_full = _wrap_split(train_full, f"dataset '{name}' (train)", args)
    test = _wrap_split(test, f"dataset '{name}' (test)", args, train_full.class_names)
    if name == "digits":
        _check_classes(num_classes, train_full.class_names, name)
    return _bundle(train_full, test, seed=int(seed), val_fraction=val_fraction, augment=augment,
                   facts=facts)
