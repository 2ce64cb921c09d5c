"""Zero-shot splits: seen classes to train on, unseen classes described only by attributes.

A zero-shot dataset is an ordinary :class:`~protozoo.data.DataBundle` over its *seen* classes
(``train``/``val``/``test`` label them 0..S-1, so any zoo classifier trains on it unchanged) plus
``DataBundle.zero_shot``, a :class:`ZeroShotSplit` with what zero-shot methods and the generalised
zero-shot evaluation need: all class names (seen first, then unseen), the class-attribute matrix
and the test images of the unseen classes (labelled S..S+U-1, their index in ``class_names``).

Also here: CUB-200-2011 as a zero-shot dataset (``cub-zsl``). Its class attributes come from
``attributes/class_attribute_labels_continuous.txt`` (read by the CUB loader; percent -> [0, 1]).
The unseen classes are given as a file of class names, one per line (``testclasses.txt``, the
name Xian et al.'s proposed splits use; folder names like ``001.Black_footed_Albatross`` or bare
names both work), looked up in the CUB folder and beside it. Seen classes are the classes listed
in ``trainvalclasses.txt`` when that file exists, else all other classes. Seen classes train on
CUB's train split and are tested on its test split; the unseen test set is the test-split images
of the unseen classes (none of their images is used for training in any case).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from protozoo.data.base import stratified_split
from protozoo.errors import DataError

UNSEEN_FILE = "testclasses.txt"
SEEN_FILE = "trainvalclasses.txt"


@dataclass
class ZeroShotSplit:
    """Classes, attributes and unseen test images of a zero-shot dataset (see the module doc)."""

    class_names: list[str]  # seen first, then unseen: the order an extended classifier uses
    num_seen: int
    attribute_names: list[str]
    class_attributes: np.ndarray  # float32 [len(class_names), len(attribute_names)]
    unseen_test: Dataset  # labels num_seen .. len(class_names) - 1
    attribute_groups: dict[str, list[str]] | None = field(default=None)

    def __post_init__(self):
        self.class_attributes = np.asarray(self.class_attributes, dtype=np.float32)
        shape = (len(self.class_names), len(self.attribute_names))
        if self.class_attributes.shape != shape:
            raise DataError(f"the class-attribute matrix is {self.class_attributes.shape}, "
                            f"expected {shape} (classes x attributes)")
        if not 0 < self.num_seen < len(self.class_names):
            raise DataError(f"a zero-shot split needs seen and unseen classes, got "
                            f"{self.num_seen} seen of {len(self.class_names)}")

    @property
    def seen_classes(self) -> list[str]:
        return self.class_names[: self.num_seen]

    @property
    def unseen_classes(self) -> list[str]:
        return self.class_names[self.num_seen:]

    @property
    def num_unseen(self) -> int:
        return len(self.class_names) - self.num_seen

    @property
    def seen_attributes(self) -> np.ndarray:
        return self.class_attributes[: self.num_seen]

    @property
    def unseen_attributes(self) -> np.ndarray:
        return self.class_attributes[self.num_seen:]


def relabel(dataset, mapping: np.ndarray, class_names: list[str]):
    """A view of ``dataset`` whose labels are ``mapping[old label]`` over ``class_names``.

    The pixels stay shared; only the (small) label array of the store is copied."""
    view = copy.copy(dataset)
    store = copy.copy(dataset._store)
    store.labels = np.asarray(mapping, dtype=np.int64)[store.labels]
    if store.labels.min(initial=0) < 0:
        raise ValueError("relabel mapped an item to no class; select the items first")
    view._store = store
    view.class_names = list(class_names)
    return view


# -- CUB ---------------------------------------------------------------------------------------
def _bare(name: str) -> str:
    head, dot, tail = name.partition(".")
    return tail if dot and head.isdigit() else name


def find_split_file(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root.parent / name):
        if candidate.is_file():
            return candidate
    return None


def read_class_list(path, class_names: list[str]) -> list[int]:
    """Indices into ``class_names`` of the classes a split file lists (one name per line)."""
    path = Path(path)
    index = {name: i for i, name in enumerate(class_names)}
    picked = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        name = _bare(line.strip())
        if not name:
            continue
        if name not in index:
            raise DataError(f"line {number} of '{path}' names class '{line.strip()}', which is "
                            "not in classes.txt: fix the name or use the split of this dataset")
        if index[name] in picked:
            raise DataError(f"'{path}' lists class '{name}' twice: remove the duplicate")
        picked.append(index[name])
    if not picked:
        raise DataError(f"'{path}' lists no classes: write one class name per line")
    return picked


def _cub_classes(root: Path, names: list[str]) -> tuple[list[int], list[int]]:
    """(seen, unseen) class indices from the split files; see the module doc."""
    unseen_path = find_split_file(root, UNSEEN_FILE)
    if unseen_path is None:
        raise DataError(f"cub-zsl needs the unseen classes in '{root / UNSEEN_FILE}' (one class "
                        "name per line, e.g. Xian et al.'s proposed split): put the file there")
    unseen = read_class_list(unseen_path, names)
    seen_path = find_split_file(root, SEEN_FILE)
    if seen_path is None:
        seen = [i for i in range(len(names)) if i not in unseen]
    else:
        seen = read_class_list(seen_path, names)
        both = sorted(set(seen) & set(unseen))
        if both:
            raise DataError(f"class '{names[both[0]]}' is listed in both '{seen_path}' and "
                            f"'{unseen_path}': a class is either seen or unseen")
    if not seen:
        raise DataError(f"'{unseen_path}' lists every class as unseen: keep some classes seen")
    return sorted(seen), sorted(unseen)


def _positions(labels, keep_classes, count, seed):
    labels = np.asarray(labels)
    positions = np.flatnonzero(np.isin(labels, keep_classes))
    if count is not None and int(count) < positions.size:
        positions = positions[stratified_split(labels[positions], int(count) / positions.size,
                                               seed)[1]]
    return positions


def load_cub_zero_shot(root, image_size: int = 224, mean=(0.5,) * 3, std=(0.5,) * 3,
                       num_train=None, num_test=None, seed: int = 0):
    """(train of seen classes, test of seen classes, :class:`ZeroShotSplit`) for CUB-200-2011.

    ``num_train``/``num_test`` keep seeded stratified subsets of about that many seen images
    (quick runs); the unseen test set is subset in proportion to ``num_test``."""
    from protozoo.data.cub import CUBDataset, cub_labels

    root = Path(root)
    train_labels, test_labels = cub_labels(root, "train"), cub_labels(root, "test")
    probe = CUBDataset(root, "test", image_size=image_size, indices=[], preload=False)
    names = probe.class_names
    table, attribute_names = probe.class_attributes, probe.attribute_names
    if table is None:
        raise DataError(f"cub-zsl needs the class attributes "
                        f"'{root / 'attributes' / 'class_attribute_labels_continuous.txt'}': "
                        "extract the complete CUB_200_2011 archive")
    seen, unseen = _cub_classes(root, names)
    order = seen + unseen
    mapping = np.full(len(names), -1, dtype=np.int64)
    mapping[order] = np.arange(len(order))
    all_names = [names[i] for i in order]
    common = dict(image_size=image_size, mean=mean, std=std)
    n_seen_test = int(np.isin(test_labels, seen).sum())
    unseen_count = None if num_test is None else max(len(unseen), round(
        int(num_test) * int(np.isin(test_labels, unseen).sum()) / max(n_seen_test, 1)))
    train = CUBDataset(root, "train", indices=_positions(train_labels, seen, num_train, seed),
                       **common)
    test = CUBDataset(root, "test", indices=_positions(test_labels, seen, num_test, seed), **common)
    unseen_test = CUBDataset(root, "test", **common,
                             indices=_positions(test_labels, unseen, unseen_count, seed))
    seen_names = all_names[: len(seen)]
    split = ZeroShotSplit(
        class_names=all_names, num_seen=len(seen), attribute_names=list(attribute_names),
        class_attributes=table[order] / 100.0,  # percent -> [0, 1]
        unseen_test=relabel(unseen_test, mapping, all_names))
    return relabel(train, mapping, seen_names), relabel(test, mapping, seen_names), split


def cub_zsl_loader(a: dict):
    """``build_data``'s loader for ``cub-zsl``: (train, test, the bundle's ``root`` and
    ``zero_shot``)."""
    if a.get("data_dir") is None:
        raise DataError("dataset 'cub-zsl' needs a data folder: --data-dir must be the extracted "
                        f"CUB_200_2011 folder, with {UNSEEN_FILE} in it or beside it")
    root = Path(a["data_dir"]).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder '{root}' not found: --data-dir must be the extracted "
                        "CUB_200_2011 folder")
    train, test, split = load_cub_zero_shot(root, a["image_size"], a["mean"], a["std"],
                                            a.get("num_train"), a.get("num_test"), a["seed"])
    if a.get("num_classes") is not None and int(a["num_classes"]) != split.num_seen:
        raise DataError(f"num_classes={a['num_classes']} but the split has {split.num_seen} seen "
                        "classes: leave num_classes unset")
    return train, test, {"root": str(root), "zero_shot": split}
