"""The synthetic-parts generator: exact ground truth, deterministic, no colour shortcut."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protozoo.data import generated as shared
from protozoo.data import synthetic_parts as sp
from protozoo.errors import DataError

SENTINEL = (255, 0, 255)  # not reachable by any palette colour, shade or background


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """1000 images on disk (800 train / 200 test), with the CPU time it took.

    CPU time of this process, not wall time, so other jobs on a shared 2-core runner do not make
    the speed test flaky.
    """
    root = tmp_path_factory.mktemp("synth") / "ds"
    start = time.process_time()
    sp.generate_synthetic_parts(root, num_train=800, num_test=200, num_classes=5, seed=3)
    return root, time.process_time() - start


@pytest.fixture(scope="module")
def arrays():
    return sp.generate_arrays(1000, num_classes=5, image_size=64, seed=11)


def _specs(count, num_classes=5, image_size=64, seed=0, split="train"):
    return [spec for _, spec in sp.iter_specs(count, num_classes, image_size, seed, split)]


def test_thousand_images_generate_in_seconds(generated):
    _, seconds = generated
    assert seconds < 10.0, f"generating 1000 images took {seconds:.1f}s of CPU time"


def test_layout_on_disk(generated):
    root, _ = generated
    meta = json.loads((root / "meta.json").read_text())
    names = meta["class_names"]
    assert names == sp.class_names_for(5)
    assert meta["params"] == {"num_train": 800, "num_test": 200, "num_classes": 5,
                              "image_size": 64, "seed": 3}
    for split, count in (("train", 800), ("test", 200)):
        images = sorted((root / split / "images").rglob("*.png"))
        masks = sorted((root / split / "masks").rglob("*.png"))
        boxes = json.loads((root / split / "boxes.json").read_text())
        assert len(images) == len(masks) == len(boxes) == count
        rel = [p.relative_to(root / split / "images").as_posix() for p in images]
        assert rel == [p.relative_to(root / split / "masks").as_posix() for p in masks]
        assert sorted(boxes) == rel
        assert {r.split("/")[0] for r in rel} == set(names)
    with Image.open(masks[0]) as m:
        assert m.mode == "L" and set(np.unique(np.asarray(m))) <= {0, 255}


def test_disk_copy_matches_render(generated):
    root, _ = generated
    names = sp.class_names_for(5)
    for i, spec in sp.iter_specs(200, 5, 64, 3, "test"):  # same count: labels depend on it
        if i == 20:
            break
        out = sp.render(spec, 64)
        rel = f"{names[spec.label]}/{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(root / "test" / "images" / rel)), out.image)
        assert np.array_equal(np.asarray(Image.open(root / "test" / "masks" / rel)) > 127, out.mask)


def test_mask_marks_exactly_the_pixels_painted_by_the_part():
    for spec in _specs(60, num_classes=10, seed=5):
        normal = sp.render(spec, 64)
        marked = sp.render(spec, 64, sentinel=SENTINEL)
        changed = (normal.image != marked.image).any(axis=2)
        is_sentinel = (marked.image == SENTINEL).all(axis=2)
        assert normal.mask.any()
        assert np.array_equal(changed, normal.mask)
        assert np.array_equal(is_sentinel, normal.mask)
        assert np.array_equal(marked.mask, normal.mask)


def test_part_colour_is_the_class_colour(arrays):
    """The textured petal averages to its class's palette colour: the class lives in that part."""
    combos = sp.class_combos(5)
    first = slice(0, 200)
    for image, mask, label in zip(arrays["images"][first], arrays["masks"][first],
                                  arrays["labels"][first], strict=True):
        expected = sp._PALETTE_RGB[combos[label][0]]
        pixels = image[mask].astype(np.float64)
        assert np.abs(pixels.mean(axis=0) - expected).max() < 1.0
        assert pixels.std(axis=0).max() > 15  # textured, not solid


def test_box_holds_the_whole_flower_and_the_mask(arrays):
    for mask, box in zip(arrays["masks"], arrays["boxes"], strict=True):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert x0 <= cols[0] and cols[-1] < x1 and y0 <= rows[0] and rows[-1] < y1
    spec = _specs(1)[0]
    owner = sp._ownership(spec, 64)
    x0, y0, x1, y1 = sp.render(spec, 64).box
    assert owner[y0:y1, x0:x1].sum() == owner.sum()  # nothing of the flower outside the box
    assert owner[y0, x0:x1].any() and owner[y1 - 1, x0:x1].any()  # and the box is tight


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = sp.generate_arrays(40, seed=7)
    again = sp.generate_arrays(40, seed=7)
    other = sp.generate_arrays(40, seed=8)
    for key in ("images", "masks", "boxes", "labels"):
        assert np.array_equal(first[key], again[key])
    assert not np.array_equal(first["images"], other["images"])
    a = sp.generate_synthetic_parts(tmp_path / "a", num_train=15, num_test=5, seed=7)
    b = sp.generate_synthetic_parts(tmp_path / "b", num_train=15, num_test=5, seed=7)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_layout_depends_on_index_not_on_count():
    # labels are balanced per count, but the geometry of image i is fixed by (seed, split, i)
    specs_long, specs_short = _specs(30, seed=2), _specs(10, seed=2)
    assert [s.centre for s in specs_short] == [s.centre for s in specs_long[:10]]
    assert [s.petals for s in specs_short] == [s.petals for s in specs_long[:10]]


def test_train_and_test_differ():
    train = sp.generate_arrays(20, seed=0, split="train")["images"]
    test = sp.generate_arrays(20, seed=0, split="test")["images"]
    assert not any(np.array_equal(a, b) for a in train for b in test)


def test_whole_image_mean_colour_does_not_reveal_the_class(arrays):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mean_rgb = arrays["images"].reshape(len(arrays["images"]), -1, 3).mean(axis=1)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    accuracy = cross_val_score(clf, mean_rgb, arrays["labels"], cv=5).mean()
    assert accuracy < 1 / 5 + 0.15, f"mean RGB predicts the class with accuracy {accuracy:.2f}"


def test_part_position_varies_and_colours_are_a_permutation():
    specs = _specs(300)
    assert {s.slot for s in specs} == set(range(sp.NUM_PETALS))
    for s in specs[:50]:
        assert sorted(s.petal_colours) == list(range(len(sp.PALETTE)))
        assert s.petal_colours[s.slot] == s.colour


def test_labels_are_balanced():
    labels = sp.split_labels(103, 5, seed=0, split="train")
    counts = np.bincount(labels, minlength=5)
    assert counts.max() - counts.min() <= 1


def test_class_names_are_unique_and_readable():
    names = sp.class_names_for(sp.MAX_CLASSES)
    assert len(set(names)) == sp.MAX_CLASSES
    assert names[:5] == ["red-striped", "green-dotted", "blue-checkered", "yellow-striped",
                         "purple-dotted"]
    ten = sp.generate_arrays(30, num_classes=10, seed=0)
    assert set(ten["labels"].tolist()) == set(range(10))
    with pytest.raises(DataError, match="num_classes"):
        sp.class_names_for(sp.MAX_CLASSES + 1)


def test_other_image_sizes():
    out = sp.generate_arrays(5, image_size=96, seed=0)
    assert out["images"].shape == (5, 96, 96, 3) and out["masks"].any(axis=(1, 2)).all()


def test_ensure_generates_once_and_reuses(tmp_path, monkeypatch):
    kwargs = dict(num_classes=3, image_size=32, seed=1, num_train=12, num_test=6)
    root = sp.ensure_synthetic_parts(tmp_path, **kwargs)
    assert root.name == "synthetic-parts-c3-s32-seed1-n12-t6"
    assert sp.read_meta(root)["params"]["num_test"] == 6

    def fail(*args, **kw):
        raise AssertionError("regenerated a complete copy")

    monkeypatch.setattr(shared, "write_dataset", fail)
    assert sp.ensure_synthetic_parts(tmp_path, **kwargs) == root
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp folders left


def test_incomplete_copy_is_replaced(tmp_path):
    kwargs = dict(num_classes=3, image_size=32, seed=1, num_train=12, num_test=6)
    root = sp.ensure_synthetic_parts(tmp_path, **kwargs)
    (root / "meta.json").unlink()  # as if an old, interrupted generation left it behind
    assert sp.ensure_synthetic_parts(tmp_path, **kwargs) == root
    assert sp.read_meta(root) is not None


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(shared, "write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        sp.ensure_synthetic_parts(tmp_path, num_classes=3, image_size=32, seed=1,
                                  num_train=12, num_test=6)
    assert list(Path(tmp_path).iterdir()) == []


def test_bad_arguments_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="num_train"):
        sp.generate_synthetic_parts(tmp_path / "x", num_train=2, num_test=10, num_classes=5)
    with pytest.raises(DataError, match="image_size"):
        sp.generate_synthetic_parts(tmp_path / "x", num_train=10, num_test=10, image_size=8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        sp.generate_synthetic_parts(tmp_path / "full", num_train=10, num_test=10)
