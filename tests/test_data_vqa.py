"""VQA data: the Sort-of-CLEVR generator (answers, masks, perturbations), the CLEVR-layout loader
and the question vocabulary.

Answers are checked against hand-computed scenes and against an oracle that reads the rendered
*pixels* (colour -> object, area -> shape, pixel centroid -> position), so the scene description,
the renderer and the answer function are tested against each other, not against themselves.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import protozoo
from protozoo.data import build_data
from protozoo.data import sort_of_clevr as sc
from protozoo.data.clevr import scene_split
from protozoo.data.generated import MANIFEST
from protozoo.data.text import PAD_ID, UNK_ID, Vocabulary, tokenize
from protozoo.errors import DataError

S = 75


def _scene(*objects, size=S) -> sc.Scene:
    """Objects as (colour, shape, x, y); Santoro's object size."""
    return sc.Scene(size, tuple(sc.SceneObject(c, s, (float(x), float(y)), sc.object_size(size))
                                for c, s, x, y in objects))


# red square top-left, green circle right of it, yellow square top-right, gray square in the
# middle, orange circle bottom-left, blue square bottom-right
HAND = _scene(("red", "square", 10.5, 10.5), ("green", "circle", 30.5, 10.5),
              ("blue", "square", 60.5, 60.5), ("orange", "circle", 10.5, 60.5),
              ("gray", "square", 40.5, 40.5), ("yellow", "square", 60.5, 20.5))


def _ask(scene, subtype, colour):
    q = sc.Question(subtype, colour)
    return sc.answer(scene, q), sc.relevant_objects(scene, q)


# -- answers ----------------------------------------------------------------------------------
def test_hand_built_scene_answers():
    # distances from red (10.5,10.5): green 20, gray 42.4, orange 50, yellow 50.99, blue 70.7
    assert _ask(HAND, "closest", "red") == ("circle", (0, 1))
    assert _ask(HAND, "furthest", "red") == ("square", (0, 2))
    # from yellow (60.5,20.5): gray 28.3, green 31.6, blue 40, red 51.0, orange 64.0
    assert _ask(HAND, "closest", "yellow") == ("square", (5, 4))
    assert _ask(HAND, "furthest", "yellow") == ("circle", (5, 3))
    # squares: red, blue, gray, yellow; circles: green, orange
    assert _ask(HAND, "count", "gray") == ("4", (4, 0, 2, 5))
    assert _ask(HAND, "count", "orange") == ("2", (3, 1))
    assert _ask(HAND, "shape", "green") == ("circle", (1,))
    # the middle is 37.5: gray (40.5, 40.5) is right of it and below it
    assert _ask(HAND, "left", "red") == ("yes", (0,)) and _ask(HAND, "top", "red")[0] == "yes"
    assert _ask(HAND, "left", "gray")[0] == "no" and _ask(HAND, "top", "gray")[0] == "no"
    assert _ask(HAND, "left", "yellow")[0] == "no" and _ask(HAND, "top", "yellow")[0] == "yes"
    assert _ask(HAND, "left", "orange")[0] == "yes" and _ask(HAND, "top", "orange")[0] == "no"
    assert sc.Question("furthest", "red").text == \
        "What is the shape of the object furthest from the red object?"
    assert sc.Question("count", "red").question_type == "relational"
    assert sc.Question("top", "red").question_type == "non-relational"


def test_ties_are_ambiguous_and_broken_by_index():
    # green and blue are both 20 px from red; orange is 21 from red
    tie = _scene(("red", "square", 30.5, 30.5), ("green", "circle", 50.5, 30.5),
                 ("blue", "square", 30.5, 50.5), ("orange", "circle", 9.5, 30.5))
    q = sc.Question("closest", "red")
    assert sc.is_ambiguous(tie, q)
    assert sc.relevant_objects(tie, q) == (0, 1)  # lower index wins, deterministically
    assert not sc.is_ambiguous(HAND, q)
    middle = _scene(("red", "square", 37.5, 10.5), ("green", "circle", 60.5, 60.5))
    assert sc.is_ambiguous(middle, sc.Question("left", "red"))
    assert not sc.is_ambiguous(middle, sc.Question("top", "red"))


def _objects_from_pixels(image: np.ndarray) -> dict:
    """colour -> (shape, (x, y)) read from pixels only: a square fills its bounding box."""
    found = {}
    for name, rgb in sc.COLOURS:
        ys, xs = np.nonzero((image == rgb).all(axis=2))
        assert xs.size, f"no {name} pixels"
        box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        found[name] = ("square" if xs.size == box else "circle",
                       (xs.mean() + 0.5, ys.mean() + 0.5))
    return found


def _pixel_answer(image: np.ndarray, subtype: str, colour: str) -> str:
    objects = _objects_from_pixels(image)
    shape, (x, y) = objects[colour]
    half = image.shape[0] / 2
    if subtype == "shape":
        return shape
    if subtype in ("left", "top"):
        return "yes" if (x if subtype == "left" else y) < half else "no"
    if subtype == "count":
        return str(sum(s == shape for s, _ in objects.values()))
    dist = {c: math.hypot(p[0] - x, p[1] - y) for c, (_, p) in objects.items() if c != colour}
    pick = min(dist, key=dist.get) if subtype == "closest" else max(dist, key=dist.get)
    return objects[pick][0]


def test_generated_answers_match_what_the_pixels_show():
    seen = {}
    for _, scene, questions in sc.iter_scenes(40, S, seed=3, split="train"):
        image = sc.render(scene).image
        for q in questions:
            expected = _pixel_answer(image, q.subtype, q.colour)
            assert sc.answer(scene, q) == expected, (q, scene)
            assert not sc.is_ambiguous(scene, q)
            seen.setdefault(q.subtype, set()).add(expected)
    assert seen["left"] == seen["top"] == {"yes", "no"}
    assert seen["closest"] == seen["furthest"] == {"square", "circle"}
    assert len(seen["count"]) >= 4


def test_questions_are_balanced_per_scene():
    for _, scene, questions in sc.iter_scenes(30, S, seed=0, split="test"):
        kinds = [q.subtype for q in questions]
        assert len(questions) == 20
        assert all(k in sc.NON_RELATIONAL for k in kinds[:10])
        assert all(k in sc.RELATIONAL for k in kinds[10:])
        for group in (sc.NON_RELATIONAL, sc.RELATIONAL[:2]):
            counts = [kinds.count(k) for k in group]
            assert min(counts) >= 3, counts  # 3/3/4, count may absorb unclear subtypes
        for k in set(kinds) - {"count"}:  # distinct colours within a subtype while possible
            colours = [q.colour for q in questions if q.subtype == k]
            clear = [c for c in sc.COLOUR_NAMES if not sc.is_ambiguous(scene, sc.Question(k, c))]
            assert len(set(colours)) == min(len(colours), len(clear))


# -- rendering and masks ----------------------------------------------------------------------
def test_masks_are_exactly_the_painted_pixels():
    scenes = [HAND] + [s for _, s, _ in sc.iter_scenes(25, S, seed=1, split="train")]
    for scene in scenes:
        out = sc.render(scene)
        masks = sc.object_masks(out.owner, len(scene.objects))
        painted = (out.image != sc.BACKGROUND).any(axis=2)
        assert np.array_equal(masks.any(axis=0), painted)
        assert masks.sum(axis=0).max() == 1  # no pixel belongs to two objects
        for k, obj in enumerate(scene.objects):
            assert np.array_equal(masks[k], (out.image == sc.COLOURS[
                sc.COLOUR_NAMES.index(obj.colour)][1]).all(axis=2))
            # removing the object changes exactly its mask
            without = sc.Scene(scene.image_size, scene.objects[:k] + scene.objects[k + 1:])
            changed = (sc.render(without).image != out.image).any(axis=2)
            assert np.array_equal(changed, masks[k])


def test_shapes_have_santoro_size():
    masks = sc.object_masks(sc.render(HAND).owner, 6)
    assert masks[0].sum() == 11 * 11  # square of half side 5 on pixel centres
    assert masks[1].sum() == 81  # lattice points within radius 5
    ys, xs = np.nonzero(masks[0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 15, 5, 15)


def test_objects_never_overlap_and_keep_a_gap():
    for _, scene, _ in sc.iter_scenes(200, S, seed=4, split="train"):
        assert sorted(o.colour for o in scene.objects) == sorted(sc.COLOUR_NAMES)
        for k in range(6):
            assert sc.placement_ok(scene, k, scene.objects[k].centre)
    scene = next(sc.iter_scenes(1, 128, seed=0, split="train"))[1]
    assert sc.render(scene).image.shape == (128, 128, 3)
    assert scene.objects[0].size == pytest.approx(5 * 128 / 75)


def test_generation_is_fast():
    start = time.process_time()
    for _, scene, questions in sc.iter_scenes(1000, S, seed=9, split="train"):
        sc.render(scene)
        [sc.question_entry("train", 0, scene, q, 0) for q in questions]
    seconds = time.process_time() - start
    assert seconds < 8.0, f"1000 scenes with 20 questions each took {seconds:.1f}s of CPU"


def test_same_seed_same_scenes_other_seed_differs():
    def take(seed, count=12, split="train"):
        return [(s, qs) for _, s, qs in sc.iter_scenes(count, S, seed, split)]

    assert take(5) == take(5)
    assert take(5) != take(6) and take(5) != take(5, split="test")
    assert take(5, count=4) == take(5)[:4]  # scene i does not depend on the count


# -- perturbations ----------------------------------------------------------------------------
def test_perturbations_keep_the_answer_in_the_pixels():
    rng = np.random.default_rng(0)
    kinds = set()
    for _, scene, questions in sc.iter_scenes(15, S, seed=2, split="test"):
        before = sc.render(scene)
        for q in questions:
            relevant = sc.relevant_objects(scene, q)
            for p in sc.perturbations(scene, q, rng, count=2):
                kinds.add(p.kind)
                assert not set(p.objects) & set(relevant)
                after = sc.render(p.scene)
                assert _pixel_answer(after.image, q.subtype, q.colour) == sc.answer(scene, q)
                assert sc.relevant_objects(p.scene, q) == relevant
                assert len({o.colour for o in p.scene.objects}) == 6
                assert all(sc.placement_ok(p.scene, k, o.centre)
                           for k, o in enumerate(p.scene.objects))
                changed = (after.image != before.image).any(axis=2)
                assert changed.any()
                for k in relevant:  # the objects the answer depends on are untouched
                    mask = before.owner == k + 1
                    assert np.array_equal(after.image[mask], before.image[mask])
                    assert np.array_equal(after.owner == k + 1, mask)
    assert kinds == {"move", "recolour"}


def test_perturbations_reject_answer_changes():
    # closest to red is green (20 px); the only free objects are blue and yellow
    scene = _scene(("red", "square", 10.5, 10.5), ("green", "circle", 30.5, 10.5),
                   ("blue", "square", 60.5, 60.5), ("yellow", "square", 60.5, 20.5))
    q = sc.Question("closest", "red")
    moved = sc.perturbations(scene, q, np.random.default_rng(1), count=50, kinds=("move",),
                             tries=3000)
    assert len(moved) > 10
    for p in moved:  # any move closer to red than 20 px would change the relevant objects
        x, y = p.scene.objects[p.objects[0]].centre
        assert math.hypot(x - 10.5, y - 10.5) >= 20 + sc.TIE_MARGIN
    same = _scene(*[(c, "circle", 10.5 + 20 * (k % 3), 10.5 + 25 * (k // 3))
                    for k, c in enumerate(sc.COLOUR_NAMES)])
    assert sc.perturbations(same, sc.Question("count", "red"), np.random.default_rng(0)) == []


# -- files in CLEVR's layout and the loader ---------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    root = sc.ensure_sort_of_clevr(cache, image_size=S, seed=0, num_train=8, num_test=4)
    return cache, root


def test_layout_on_disk_matches_the_scene_descriptions(generated):
    _, root = generated
    assert root.name == "sort-of-clevr-s75-seed0-n8-t4"
    for split, count in (("train", 8), ("test", 4)):
        questions = json.loads((root / "questions" / f"SortOfCLEVR_{split}_questions.json")
                               .read_text())["questions"]
        scenes = json.loads((root / "scenes" / f"SortOfCLEVR_{split}_scenes.json")
                            .read_text())["scenes"]
        assert len(scenes) == count and len(questions) == 20 * count
        assert sorted(p.name for p in (root / "images" / split).iterdir()) == \
            [s["image_filename"] for s in scenes]
        for entry in questions[::7]:
            scene_json = scenes[entry["image_index"]]
            assert scene_json["image_filename"] == entry["image_filename"]
            scene = sc.Scene.from_json(scene_json)
            q = sc.Question.from_program(entry["program"])
            assert entry["question"] == q.text and entry["answer"] == sc.answer(scene, q)
            assert entry["relevant_objects"] == list(sc.relevant_objects(scene, q))
            assert entry["question_type"] == q.question_type
            out = sc.render(scene)
            name = entry["image_filename"]
            assert np.array_equal(np.asarray(Image.open(root / "images" / split / name)),
                                  out.image)
            assert np.array_equal(np.asarray(Image.open(root / "masks" / split / name)),
                                  out.owner)


def test_generation_is_deterministic_and_cached(tmp_path, generated, monkeypatch):
    _, root = generated
    again = sc.generate_sort_of_clevr(tmp_path / "again", num_train=8, num_test=4, seed=0)
    # the cache adds its checksum manifest to what the generator writes
    files = sorted(p.relative_to(root) for p in root.rglob("*")
                   if p.is_file() and p.name != MANIFEST)
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete copy")

    monkeypatch.setattr(sc, "generate_sort_of_clevr", fail)
    assert sc.ensure_sort_of_clevr(root.parent, image_size=S, num_train=8, num_test=4) == root
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temp folders left


def test_sort_of_clevr_bundle(generated):
    cache, _ = generated
    bundle = build_data("sort-of-clevr", cache_dir=cache, num_train=8, num_test=4, seed=3,
                        val_fraction=0.25)
    assert bundle.class_names == ["1", "2", "3", "4", "5", "6", "circle", "no", "square", "yes"]
    assert bundle.has_masks and not bundle.has_boxes and bundle.image_size == S
    assert len(bundle.train) == 120 and len(bundle.val) == 40 and len(bundle.test) == 80
    train_images = set(bundle.train.paths)
    assert train_images == set(bundle.push.paths) and not train_images & set(bundle.val.paths)
    assert bundle.train._store is bundle.val._store and len(bundle.train._store) == 8
    vocab = bundle.vocab
    assert vocab[:2] == ["<pad>", "<unk>"] and "closest" in vocab and "?" in vocab
    assert bundle.model_kwargs == {"vocab": vocab}
    assert bundle.question_types == ["non-relational", "relational"]
    assert bundle.unknown_words == {"train": 0, "test": 0}
    length = bundle.max_question_length
    batch = next(iter(DataLoader(bundle.test, batch_size=20)))
    assert batch["question"].shape == (20, length) and batch["question"].dtype == torch.int64
    assert batch["mask"].shape == (20, 1, S, S) and batch["image"].shape == (20, 3, S, S)
    assert batch["question_type"].tolist() == [0] * 10 + [1] * 10
    words = Vocabulary(vocab)
    test = bundle.test
    for i in range(0, 80, 3):
        item = test[i]
        scene = sc.Scene.from_json(test.scene(i))
        q = sc.Question.from_program(test.program(i))
        assert words.decode(item["question"]) == " ".join(tokenize(q.text))
        assert item["question_length"] == len(tokenize(q.text))
        assert item["question_kind"] == q.subtype
        assert test.class_names[item["label"]] == sc.answer(scene, q)
        owner = sc.render(scene).owner
        expected = np.isin(owner, [k + 1 for k in sc.relevant_objects(scene, q)])
        assert np.array_equal(item["mask"][0].numpy() == 1, expected)
        assert np.array_equal(item["owner"].numpy(), owner)  # every object, for objectness
        assert np.array_equal(test.raw_image(i), sc.render(scene).image)
    with pytest.raises(DataError, match="augmentation"):
        build_data("sort-of-clevr", cache_dir=cache, num_train=8, num_test=4, augment=True)
    with pytest.raises(DataError, match="num_classes=3"):
        build_data("sort-of-clevr", cache_dir=cache, num_train=8, num_test=4, num_classes=3)


def test_perturbed_dataset(generated):
    cache, _ = generated
    test = build_data("sort-of-clevr", cache_dir=cache, num_train=8, num_test=4).test
    perturbed = sc.perturbed_dataset(test, seed=0, per_question=1, limit=30)
    assert 20 <= len(perturbed) <= 30 and len(perturbed.source_indices) == len(perturbed)
    assert set(perturbed.perturbation_kinds) == {"move", "recolour"}
    for n in range(len(perturbed)):
        item, source = perturbed[n], test[int(perturbed.source_indices[n])]
        assert item["label"] == source["label"]
        assert torch.equal(item["question"], source["question"])
        assert not torch.equal(item["image"], source["image"])
        scene = perturbed.scenes[n]
        relevant = sc.relevant_objects(scene, sc.Question.from_program(
            test.program(int(perturbed.source_indices[n]))))
        expected = np.isin(sc.render(scene).owner, [k + 1 for k in relevant])
        assert np.array_equal(item["mask"][0].numpy() == 1, expected)


# -- real CLEVR layout ------------------------------------------------------------------------
def _program(text: str) -> list[dict]:
    """A CLEVR functional program ending as the question's type would."""
    last = {"How": "count", "What": f"query_{text.split()[1]}", "Is": "equal_color",
            "Are": "greater_than"}
    return [{"inputs": [], "function": "scene", "value_inputs": []},
            {"inputs": [0], "function": last[text.split()[0]], "value_inputs": []}]


def _clevr_tree(root: Path, with_val=True) -> Path:
    """CLEVR_v1.0 with real field names: 3 train images, 2 val, 1 unanswered test image."""
    colours = {"train": [(200, 30, 30), (30, 200, 30), (30, 30, 200)],
               "val": [(90, 90, 90), (250, 250, 0)], "test": [(0, 0, 0)]}
    texts = {"train": [("Are there more cubes than spheres?", "yes"),
                       ("How many cylinders are there?", "3"),
                       ("What color is the large metal sphere?", "red")],
             "val": [("How many tiny cubes are there?", "3"),
                     ("Is the gizmo red?", "yes")],
             "test": [("What size is the cube?", None)]}
    for split, rgbs in colours.items():
        if split == "val" and not with_val:
            continue
        questions, scenes = [], []
        for i, rgb in enumerate(rgbs):
            name = f"CLEVR_{split}_{i:06d}.png"
            path = root / "images" / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 48, 3), rgb, np.uint8)).save(path)
            for text, ans in texts[split][i:] + texts[split][:i]:  # every image, all questions
                entry = {"image_index": i, "split": split, "image_filename": name,
                         "question_index": len(questions), "question": text,
                         "question_family_index": 3, "program": _program(text)}
                if ans is not None:
                    entry["answer"] = ans
                questions.append(entry)
            scenes.append({"image_index": i, "image_filename": name, "split": split,
                           "objects": [{"color": "red", "size": "large", "shape": "cube",
                                        "material": "metal", "3d_coords": [0, 1, 0.7],
                                        "pixel_coords": [100, 120, 11.5], "rotation": 30.0}],
                           "relationships": {}, "directions": {}})
        (root / "questions").mkdir(exist_ok=True)
        (root / "questions" / f"CLEVR_{split}_questions.json").write_text(json.dumps(
            {"info": {"split": split, "license": "CC BY 4.0", "version": "1.0"},
             "questions": questions}))
        if split == "val":
            (root / "scenes").mkdir(exist_ok=True)
            (root / "scenes" / f"CLEVR_{split}_scenes.json").write_text(
                json.dumps({"info": {"split": split}, "scenes": scenes}))
    return root


def test_clevr_loader(tmp_path):
    root = _clevr_tree(tmp_path / "CLEVR_v1.0")
    bundle = build_data("clevr", data_dir=root, image_size=16, val_fraction=0.34)
    assert bundle.class_names == ["3", "red", "yes"] and not bundle.has_masks
    assert bundle.test_split == "val" and len(bundle.test) == 4
    assert len(bundle.train) + len(bundle.val) == 9
    assert len(set(bundle.val.paths)) == 1 and not set(bundle.val.paths) & set(bundle.train.paths)
    assert len(bundle.train._store) == 3  # three images decoded once for nine questions
    item = bundle.train[0]
    assert "mask" not in item and item["question_type"] == -1 and item["image"].shape == (3, 16, 16)
    words = Vocabulary(bundle.vocab)
    assert words.decode(item["question"]) == " ".join(tokenize(bundle.train.question_text(0)))
    assert item["path"].endswith(".png") and Path(item["path"]).parent.name == "train"
    # val words unseen in training ("tiny", "gizmo") become <unk>, counted
    assert bundle.unknown_words["test"] > 0
    test_words = [words.decode(bundle.test[i]["question"]) for i in range(len(bundle.test))]
    assert any("<unk>" in w for w in test_words)
    # ... and evaluation reports how many, beside the accuracy they affect
    from protozoo.evaluation import evaluate_run

    model = protozoo.create_model("cnn_lstm", class_names=bundle.class_names,
                                  vocab=bundle.vocab)
    metrics = evaluate_run(tmp_path / "run", model=model, data=bundle, device="cpu",
                           report=False, overrides={"dataset": "clevr"})
    assert metrics["unknown_test_words"] == bundle.unknown_words["test"] > 0
    # questions and the images they ask about are both counted, neither called the other
    assert metrics["num_test_questions"] == 4
    assert metrics["num_test_images"] == len(set(bundle.test.paths)) < 4
    # accuracy by CLEVR's question types, named from each program's last function: the val
    # split asks two count questions ("How many") and two colour comparisons ("Is the ...")
    assert [bundle.test[i]["question_kind"] for i in range(4)] == \
        ["count", "compare_attribute", "compare_attribute", "count"]
    kinds = {k: v for k, v in metrics.items() if k.startswith("accuracy_kind_")}
    assert set(kinds) == {"accuracy_kind_count", "accuracy_kind_compare_attribute"}
    assert (kinds["accuracy_kind_count"] + kinds["accuracy_kind_compare_attribute"]) / 2 == \
        pytest.approx(metrics["accuracy"])
    assert bundle.test.scene(0)["objects"][0]["shape"] == "cube"
    assert bundle.train.scene(0) is None  # no training scenes file: scenes are optional
    raw = bundle.train.raw_image(bundle.train.paths.index(str(root / "images" / "train" /
                                                          "CLEVR_train_000001.png")))
    assert tuple(raw[8, 8]) == (30, 200, 30)


def test_clevr_answers_and_subsets(tmp_path):
    root = _clevr_tree(tmp_path / "CLEVR_v1.0")
    small = build_data("clevr", data_dir=root, image_size=8, num_train=2, num_test=1, seed=4)
    assert len(small.train) + len(small.val) == 6 and len(small.test) == 2
    assert small.class_names == ["3", "red", "yes"]  # answers from the whole training file


def test_clevr_errors(tmp_path):
    with pytest.raises(DataError, match="needs a data folder"):
        build_data("clevr")
    with pytest.raises(DataError, match="not found"):
        build_data("clevr", data_dir=tmp_path / "nope")
    root = _clevr_tree(tmp_path / "CLEVR_v1.0", with_val=False)
    with pytest.raises(DataError, match=r"question 0 in .*CLEVR_test_questions\.json' has no "
                                        r"answer .*val"):
        build_data("clevr", data_dir=root, image_size=8)
    root = _clevr_tree(tmp_path / "full")
    val_q = root / "questions" / "CLEVR_val_questions.json"
    data = json.loads(val_q.read_text())
    data["questions"][1]["answer"] = "purple"
    val_q.write_text(json.dumps(data))
    with pytest.raises(DataError, match="answer 'purple' .* never occurs in the training"):
        build_data("clevr", data_dir=root, image_size=8)
    (root / "images" / "train" / "CLEVR_train_000002.png").unlink()
    with pytest.raises(DataError, match=r"image .*CLEVR_train_000002\.png' of question \d+ .* "
                                        r"not found"):
        build_data("clevr", data_dir=root, image_size=8)
    train_q = root / "questions" / "CLEVR_train_questions.json"
    train_q.write_text('{"questions": [')
    with pytest.raises(DataError, match=r"cannot read .*CLEVR_train_questions\.json"):
        build_data("clevr", data_dir=root, image_size=8)
    train_q.write_text(json.dumps({"questions": [{"image_filename": "x.png", "answer": "yes"}]}))
    with pytest.raises(DataError, match="question 0 .* lacks a text 'question'"):
        build_data("clevr", data_dir=root, image_size=8)
    train_q.write_text(json.dumps([1, 2]))
    with pytest.raises(DataError, match="'questions' list"):
        build_data("clevr", data_dir=root, image_size=8)
    train_q.unlink()
    with pytest.raises(DataError, match="no questions for split 'train'"):
        build_data("clevr", data_dir=root, image_size=8)


def test_split_by_image_keeps_questions_together(generated):
    cache, _ = generated
    train = build_data("sort-of-clevr", cache_dir=cache, num_train=8, num_test=4).train
    kept, held = scene_split(train, 0.5, seed=0)
    images = train.image_indices
    assert not set(images[kept]) & set(images[held])
    assert sorted([*kept, *held]) == list(range(len(train)))
    assert np.array_equal(kept, scene_split(train, 0.5, seed=0)[0])


# -- vocabulary -------------------------------------------------------------------------------
def test_vocabulary_round_trip_and_unknown_words():
    vocab = Vocabulary.build(["What is the shape of the red object?",
                              "Are there more cubes than spheres; what is it?"])
    assert vocab.words[:2] == ["<pad>", "<unk>"] and vocab.words[2:] == sorted(vocab.words[2:])
    assert tokenize("Is the RED object on the left?") == \
        ["is", "the", "red", "object", "on", "the", "left", "?"]
    ids = vocab.encode("what is the shape of the red object?")
    assert vocab.decode(ids + [PAD_ID, PAD_ID]) == "what is the shape of the red object ?"
    with pytest.raises(DataError, match="unknown word 'purple' .* unknown='unk'"):
        vocab.encode("What is the shape of the purple object?")
    unk = vocab.encode("What is the shape of the purple object?", unknown="unk")
    assert unk.count(UNK_ID) == 1 and unk[6] == UNK_ID
    again = Vocabulary(json.loads(json.dumps(vocab.to_json())))
    assert again == vocab and again.encode("red cubes") == vocab.encode("red cubes")
    ids, lengths, unknown = vocab.encode_many(["red object?", "cubes", "blue cubes"], "unk")
    assert ids.shape == (3, 3) and lengths.tolist() == [3, 1, 2] and unknown == 1
    assert ids[1].tolist() == [vocab.encode("cubes")[0], PAD_ID, PAD_ID]
    with pytest.raises(DataError, match="no words"):
        vocab.encode("   ")
    with pytest.raises(DataError, match="must start with"):
        Vocabulary(["red", "blue"])
    with pytest.raises(DataError, match="twice"):
        Vocabulary(["<pad>", "<unk>", "red", "red"])
    with pytest.raises(DataError, match="unknown='maybe'"):
        vocab.encode("red", unknown="maybe")
    with pytest.raises(DataError, match="padded length 1"):
        vocab.encode_many(["red object"], length=1)


def test_bad_generator_arguments(tmp_path):
    with pytest.raises(DataError, match="image_size=16"):
        sc.generate_sort_of_clevr(tmp_path / "x", num_train=4, num_test=2, image_size=16)
    with pytest.raises(DataError, match="num_train=1"):
        sc.generate_sort_of_clevr(tmp_path / "x", num_train=1, num_test=2)
    with pytest.raises(DataError, match="unknown colour 'pink'"):
        sc.Question("shape", "pink")
    with pytest.raises(DataError, match="unknown Sort-of-CLEVR question 'size'"):
        sc.Question("size", "red")
    with pytest.raises(DataError, match="2 red objects"):
        sc.answer(_scene(("red", "square", 10.5, 10.5), ("red", "circle", 50.5, 50.5)),
                  sc.Question("shape", "red"))


def test_clevr_keeps_its_images_own_size(tmp_path):
    """No silent resizing: without an image size the images' own is used when they share one
    square size; CLEVR's own 480x320 (here 48x32) asks for --image-size."""
    root = _clevr_tree(tmp_path / "CLEVR_v1.0")
    with pytest.raises(DataError, match=r"are 48x32, not square: pass --image-size S"):
        build_data("clevr", data_dir=root)
    for path in (root / "images").rglob("*.png"):
        Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(path)
    bundle = build_data("clevr", data_dir=root)
    assert bundle.image_size == 24 and bundle.train[0]["image"].shape == (3, 24, 24)


def test_data_without_masks_says_which_metrics_it_cannot_compute(capsys):
    from types import SimpleNamespace

    from protozoo.evaluation import _say_what_cannot_be_computed

    model = protozoo.create_model("san", num_classes=3, vocab=["<pad>", "<unk>", "what"])
    _say_what_cannot_be_computed(model, SimpleNamespace(has_masks=False, has_boxes=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: the data has no masks, so attention_mass_on_objects, pointing_game "
                   "cannot be computed and are not in metrics.json"]
    _say_what_cannot_be_computed(model, SimpleNamespace(has_masks=True, has_boxes=False))
    assert capsys.readouterr().err == ""  # san needs no boxes
    cam = protozoo.create_model("cam", num_classes=3)
    _say_what_cannot_be_computed(cam, SimpleNamespace(has_masks=True, has_boxes=False))
    assert capsys.readouterr().err.strip() == ("note: the data has no boxes, so "
                                               "localization_accuracy cannot be computed and "
                                               "are not in metrics.json")


def test_clevr_loader_keeps_the_images_native_size(tmp_path):
    root = _clevr_tree(tmp_path / "CLEVR")
    for path in root.glob("images/*/*.png"):  # a set written at 24 px, square
        Image.fromarray(np.asarray(Image.open(path).convert("RGB").resize((24, 24)))).save(path)
    bundle = build_data("clevr", data_dir=root, val_fraction=0.34)  # no image_size: native
    assert bundle.image_size == 24 and bundle.train[0]["image"].shape == (3, 24, 24)
    assert build_data("clevr", data_dir=root, image_size=16, val_fraction=0.34).image_size == 16
