"""Image folders: one sub-folder per class, optional masks folder and boxes JSON.

Two layouts are read, so the synthetic generator and real data go through the same code::

    root/<class>/<name>.png                      plain class-per-folder tree
    split/images/<class>/<name>.png              "split" layout (what synthetic-parts writes)
    split/masks/<class>/<name>.png               same relative path, any image extension
    split/boxes.json                             {"<class>/<name>.png": [x0, y0, x1, y1]}

Boxes are in the original image's pixels (exclusive x1/y1) and are scaled to the resized image.
Files are sorted, so item order (and therefore every seeded split) is deterministic. A split
folder that has an ``images/`` sub-folder is read as the split layout (so a plain tree must not
name a class "images").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from protozoo.data.base import ImageDataset, ImageStore
from protozoo.data.images import IMAGE_EXTENSIONS
from protozoo.errors import DataError

_EXTS = ", ".join(IMAGE_EXTENSIONS)


def _is_image(path: Path) -> bool:
    hidden = path.name.startswith(".")
    return not hidden and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _images_under(folder: Path) -> list[Path]:
    """All image files below ``folder`` (recursively), in a stable order."""
    return sorted((p for p in folder.rglob("*") if _is_image(p)), key=lambda p: p.as_posix())


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"data folder '{root}' not found: it must contain one sub-folder per class")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if dirs:
        return dirs
    if any(_is_image(p) for p in root.iterdir()):
        raise DataError(f"found images directly in '{root}' but no class sub-folders: "
                        "put each class's images in its own sub-folder")
    raise DataError(f"data folder '{root}' is empty: it must contain one sub-folder per class "
                    f"with images ({_EXTS})")


def scan_class_folders(root, class_names=None) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) for a class-per-folder tree.

    ``class_names`` fixes the label order (the test split reuses the training split's classes);
    a folder that is not among them is an error, a class without a folder simply has no items.
    """
    root = Path(root)
    dirs = _class_dirs(root)
    names = [d.name for d in dirs] if class_names is None else [str(c) for c in class_names]
    unknown = [d.name for d in dirs if d.name not in names]
    if unknown:
        raise DataError(f"class folder(s) {', '.join(unknown)} in '{root}' are not among the "
                        f"training classes ({', '.join(names)}): rename or remove them")
    files, labels = [], []
    for d in dirs:
        found = _images_under(d)
        if not found:
            raise DataError(f"class folder '{d}' has no images ({_EXTS}): add images or remove it")
        files += found
        labels += [names.index(d.name)] * len(found)
    return files, labels, names


def _mask_paths(files: list[Path], root: Path, masks_root: Path) -> list[Path]:
    """Match every image to the mask with the same relative path and stem (any extension)."""
    if not masks_root.is_dir():
        raise DataError(f"masks folder '{masks_root}' not found: give the folder that mirrors "
                        "the image folder, or no masks folder")
    by_stem = {p.relative_to(masks_root).with_suffix("").as_posix(): p
               for p in _images_under(masks_root)}
    out = []
    for f in files:
        key = f.relative_to(root).with_suffix("").as_posix()
        if key not in by_stem:
            raise DataError(f"no mask for image '{f}': add '{masks_root / key}.png' "
                            "or remove the masks folder")
        out.append(by_stem[key])
    return out


def read_boxes_json(boxes_file: Path, keys: list[str]) -> np.ndarray:
    """float32 [N, 4] boxes for ``keys`` (relative image paths) from a JSON object."""
    try:
        with open(boxes_file) as fh:
            table = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"boxes file '{boxes_file}' not found: give an existing JSON file "
                        "or no boxes file") from None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read boxes file '{boxes_file}' ({err}): fix or re-export the "
                        "JSON") from None
    if not isinstance(table, dict):
        raise DataError(f"boxes file '{boxes_file}' must hold a JSON object "
                        '{"<class>/<file>": [x0, y0, x1, y1], ...}')
    boxes = np.zeros((len(keys), 4), dtype=np.float32)
    for i, key in enumerate(keys):
        box = table.get(key)
        if box is None:
            raise DataError(f"boxes file '{boxes_file}' has no entry for '{key}': add "
                            '"' + key + '": [x0, y0, x1, y1]')
        numbers = isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        if not (numbers and box[2] > box[0] and box[3] > box[1]):
            raise DataError(f"box for '{key}' in '{boxes_file}' is {box!r}: it must be "
                            "[x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        boxes[i] = box
    return boxes


class ImageFolderDataset(ImageDataset):
    """A class-per-folder image tree with optional masks and boxes (see the module doc).

    ``indices`` keeps only those items (positions in the sorted file list), and only they are
    decoded. Use :meth:`subset` to make further views that share the decoded pixels.
    """

    def __init__(self, root, image_size: int, mean=(0.5,) * 3, std=(0.5,) * 3, masks_root=None,
                 boxes_file=None, class_names=None, augment: bool = False, preload="auto",
                 indices=None):
        root = Path(root)
        files, labels, names = scan_class_folders(root, class_names)
        if indices is not None:
            keep = np.asarray(indices, dtype=np.int64).reshape(-1)
            if keep.size and (keep.min() < 0 or keep.max() >= len(files)):
                raise DataError(f"indices must lie in 0..{len(files) - 1} for '{root}'")
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        masks = None if masks_root is None else _mask_paths(files, root, Path(masks_root))
        keys = [f.relative_to(root).as_posix() for f in files]
        boxes = None if boxes_file is None else read_boxes_json(Path(boxes_file), keys)
        store = ImageStore(files, labels, image_size, mask_paths=masks, boxes=boxes,
                           preload=preload, source=f"'{root}'")
        super().__init__(store, names, mean=mean, std=std, augment=augment)
        self.root = root


def images_root(split_root) -> Path:
    """Where the class folders of a split are: ``split/images`` if present, else ``split``."""
    split_root = Path(split_root)
    return split_root / "images" if (split_root / "images").is_dir() else split_root


def load_split_folder(split_root, image_size: int, mean=(0.5,) * 3, std=(0.5,) * 3,
                      class_names=None, augment: bool = False, preload="auto",
                      indices=None) -> ImageFolderDataset:
    """Read one split, finding ``images/``, ``masks/`` and ``boxes.json`` when they are there."""
    split_root = Path(split_root)
    images = images_root(split_root)
    if images == split_root:
        return ImageFolderDataset(split_root, image_size, mean, std, class_names=class_names,
                                  augment=augment, preload=preload, indices=indices)
    masks = split_root / "masks"
    boxes = split_root / "boxes.json"
    return ImageFolderDataset(
        images, image_size, mean, std,
        masks_root=masks if masks.is_dir() else None,
        boxes_file=boxes if boxes.is_file() else None,
        class_names=class_names, augment=augment, preload=preload, indices=indices,
    )
