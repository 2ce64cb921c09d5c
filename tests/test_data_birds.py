"""The synthetic-birds generator: the head decides the class, the same cues lie elsewhere."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from protozoo.data import build_data
from protozoo.data import generated as shared
from protozoo.data.generated import read_meta
from protozoo.data import synthetic_birds as sb
from protozoo.errors import DataError

BIRDS = sb.GENERATOR


@pytest.fixture(scope="module")
def arrays():
    """200 images at the default 64 px, with the CPU time they took (CPU time of this process,
    so other jobs on a shared runner do not make the speed check flaky)."""
    start = time.process_time()
    out = BIRDS.arrays(200, num_classes=5, image_size=64, seed=11)
    return out, time.process_time() - start


def _specs(count, num_classes=5, image_size=64, seed=0, split="train"):
    return [spec for _, spec in BIRDS.iter_specs(count, num_classes, image_size, seed, split)]


def test_generation_is_fast(arrays):
    _, seconds = arrays
    assert seconds < 4.0, f"200 images took {seconds:.1f}s of CPU time"


def test_same_seed_same_pixels_other_seed_differs():
    first = BIRDS.arrays(12, image_size=32, seed=7)
    again = BIRDS.arrays(12, image_size=32, seed=7)
    other = BIRDS.arrays(12, image_size=32, seed=8)
    for key in ("images", "masks", "boxes", "labels"):
        assert np.array_equal(first[key], again[key])
    assert not np.array_equal(first["images"], other["images"])


def test_train_and_test_streams_are_disjoint():
    train = BIRDS.arrays(20, image_size=32, seed=0, split="train")["images"]
    test = BIRDS.arrays(20, image_size=32, seed=0, split="test")["images"]
    assert not any(np.array_equal(a, b) for a in train for b in test)
    poses = {s.pose for s in _specs(50, split="train")}
    assert not poses & {s.pose for s in _specs(50, split="test")}


def test_layout_depends_on_index_not_on_count():
    long, short = _specs(30, seed=2), _specs(10, seed=2)
    assert [s.pose for s in short] == [s.pose for s in long[:10]]


def test_mask_is_the_head_inside_the_bird_box(arrays):
    out, _ = arrays
    shares = out["masks"].mean(axis=(1, 2))
    assert shares.min() > 0.0
    assert 0.015 <= shares.mean() <= 0.04, f"head covers {shares.mean():.3f} of the image"
    for mask, box in zip(out["masks"], out["boxes"], strict=True):
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert x0 <= cols[0] and cols[-1] < x1 and y0 <= rows[0] and rows[-1] < y1
    spans = np.maximum(out["boxes"][:, 2] - out["boxes"][:, 0],
                       out["boxes"][:, 3] - out["boxes"][:, 1]) / 64
    assert 0.5 <= spans.min() and spans.max() <= 0.8 and 0.55 <= spans.mean() <= 0.7


def test_box_is_the_tight_box_of_the_bird_and_excludes_clutter():
    for spec in _specs(20, image_size=48):
        out = sb.render(spec, 48)
        bird = out.owner >= sb.TAIL
        x0, y0, x1, y1 = out.box
        assert bird[y0:y1, x0:x1].sum() == bird.sum()
        assert bird[y0, x0:x1].any() and bird[y1 - 1, x0:x1].any()
        assert bird[y0:y1, x0].any() and bird[y0:y1, x1 - 1].any()


def test_mask_is_head_and_eye_not_beak_and_the_landmarks_touch_it():
    for spec in _specs(40, image_size=64):
        out = sb.render(spec, 64)
        owner = out.owner
        assert np.array_equal(out.mask, np.isin(owner, (sb.HEAD, sb.EYE_RING, sb.PUPIL)))
        assert (owner == sb.PUPIL).any() and (owner == sb.BEAK).any()
        grown = out.mask.copy()  # the head grown by one pixel reaches the beak
        grown[1:] |= out.mask[:-1]
        grown[:-1] |= out.mask[1:]
        grown[:, 1:] |= out.mask[:, :-1]
        grown[:, :-1] |= out.mask[:, 1:]
        assert (grown & (owner == sb.BEAK)).any()


def test_head_pixels_carry_the_class_colour(arrays):
    """Mean-preserving texture: the head's own pixels (the eye aside) average to the class's
    palette colour; a patterned head is textured, a solid one is flat."""
    out, _ = arrays
    combos = BIRDS.class_combos(5)
    specs = _specs(200, seed=11)
    for spec, image, mask in zip(specs, out["images"], out["masks"], strict=True):
        owner = sb.render(spec, 64).owner
        head = owner == sb.HEAD
        assert head.sum() > 0.8 * mask.sum()  # the eye is a small part of the mask
        colour, pattern = combos[spec.label]
        pixels = image[head].astype(np.float64)
        assert np.abs(pixels.mean(axis=0) - sb.PALETTE_RGB[colour]).max() < 1.0
        spread = pixels.std(axis=0).max()
        assert spread > 15 if sb.PATTERNS[pattern] != "solid" else spread < 1.0


def test_distractor_parts_carry_the_class_combos_independently_of_the_label():
    num_classes = 5
    combos = BIRDS.class_combos(num_classes)
    specs = _specs(300, num_classes=num_classes, image_size=32)
    seen = set()  # (combo on a non-head part, label of the image)
    for s in specs:
        assert s.combos[sb.HEAD] == combos[s.label]
        seen |= {(combo, s.label) for k, combo in s.combos.items() if k != sb.HEAD}
    # every class's combination appears off the head in images of every other class
    assert {(c, lab) for c in combos for lab in range(num_classes)} <= seen
    # and the body's combination does not follow the label (chance: 1 in num_classes)
    same = np.mean([s.combos[sb.BODY] == combos[s.label] for s in specs])
    assert 0.1 < same < 0.3
    counts = [len(s.clutter) for s in specs]
    assert min(counts) == 2 and max(counts) == 4


def test_distractor_pixels_are_painted_with_their_combo():
    for spec in _specs(30, image_size=64, seed=4):
        out = sb.render(spec, 64)
        for part in (sb.BODY, 1):  # the body and the first clutter blob
            visible = out.owner == part
            if visible.sum() < 20:
                continue
            colour, _ = spec.combos[part]
            mean = out.image[visible].astype(np.float64).mean(axis=0)
            assert np.abs(mean - sb.PALETTE_RGB[colour]).max() < 1.0


def test_poses_vary():
    poses = [s.pose for s in _specs(100)]
    assert {p.facing for p in poses} == {-1, 1}
    tilts = np.degrees([p.tilt for p in poses])
    assert tilts.min() < -15 and tilts.max() > 15 and np.abs(tilts).max() <= 25
    scales = np.array([p.scale for p in poses]) / 64
    assert scales.min() >= 0.85 and scales.max() <= 1.1


def _lda_accuracy(x: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    """Linear discriminant analysis fitted on the even items, scored on the odd ones (numpy:
    sklearn's import alone costs seconds)."""
    fit, held = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    means = np.stack([x[fit & (y == c)].mean(axis=0) for c in range(num_classes)])
    pooled = np.cov((x[fit] - means[y[fit]]).T)
    w = np.linalg.solve(pooled, means.T)  # [features, classes]
    scores = x[held] @ w - 0.5 * np.sum(means.T * w, axis=0)
    return float((scores.argmax(axis=1) == y[held]).mean())


def test_whole_image_mean_colour_does_not_reveal_the_class():
    out = BIRDS.arrays(600, image_size=32, seed=5)
    whole = out["images"].reshape(len(out["images"]), -1, 3).mean(axis=1)
    accuracy = _lda_accuracy(whole, out["labels"], 5)
    assert accuracy < 1 / 5 + 0.15, f"mean RGB predicts the class with accuracy {accuracy:.2f}"
    # the control: the same classifier on the head's mean colour finds the class
    head = np.stack([image[mask].mean(axis=0) for image, mask in
                     zip(out["images"], out["masks"], strict=True)])
    assert _lda_accuracy(head, out["labels"], 5) > 0.9


def test_class_names():
    assert BIRDS.class_names(5) == ["red-solid", "green-striped", "blue-dotted",
                                     "yellow-checkered", "purple-solid"]
    names = BIRDS.class_names(sb.MAX_CLASSES)
    assert len(set(names)) == sb.MAX_CLASSES
    with pytest.raises(DataError, match="num_classes"):
        BIRDS.class_names(sb.MAX_CLASSES + 1)


def test_disk_copy_matches_render(tmp_path):
    root = sb.generate_synthetic_birds(tmp_path / "ds", num_train=6, num_test=4, num_classes=2,
                                       image_size=32, seed=1)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["generator"] == "protozoo.synthetic-birds" and meta["class_names"] == \
        BIRDS.class_names(2)
    boxes = json.loads((root / "test" / "boxes.json").read_text())
    for i, spec in BIRDS.iter_specs(4, 2, 32, 1, "test"):
        out = sb.render(spec, 32)
        rel = f"{meta['class_names'][spec.label]}/{i:05d}.png"
        assert np.array_equal(np.asarray(Image.open(root / "test" / "images" / rel)), out.image)
        assert np.array_equal(np.asarray(Image.open(root / "test" / "masks" / rel)) > 127,
                              out.mask)
        assert boxes[rel] == list(out.box)


def test_build_data_round_trip_through_the_cache(tmp_path, monkeypatch):
    bundle = build_data("synthetic-birds", cache_dir=tmp_path, num_classes=3, num_train=30,
                        num_test=9, image_size=32)
    assert bundle.has_masks and bundle.has_boxes and bundle.image_size == 32
    assert bundle.class_names == BIRDS.class_names(3)
    assert len(bundle.test) == 9 and len(bundle.train) + len(bundle.val) == 30
    item = bundle.test[0]
    assert item["mask"].shape == (1, 32, 32) and item["mask"].sum() > 0
    x0, y0, x1, y1 = item["box"].tolist()
    assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    root = tmp_path / "synthetic-birds-c3-s32-seed0-n30-t9"
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp folders left

    def fail(*args, **kw):
        raise AssertionError("regenerated a complete copy")

    monkeypatch.setattr(shared, "write_dataset", fail)
    again = build_data("synthetic-birds", cache_dir=tmp_path, num_classes=3, num_train=30,
                       num_test=9, image_size=32)
    assert torch.equal(again.test[0]["image"], item["image"])


def test_incomplete_cache_is_regenerated(tmp_path):
    kwargs = dict(num_classes=2, image_size=32, seed=1, num_train=4, num_test=2)
    root = sb.ensure_synthetic_birds(tmp_path, **kwargs)
    first = (root / "test" / "boxes.json").read_text()
    (root / "meta.json").unlink()  # as if an interrupted generation left it behind
    assert sb.ensure_synthetic_birds(tmp_path, **kwargs) == root
    assert read_meta(root)["params"]["num_test"] == 2
    assert (root / "test" / "boxes.json").read_text() == first


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_train=2, num_test=10, num_classes=5), "num_train"),  # a class missing from train
    (dict(num_train=10, num_test=10, image_size=16), "image_size"),  # the eye would vanish
    (dict(num_train=30, num_test=30, num_classes=25), "num_classes"),
])
def test_bad_arguments_raise_data_error(tmp_path, kwargs, match):
    with pytest.raises(DataError, match=match):
        sb.generate_synthetic_birds(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_generation_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        sb.generate_synthetic_birds(tmp_path, num_train=10, num_test=10)
