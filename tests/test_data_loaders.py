"""Folder, CUB, digits and synthetic loaders: the item contract, resizing, splits and errors.

Fixtures are tiny trees written with PIL into ``tmp_path``; nothing is downloaded.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from protozoo.data import (
    DATASETS, CUBDataset, ImageFolderDataset, build_data, denormalize, load_split_folder,
    stratified_split,
)
from protozoo.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _save(path: Path, array, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)
    return path


def _solid(h, w, rgb):
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (h, w, 3)).copy()


def _split_tree(split: Path, per_class: int, size=(20, 40)) -> None:
    """split/images/<class>/, masks/ (left half on) and boxes.json, RGB only."""
    h, w = size
    boxes = {}
    for c, name in enumerate(("cat", "dog", "emu")):
        for i in range(per_class):
            rel = f"{name}/{i:03d}.png"
            _save(split / "images" / rel, _solid(h, w, (40 * c + i, 100, 200)))
            mask = np.zeros((h, w), np.uint8)
            mask[:, : w // 2] = 255
            _save(split / "masks" / rel, mask, "L")
            boxes[rel] = [4, 2, 20, 10]
    (split / "boxes.json").write_text(json.dumps(boxes))


@pytest.fixture
def split_dir(tmp_path) -> Path:
    root = tmp_path / "data"
    _split_tree(root / "train", per_class=6)
    _split_tree(root / "test", per_class=2)
    return root


@pytest.fixture
def plain_dir(tmp_path) -> Path:
    """train/test class folders with grayscale, RGBA and palette images among RGB ones."""
    root = tmp_path / "plain"
    for split, count in (("train", 4), ("test", 1)):
        for name in ("a", "b"):
            for i in range(count):
                suffix = ".jpg" if i % 2 else ".png"
                _save(root / split / name / f"{i}{suffix}", _solid(10, 12, (10, 128, 250)))
    _save(root / "train" / "a" / "gray.png", np.full((10, 12), 77, np.uint8), "L")
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[:, :6] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    _save(root / "train" / "b" / "rgba.png", rgba, "RGBA")
    pal = Image.fromarray(np.where(np.arange(12) < 6, 1, 0).repeat(10).reshape(12, 10).T
                          .astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.save(root / "train" / "b" / "palette.png", transparency=0)  # index 0 is transparent
    return root


# -- contract ---------------------------------------------------------------------------------
def _check_contract(ds, size, masks, boxes):
    item = ds[1]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert isinstance(item["label"], int) and item["index"] == 1 and isinstance(item["path"], str)
    assert ("mask" in item) == masks and ds.has_masks == masks
    assert ("box" in item) == boxes and ds.has_boxes == boxes
    if masks:
        assert item["mask"].shape == (1, size, size) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    if boxes:
        assert item["box"].shape == (4,) and item["box"].dtype == torch.float32
    raw = ds.raw_image(1)
    assert raw.shape == (size, size, 3) and raw.dtype == np.uint8
    assert len(ds.labels) == len(ds) and all(isinstance(v, int) for v in ds.labels)


def test_split_folder_contract_normalisation_mask_and_box(split_dir):
    ds = load_split_folder(split_dir / "train", 16, MEAN, STD)
    _check_contract(ds, 16, masks=True, boxes=True)
    assert ds.class_names == ["cat", "dog", "emu"] and len(ds) == 18
    item = ds[7]  # dog/001.png, solid (41, 100, 200)
    expected = [(41 / 255 - MEAN[0]) / STD[0], (100 / 255 - MEAN[1]) / STD[1],
                (200 / 255 - MEAN[2]) / STD[2]]
    assert torch.allclose(item["image"][:, 5, 9], torch.tensor(expected), atol=1e-5)
    assert item["label"] == 1 and item["path"].endswith("dog/001.png")
    # mask: left half of 40 px wide -> left 8 of 16 columns (nearest keeps it binary)
    assert item["mask"][0, :, :8].eq(1).all() and item["mask"][0, :, 8:].eq(0).all()
    # box [4, 2, 20, 10] in a 40x20 (w x h) image resized to 16x16
    assert torch.allclose(item["box"], torch.tensor([4 * 16 / 40, 2 * 16 / 20,
                                                     20 * 16 / 40, 10 * 16 / 20]))


def test_preloaded_and_lazy_give_the_same_items(split_dir):
    eager = load_split_folder(split_dir / "train", 16, preload=True)
    lazy = load_split_folder(split_dir / "train", 16, preload=False)
    assert eager._store.images is not None and lazy._store.images is None
    for i in (0, 5, 17):
        a, b = eager[i], lazy[i]
        for key in ("image", "mask", "box"):
            assert torch.equal(a[key], b[key])
        assert a["path"] == b["path"] and a["label"] == b["label"]


def test_horizontal_flip_moves_mask_and_box_together(split_dir):
    ds = load_split_folder(split_dir / "train", 16, MEAN, STD).subset(range(18), augment=True)
    plain = ds.subset(range(18), augment=False)
    torch.manual_seed(0)
    flips = 0
    for _ in range(20):
        item, ref = ds[7], plain[7]
        if torch.equal(item["mask"], ref["mask"]):
            continue
        flips += 1
        assert torch.equal(item["image"], ref["image"].flip(-1))
        assert torch.equal(item["mask"], ref["mask"].flip(-1))
        x0, y0, x1, y1 = ref["box"].tolist()
        assert item["box"].tolist() == pytest.approx([16 - x1, y0, 16 - x0, y1])
    assert 0 < flips < 20


def test_conversion_to_rgb_warns_once(plain_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(plain_dir / "train", 12)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "3 of 11 images" in messages[0], messages
    paths = ds.paths
    gray = ds.raw_image(paths.index(str(plain_dir / "train" / "a" / "gray.png")))
    assert (gray == 77).all()
    rgba = ds.raw_image(paths.index(str(plain_dir / "train" / "b" / "rgba.png")))
    assert tuple(rgba[5, 0]) == (255, 0, 0) and tuple(rgba[5, -1]) == (255, 255, 255)
    pal = ds.raw_image(paths.index(str(plain_dir / "train" / "b" / "palette.png")))
    assert tuple(pal[5, 0]) == (0, 200, 0) and tuple(pal[5, -1]) == (255, 255, 255)


def test_lazy_mode_also_warns_once(plain_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageFolderDataset(plain_dir / "train", 12, preload=False)
    assert len(caught) == 1


def test_dataloader_collates_items(split_dir):
    ds = load_split_folder(split_dir / "train", 16)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["mask"].shape == (4, 1, 16, 16)
    assert batch["box"].shape == (4, 4) and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1, 2, 3] and len(batch["path"]) == 4


def test_denormalize_inverts_the_item(split_dir):
    ds = load_split_folder(split_dir / "train", 16, MEAN, STD)
    assert np.array_equal(denormalize(ds[3]["image"], MEAN, STD), ds.raw_image(3))


# -- errors -----------------------------------------------------------------------------------
def test_truncated_image_is_named(tmp_path):
    good = _save(tmp_path / "t" / "a" / "ok.png", _solid(32, 32, (1, 2, 3)))
    _save(tmp_path / "t" / "b" / "ok.png", _solid(32, 32, (1, 2, 3)))
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3))
    bad = _save(tmp_path / "t" / "a" / "bad.jpg", noisy)
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(DataError, match=r"bad\.jpg.*delete or re-export"):
        ImageFolderDataset(tmp_path / "t", 8, preload=True)
    lazy = ImageFolderDataset(tmp_path / "t", 8, preload=False)  # header is intact
    with pytest.raises(DataError, match=r"bad\.jpg"):
        lazy[lazy.paths.index(str(bad))]
    assert lazy[lazy.paths.index(str(good))]["image"].shape == (3, 8, 8)


def test_not_an_image_is_named(tmp_path):
    _save(tmp_path / "t" / "a" / "ok.png", _solid(4, 4, (1, 2, 3)))
    (tmp_path / "t" / "a" / "junk.png").write_bytes(b"not a png")
    for preload in (True, False):
        with pytest.raises(DataError, match=r"junk\.png"):
            ImageFolderDataset(tmp_path / "t", 8, preload=preload)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        ImageFolderDataset(tmp_path / "empty", 8)
    _save(tmp_path / "flat" / "x.png", _solid(4, 4, (0, 0, 0)))
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "flat", 8)
    (tmp_path / "hollow" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=r"hollow/cls.*no images"):
        ImageFolderDataset(tmp_path / "hollow", 8)
    _save(tmp_path / "x" / "zebra" / "1.png", _solid(4, 4, (0, 0, 0)))
    with pytest.raises(DataError, match="zebra"):
        ImageFolderDataset(tmp_path / "x", 8, class_names=["cat"])


def test_mask_and_box_errors(split_dir):
    train = split_dir / "train"
    Image.fromarray(np.zeros((5, 5), np.uint8), "L").save(train / "masks" / "dog" / "002.png")
    with pytest.raises(DataError, match=r"masks/dog/002\.png' is 5x5 .* 40x20"):
        load_split_folder(train, 16)
    (train / "masks" / "dog" / "002.png").unlink()
    with pytest.raises(DataError, match=r"no mask for image .*dog/002\.png"):
        load_split_folder(train, 16)
    (train / "masks").rename(train / "hidden-masks")
    boxes = json.loads((train / "boxes.json").read_text())
    del boxes["emu/000.png"]
    (train / "boxes.json").write_text(json.dumps(boxes))
    with pytest.raises(DataError, match=r"boxes\.json' has no entry for 'emu/000\.png'"):
        load_split_folder(train, 16)
    (train / "boxes.json").write_text("{broken")
    with pytest.raises(DataError, match=r"cannot read boxes file"):
        load_split_folder(train, 16)


def test_build_data_argument_errors(tmp_path, split_dir):
    with pytest.raises(DataError) as err:
        build_data("imagenet")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(DataError, match="val_fraction"):
        build_data("digits", val_fraction=0)
    with pytest.raises(DataError, match=r"needs a data folder"):
        build_data("folder")
    (tmp_path / "only-train" / "train").mkdir(parents=True)
    (tmp_path / "only-train" / "train" / "x").mkdir()
    with pytest.raises(DataError, match=r"only-train/test' not found: --data-dir must contain "
                                        r"train/ and test/"):
        build_data("folder", data_dir=tmp_path / "only-train")
    with pytest.raises(DataError, match="num_classes=7"):
        build_data("folder", data_dir=split_dir, num_classes=7, image_size=8)


# -- splits -----------------------------------------------------------------------------------
def test_stratified_split_is_disjoint_complete_and_seeded():
    labels = np.repeat(np.arange(5), [30, 10, 2, 7, 51])
    kept, held = stratified_split(labels, 0.1, seed=4)
    assert not set(kept) & set(held) and sorted([*kept, *held]) == list(range(labels.size))
    assert set(labels[held]) == set(range(5)) and set(labels[kept]) == set(range(5))
    again, _ = stratified_split(labels, 0.1, seed=4)
    other, _ = stratified_split(labels, 0.1, seed=5)
    assert np.array_equal(kept, again) and not np.array_equal(kept, other)
    assert abs(held.size - 10) <= 3


def test_folder_bundle_splits(split_dir):
    bundle = build_data("folder", data_dir=split_dir, image_size=16, augment=True, seed=1,
                        val_fraction=0.2)
    assert bundle.class_names == ["cat", "dog", "emu"] and bundle.image_size == 16
    assert bundle.has_masks and bundle.has_boxes
    train, val, test, push = (set(ds.paths) for ds in (bundle.train, bundle.val, bundle.test,
                                                      bundle.push))
    assert train == push and not train & val and not (train | val) & test
    assert len(train) + len(val) == 18 and len(test) == 6
    assert set(bundle.val.labels) == {0, 1, 2}
    assert bundle.train.augment and not bundle.push.augment and not bundle.val.augment
    assert bundle.train._store is bundle.push._store is bundle.val._store  # decoded once
    assert not bundle.test.augment


def test_plain_folder_bundle_and_test_class_order(plain_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = build_data("folder", data_dir=plain_dir, image_size=12, num_train=6)
    assert bundle.class_names == ["a", "b"] and not bundle.has_masks and not bundle.has_boxes
    assert len(bundle.train) + len(bundle.val) <= 7
    _check_contract(bundle.test, 12, masks=False, boxes=False)


# -- digits -----------------------------------------------------------------------------------
def test_digits_bundle():
    bundle = build_data("digits", seed=3)
    assert bundle.class_names == [str(d) for d in range(10)] and bundle.image_size == 32
    _check_contract(bundle.train, 32, masks=False, boxes=False)
    assert len(bundle.test) == pytest.approx(1797 * 0.25, abs=10)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797
    paths = [set(ds.paths) for ds in (bundle.train, bundle.val, bundle.test)]
    assert not paths[0] & paths[1] and not (paths[0] | paths[1]) & paths[2]
    assert set(bundle.val.labels) == set(range(10))
    assert bundle.test.paths == build_data("digits", seed=9).test.paths  # test split is fixed
    assert bundle.train[0]["path"].startswith("digits/train/")
    raw = bundle.train.raw_image(0)
    assert (raw[..., 0] == raw[..., 2]).all() and raw.max() > 200


# -- CUB --------------------------------------------------------------------------------------
def _cub_tree(root: Path, with_masks=True) -> Path:
    """3 classes x 3 images (first two of each class are train), 30x20 images, boxes, attributes."""
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    lines = {"images": [], "labels": [], "split": [], "boxes": []}
    image_id = 0
    for c, folder in enumerate(classes, 1):
        for i in range(3):
            image_id += 1
            rel = f"{folder}/bird_{i}.jpg"
            _save(root / "images" / rel, _solid(20, 30, (30 * c, 60, 90)))
            if with_masks:
                seg = np.zeros((20, 30), np.uint8)
                seg[5:15, 3:18] = 200  # soft edge values below 128 would be background
                _save((root / "segmentations" / rel).with_suffix(".png"), seg, "L")
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c}")
            lines["split"].append(f"{image_id} {1 if i < 2 else 0}")
            lines["boxes"].append(f"{image_id} 3.0 5.0 15.0 10.0")
    for name, key in (("images", "images"), ("image_class_labels", "labels"),
                      ("train_test_split", "split"), ("bounding_boxes", "boxes")):
        (root / f"{name}.txt").write_text("\n".join(lines[key]) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i} {c}" for i, c in enumerate(classes, 1)))
    (root / "attributes").mkdir()
    table = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savetxt(root / "attributes" / "class_attribute_labels_continuous.txt", table, fmt="%.4f")
    names = ["has_bill_shape::curved", "has_wing_color::blue", "has_size::small", "has_eye::red"]
    (root.parent / "attributes.txt").write_text(
        "\n".join(f"{i} {n}" for i, n in enumerate(names, 1)))
    return root


def test_cub_dataset(tmp_path):
    root = _cub_tree(tmp_path / "CUB_200_2011")
    train = CUBDataset(root, "train", image_size=10, mean=MEAN, std=STD)
    _check_contract(train, 10, masks=True, boxes=True)
    assert train.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert train.labels == [0, 0, 1, 1, 2, 2] and len(CUBDataset(root, "test", image_size=10)) == 3
    item = train[1]
    assert torch.allclose(item["box"], torch.tensor([3 / 3, 5 / 2, 18 / 3, 15 / 2]))
    expected_mask = torch.zeros(10, 10)
    # nearest samples pixel centres: output row r <- input row 2r+1, column c <- column 3c+1;
    # the segment covers input rows 5..14 and columns 3..17, so output rows 2..6, columns 1..5
    expected_mask[2:7, 1:6] = 1
    assert torch.equal(item["mask"][0], expected_mask)
    assert train.class_attributes.shape == (3, 4) and train.class_attributes.dtype == np.float32
    assert train.attribute_names[1] == "has_wing_color::blue"
    cropped = CUBDataset(root, "train", image_size=10, crop_to_box=True)
    assert cropped[0]["box"].tolist() == [0.0, 0.0, 10.0, 10.0]
    assert cropped[0]["mask"].eq(1).all()  # the box lies inside the segmented region


def test_cub_bundle_and_errors(tmp_path):
    root = _cub_tree(tmp_path / "CUB_200_2011", with_masks=False)
    bundle = build_data("cub", data_dir=root, image_size=8, val_fraction=0.3)
    assert not bundle.has_masks and bundle.has_boxes
    assert bundle.class_attributes.shape == (3, 4)
    assert len(bundle.attribute_names) == 4
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match=r"train_test_split\.txt' not found.*CUB_200_2011"):
        CUBDataset(root, "train", image_size=8)
    with pytest.raises(DataError, match="unknown CUB split"):
        CUBDataset(root, "val", image_size=8)


# -- synthetic end to end ---------------------------------------------------------------------
def test_synthetic_bundle_reads_back_ground_truth(tmp_path):
    bundle = build_data("synthetic-parts", cache_dir=tmp_path, num_classes=3, num_train=30,
                        num_test=9, image_size=32, seed=2)
    assert bundle.class_names == ["red-striped", "green-dotted", "blue-checkered"]
    assert bundle.has_masks and bundle.has_boxes and bundle.image_size == 32
    assert len(bundle.train) + len(bundle.val) == 30 and len(bundle.test) == 9
    _check_contract(bundle.test, 32, masks=True, boxes=True)
    for i in range(len(bundle.test)):
        item = bundle.test[i]
        assert bundle.class_names[item["label"]] in item["path"]
        ys, xs = torch.nonzero(item["mask"][0], as_tuple=True)
        x0, y0, x1, y1 = item["box"].tolist()
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    assert bundle.meta["params"]["num_train"] == 30


@pytest.mark.parametrize("name", ["digits", "clevr"])
def test_image_size_must_be_positive_for_every_dataset(tmp_path, name):
    # checked before any loader runs: CLEVR's error used to blame the first image
    with pytest.raises(DataError, match="image_size=0 must be a positive number of pixels"):
        build_data(name, data_dir=tmp_path, image_size=0)


def test_check_data_dir_names_generated_datasets():
    from protozoo.data import check_data_dir

    check_data_dir("clevr", "CLEVR_v1.0")
    check_data_dir("sort-of-clevr", None)
    with pytest.raises(DataError, match="'sort-of-clevr' is generated .* use --dataset clevr"):
        check_data_dir("sort-of-clevr", "CLEVR_v1.0")
