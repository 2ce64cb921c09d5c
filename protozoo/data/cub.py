"""CUB-200-2011 read from its own release layout (no conversion step, no download).

Expected under ``root`` (the extracted ``CUB_200_2011`` folder)::

    images.txt              "<image id> <relative/path.jpg>"
    image_class_labels.txt  "<image id> <class id>"
    classes.txt             "<class id> <NNN.Class_name>"
    train_test_split.txt    "<image id> <1 train | 0 test>"
    bounding_boxes.txt      "<image id> <x> <y> <w> <h>"   (original pixels)
    images/...
    segmentations/<same relative path>.png                 optional, used as masks (> 127);
                                                           from the separate segmentations
                                                           archive, moved into this folder
    attributes/class_attribute_labels_continuous.txt       optional, 200 x 312 (percent, 0-100)
    attributes.txt                                         "<id> <name>"; the official archive
                                                           puts it beside CUB_200_2011/, which is
                                                           also searched
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from protozoo.data.base import ImageDataset, ImageStore
from protozoo.errors import DataError

SPLITS = ("train", "test")
_ATTRIBUTES_FILE = Path("attributes") / "class_attribute_labels_continuous.txt"


def _missing(path: Path) -> DataError:
    return DataError(f"'{path}' not found: the CUB folder must be the extracted CUB_200_2011 "
                     "directory (with images.txt, classes.txt, images/, ...)")


def _read_rows(path: Path, columns: int) -> list[list[str]]:
    """Whitespace-separated rows with at least ``columns`` fields (the last one keeps spaces)."""
    if not path.is_file():
        raise _missing(path)
    rows = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            fields = line.split(maxsplit=columns - 1)
            if len(fields) < columns:
                raise DataError(f"line {number} of '{path}' has {len(fields)} fields, expected "
                                f"{columns}: restore the file from the CUB_200_2011 archive")
            rows.append([f.strip() for f in fields])
    if not rows:
        raise DataError(f"'{path}' is empty: restore it from the CUB_200_2011 archive")
    return rows


def _by_id(path: Path, columns: int) -> dict[int, list[str]]:
    try:
        return {int(r[0]): r[1:] for r in _read_rows(path, columns)}
    except ValueError as err:
        raise DataError(f"'{path}' has a non-numeric id ({err}): restore it from the "
                        "CUB_200_2011 archive") from None


def _class_name(folder_name: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black_footed_Albatross'."""
    head, dot, tail = folder_name.partition(".")
    return tail if dot and head.isdigit() else folder_name


def _lookup(table: dict, image_id: int, path: Path) -> list[str]:
    if image_id not in table:
        raise DataError(f"image id {image_id} is missing from '{path}': restore the file from "
                        "the CUB_200_2011 archive")
    return table[image_id]


class _Index:
    """Everything the text files say about one split, in image-id order."""

    def __init__(self, root: Path, split: str):
        images = _by_id(root / "images.txt", 2)
        labels = _by_id(root / "image_class_labels.txt", 2)
        classes = _by_id(root / "classes.txt", 2)
        is_train = _by_id(root / "train_test_split.txt", 2)
        boxes = _by_id(root / "bounding_boxes.txt", 5)
        class_ids = sorted(classes)
        self.class_names = [_class_name(classes[c][0]) for c in class_ids]
        label_of = {c: i for i, c in enumerate(class_ids)}
        want = "1" if split == "train" else "0"
        self.ids = [i for i in sorted(images)
                    if _lookup(is_train, i, root / "train_test_split.txt")[0] == want]
        self.rel_paths = [images[i][0] for i in self.ids]
        self.labels = [label_of[int(_lookup(labels, i, root / "image_class_labels.txt")[0])]
                       for i in self.ids]
        xywh = np.array([[float(v) for v in _lookup(boxes, i, root / "bounding_boxes.txt")]
                         for i in self.ids], dtype=np.float32).reshape(-1, 4)
        self.boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


def _segmentation_paths(root: Path, rel_paths: list[str]) -> list[Path] | None:
    seg_root = root / "segmentations"
    if not seg_root.is_dir():
        return None
    paths = [(seg_root / rel).with_suffix(".png") for rel in rel_paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"segmentation '{missing[0]}' not found ({len(missing)} missing): extract "
                        "the complete segmentations archive or remove the segmentations folder")
    return paths


def _attribute_names(root: Path, count: int) -> list[str]:
    for candidate in (root / "attributes.txt", root / "attributes" / "attributes.txt",
                      root.parent / "attributes.txt"):
        if candidate.is_file():
            names = [r[1] for r in _read_rows(candidate, 2)]
            if len(names) != count:
                raise DataError(f"'{candidate}' names {len(names)} attributes but the class "
                                f"attribute table has {count} columns: restore both files")
            return names
    warnings.warn(f"attributes.txt not found in or beside '{root}'; attributes are named by "
                  "number (copy attributes.txt from the CUB archive to name them)", stacklevel=3)
    return [f"attribute_{i + 1:03d}" for i in range(count)]


def load_class_attributes(root, num_classes: int):
    """(float32 [classes, attributes] in percent, names) or (None, None) when not present."""
    root = Path(root)
    table_path = root / _ATTRIBUTES_FILE
    if not table_path.is_file():
        return None, None
    try:
        table = np.loadtxt(table_path, dtype=np.float32, ndmin=2)
    except ValueError as err:
        raise DataError(f"cannot parse '{table_path}' ({err}): restore it from the "
                        "CUB_200_2011 archive") from None
    if table.shape[0] != num_classes:
        raise DataError(f"'{table_path}' has {table.shape[0]} rows but there are {num_classes} "
                        "classes: restore it from the CUB_200_2011 archive")
    return table, _attribute_names(root, table.shape[1])


def cub_labels(root, split: str = "train") -> list[int]:
    """Labels of a split from the text files alone (to choose subsets before decoding)."""
    if split not in SPLITS:
        raise DataError(f"unknown CUB split '{split}': use one of {', '.join(SPLITS)}")
    return _Index(Path(root), split).labels


class CUBDataset(ImageDataset):
    """One split of CUB-200-2011 with boxes, optional masks and class attributes.

    ``crop_to_box`` crops every image (and mask) to its bird box before resizing, as ProtoPNet's
    original pipeline did; the box then covers the whole image. ``indices`` keeps a subset of the
    split (positions within the split, in image-id order).
    """

    def __init__(self, root, split: str = "train", image_size: int = 224, mean=(0.5,) * 3,
                 std=(0.5,) * 3, augment: bool = False, crop_to_box: bool = False, indices=None,
                 preload="auto"):
        root = Path(root)
        if split not in SPLITS:
            raise DataError(f"unknown CUB split '{split}': use one of {', '.join(SPLITS)}")
        if not root.is_dir():
            raise DataError(f"CUB folder '{root}' not found: give the extracted CUB_200_2011 "
                            "directory")
        index = _Index(root, split)
        keep = np.arange(len(index.ids)) if indices is None else np.asarray(indices, np.int64)
        if keep.size and (keep.min() < 0 or keep.max() >= len(index.ids)):
            raise DataError(f"indices must lie in 0..{len(index.ids) - 1} for the CUB {split} "
                            "split")
        paths = [root / "images" / index.rel_paths[i] for i in keep]
        boxes = index.boxes[keep]
        masks = _segmentation_paths(root, [index.rel_paths[i] for i in keep])
        store = ImageStore(paths, [index.labels[i] for i in keep], image_size, mask_paths=masks,
                           boxes=boxes, crops=boxes if crop_to_box else None, preload=preload,
                           source=f"'{root}' ({split})")
        super().__init__(store, index.class_names, mean=mean, std=std, augment=augment)
        self.root = root
        self.split = split
        self.image_ids = [index.ids[i] for i in keep]
        self.class_attributes, self.attribute_names = load_class_attributes(
            root, len(index.class_names))
