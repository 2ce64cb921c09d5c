"""Sort-of-CLEVR (Santoro et al., "A simple neural network module for relational reasoning",
NeurIPS 2017): six coloured squares and circles, and questions whose answers the scene decides.

What follows the paper (and the widely used public re-implementation of its generator,
kimhc6028/relational-networks; the authors released none): 75x75 images on a white background; six
objects, one per colour (red, green, blue, orange, gray, yellow), each a square or a circle of
half-size / radius 5 px (scaled with the image size); per scene 10 non-relational questions
(shape of the X object; is it on the left; is it at the top) and 10 relational ones (shape of the
object closest to X; of the object furthest from X; how many objects have X's shape, 1..6);
"left"/"top" mean the centre lies left of / above the image's middle; distances are between
centres.

Where we differ, and why:

* Objects never overlap and keep at least one background pixel between them (the public code
  checks the centre distance against the diameter, so square corners can overlap). Then
  every object's mask is exactly the pixels painted in its colour.
* Centres are pixel centres and never lie on the middle row or column, so "left"/"top" always
  have a visible answer.
* A "closest"/"furthest" question is only asked when the winner beats the runner-up by at least
  ``TIE_MARGIN`` px (scaled): a near-tie is invisible in pixels, so its answer would be noise.
* Questions are text (plus a structured form): the paper fed a one-hot question vector.

Everything is a pure function of a :class:`Scene` (the description: colour, shape, centre, size
per object): :func:`render` paints the image *and* the ownership map the masks come from, and
:func:`answer` / :func:`relevant_objects` read a question against the description. So a scene can
be changed (:func:`perturbations`, for the "Measuring CLEVRness" behavioural test of Mouselinos
et al.) and re-rendered with a known answer; :func:`perturbed_dataset` builds that test set.
On disk the data uses CLEVR's layout (see :func:`generate_sort_of_clevr`), read back by
:mod:`protozoo.data.clevr`. The paper used 9800 training and 200 test scenes; our defaults
(4000/500, in ``protozoo.data.clevr``) are sized for CPU training.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from protozoo.data.base import ImageStore
from protozoo.data.clevr import VQADataset, check_answers, load_vqa, make_table
from protozoo.data.generated import (  # noqa: F401  (read_meta: this module's API)
    default_cache_dir, ensure_generated, read_meta, save_png,
)
from protozoo.errors import DataError

GENERATOR_NAME = "protozoo.sort-of-clevr"
GENERATOR_VERSION = 1
PREFIX = "SortOfCLEVR"

COLOURS = (
    ("red", (255, 0, 0)),
    ("green", (0, 255, 0)),
    ("blue", (0, 0, 255)),
    ("orange", (255, 156, 0)),
    ("gray", (128, 128, 128)),
    ("yellow", (255, 255, 0)),
)
COLOUR_NAMES = tuple(name for name, _ in COLOURS)
_RGB = dict(COLOURS)
SHAPES = ("square", "circle")
BACKGROUND = (255, 255, 255)
NUM_OBJECTS = len(COLOURS)

SANTORO_IMAGE_SIZE = 75
SANTORO_OBJECT_SIZE = 5.0  # half side of a square, radius of a circle, at 75 px
TIE_MARGIN = 1.0  # px at 75 px: the closest/furthest object must win by this much
_GAP = 2.0  # centre separation beyond 2 * size: at least one background pixel between objects

NON_RELATIONAL = ("shape", "left", "top")
RELATIONAL = ("closest", "furthest", "count")
QUESTION_TYPES = ("non-relational", "relational")
ANSWERS = tuple(sorted(("yes", "no", *SHAPES, *(str(n) for n in range(1, NUM_OBJECTS + 1)))))
QUESTIONS_PER_SCENE = (10, 10)  # (non-relational, relational), as Santoro et al.
SPLIT_CODES = {"train": 1, "test": 2}  # separate random streams: no scene is in both splits

_TEMPLATES = {
    "shape": "What is the shape of the {} object?",
    "left": "Is the {} object on the left?",
    "top": "Is the {} object at the top?",
    "closest": "What is the shape of the object closest to the {} object?",
    "furthest": "What is the shape of the object furthest from the {} object?",
    "count": "How many objects have the same shape as the {} object?",
}


# -- scene and question descriptions -----------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    """One object. ``centre`` is (x, y) in pixels, pixel (row r, col c) spanning [c, c+1) x
    [r, r+1); ``size`` is the half side of a square or the radius of a circle."""

    colour: str
    shape: str
    centre: tuple[float, float]
    size: float

    def to_json(self) -> dict:
        # CLEVR's field names where CLEVR has the field ("color", "shape", "pixel_coords").
        return {"color": self.colour, "shape": self.shape, "centre": list(self.centre),
                "size": self.size, "pixel_coords": [int(self.centre[0]), int(self.centre[1])]}

    @classmethod
    def from_json(cls, d: dict) -> SceneObject:
        try:
            return cls(str(d["color"]), str(d["shape"]),
                       (float(d["centre"][0]), float(d["centre"][1])), float(d["size"]))
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise DataError(f"scene object {d!r} is malformed ({err!r}): it needs color, shape, "
                            "centre [x, y] and size; regenerate the scenes file") from None


@dataclass(frozen=True)
class Scene:
    image_size: int
    objects: tuple[SceneObject, ...]

    def to_json(self) -> dict:
        return {"image_size": self.image_size, "objects": [o.to_json() for o in self.objects]}

    @classmethod
    def from_json(cls, d: dict) -> Scene:
        if not isinstance(d, dict) or "objects" not in d or "image_size" not in d:
            raise DataError("a Sort-of-CLEVR scene needs 'image_size' and 'objects': regenerate "
                            "the scenes file with protozoo")
        return cls(int(d["image_size"]), tuple(SceneObject.from_json(o) for o in d["objects"]))

    def with_object(self, k: int, **changes) -> Scene:
        objects = list(self.objects)
        objects[k] = replace(objects[k], **changes)
        return replace(self, objects=tuple(objects))


@dataclass(frozen=True)
class Question:
    """The structured form of a question: what is asked (``subtype``) about which colour."""

    subtype: str
    colour: str

    def __post_init__(self):
        if self.subtype not in _TEMPLATES:
            raise DataError(f"unknown Sort-of-CLEVR question '{self.subtype}': use one of "
                            f"{', '.join(_TEMPLATES)}")
        if self.colour not in COLOUR_NAMES:
            raise DataError(f"unknown colour '{self.colour}': use one of "
                            f"{', '.join(COLOUR_NAMES)}")

    @property
    def question_type(self) -> str:
        return QUESTION_TYPES[self.subtype in RELATIONAL]

    @property
    def text(self) -> str:
        return _TEMPLATES[self.subtype].format(self.colour)

    def to_program(self) -> dict:
        return {"subtype": self.subtype, "color": self.colour}

    @classmethod
    def from_program(cls, program: dict) -> Question:
        try:
            return cls(str(program["subtype"]), str(program["color"]))
        except (KeyError, TypeError):
            raise DataError(f"program {program!r} is not a Sort-of-CLEVR program: it needs "
                            "'subtype' and 'color'") from None


# -- answers: pure functions of (scene, question) ----------------------------------------------
def _find(scene: Scene, colour: str) -> int:
    hits = [k for k, o in enumerate(scene.objects) if o.colour == colour]
    if len(hits) != 1:
        raise DataError(f"the scene has {len(hits)} {colour} objects: a question about the "
                        f"{colour} object needs exactly one")
    return hits[0]


def _others_by_distance(scene: Scene, k: int) -> list[tuple[float, int]]:
    """(distance to object k, index) of every other object, nearest first; equal distances
    keep the lower index first. (Plain Python: for six objects it is faster than numpy.)"""
    cx, cy = scene.objects[k].centre
    pairs = sorted((math.hypot(o.centre[0] - cx, o.centre[1] - cy), j)
                   for j, o in enumerate(scene.objects) if j != k)
    if not pairs:
        raise DataError("a relational question needs at least two objects in the scene")
    return pairs


def _partner(scene: Scene, k: int, subtype: str) -> int:
    pairs = _others_by_distance(scene, k)
    if subtype == "closest":
        return pairs[0][1]
    return next(j for d, j in pairs if d == pairs[-1][0])  # lowest index among the furthest


def answer(scene: Scene, question: Question) -> str:
    """The answer, read from the scene description alone (never from pixels)."""
    k = _find(scene, question.colour)
    obj, half = scene.objects[k], scene.image_size / 2.0
    kind = question.subtype
    if kind == "shape":
        return obj.shape
    if kind == "left":
        return "yes" if obj.centre[0] < half else "no"
    if kind == "top":
        return "yes" if obj.centre[1] < half else "no"
    if kind in ("closest", "furthest"):
        return scene.objects[_partner(scene, k, kind)].shape
    return str(sum(o.shape == obj.shape for o in scene.objects))


def relevant_objects(scene: Scene, question: Question) -> tuple[int, ...]:
    """The objects the answer depends on: X first, then (closest/furthest) its partner or
    (count) every other object of X's shape, in index order."""
    k = _find(scene, question.colour)
    if question.subtype in ("closest", "furthest"):
        return k, _partner(scene, k, question.subtype)
    if question.subtype == "count":
        shape = scene.objects[k].shape
        return (k, *(j for j, o in enumerate(scene.objects) if o.shape == shape and j != k))
    return (k,)


def is_ambiguous(scene: Scene, question: Question) -> bool:
    """True when pixels cannot settle the answer: a centre on the middle line (left/top), or a
    closest/furthest winner within ``TIE_MARGIN`` (scaled) of the runner-up."""
    k = _find(scene, question.colour)
    if question.subtype in ("left", "top"):
        axis = 0 if question.subtype == "left" else 1
        return abs(scene.objects[k].centre[axis] - scene.image_size / 2.0) < 0.5
    if question.subtype in ("closest", "furthest"):
        dist = [d for d, _ in _others_by_distance(scene, k)]
        if len(dist) < 2:
            return False
        gap = dist[1] - dist[0] if question.subtype == "closest" else dist[-1] - dist[-2]
        return bool(gap < TIE_MARGIN * scene.image_size / SANTORO_IMAGE_SIZE)
    return False


# -- rendering --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # uint8 [S, S, 3]
    owner: np.ndarray  # uint8 [S, S]: 0 background, k + 1 where object k painted the pixel


def _footprint(obj: SceneObject, image_size: int):
    """(row slice, col slice, bool window) of the pixels whose centres the object covers."""
    x, y = obj.centre
    r0, c0 = int(math.floor(y - obj.size)), int(math.floor(x - obj.size))
    stencil = _stencil(obj.shape, obj.size, y - r0, x - c0)
    h, w = stencil.shape
    # clipped to the image (an object may stick out of a hand-built scene, or lie outside it)
    rows = slice(min(max(0, r0), image_size), max(0, min(image_size, r0 + h)))
    cols = slice(min(max(0, c0), image_size), max(0, min(image_size, c0 + w)))
    rows = slice(rows.start, max(rows.start, rows.stop))
    cols = slice(cols.start, max(cols.start, cols.stop))
    inside = stencil[rows.start - r0: rows.stop - r0, cols.start - c0: cols.stop - c0]
    return rows, cols, inside


@lru_cache(maxsize=256)
def _stencil(shape: str, size: float, y: float, x: float) -> np.ndarray:
    """bool window of a shape centred at (x, y) inside its window. Generated centres are pixel
    centres, so one stencil per (shape, size) serves every object: rendering is a lookup."""
    h = int(math.ceil(y + size)) + 1
    w = int(math.ceil(x + size)) + 1
    dy = np.arange(h, dtype=np.float64)[:, None] + 0.5 - y
    dx = np.arange(w, dtype=np.float64)[None, :] + 0.5 - x
    if shape == "square":
        inside = (np.abs(dx) <= size) & (np.abs(dy) <= size)
    elif shape == "circle":
        inside = dx**2 + dy**2 <= size * size
    else:
        raise DataError(f"unknown shape '{shape}': use one of {', '.join(SHAPES)}")
    inside.setflags(write=False)
    return inside


def render(scene: Scene) -> Rendered:
    """Paint the scene. One ownership map is drawn first and then paints the colours, so each
    object's mask (``owner == k + 1``) is exactly the pixels painted in its colour."""
    size = scene.image_size
    if len(scene.objects) > 254:
        raise DataError("a scene can hold at most 254 objects")
    owner = np.zeros((size, size), dtype=np.uint8)
    for k, obj in enumerate(scene.objects):
        rows, cols, inside = _footprint(obj, size)
        owner[rows, cols][inside] = k + 1
    palette = np.array([BACKGROUND] + [_rgb(o.colour) for o in scene.objects], dtype=np.uint8)
    return Rendered(palette[owner], owner)


def _rgb(colour: str) -> tuple[int, int, int]:
    if colour not in _RGB:
        raise DataError(f"unknown colour '{colour}': use one of {', '.join(COLOUR_NAMES)}")
    return _RGB[colour]


def object_masks(owner: np.ndarray, count: int) -> np.ndarray:
    """bool [count, S, S]: mask k marks the pixels object k painted."""
    return owner[None] == np.arange(1, count + 1, dtype=np.uint8)[:, None, None]


# -- sampling ---------------------------------------------------------------------------------
def object_size(image_size: int) -> float:
    return SANTORO_OBJECT_SIZE * image_size / SANTORO_IMAGE_SIZE


def _coordinates(image_size: int, size: float) -> np.ndarray:
    """Pixel-centre positions that keep an object inside the image and off the middle line."""
    centres = np.arange(image_size, dtype=np.float64) + 0.5
    ok = (centres - size >= 0) & (centres + size <= image_size) & (centres != image_size / 2)
    return centres[ok]


def placement_ok(scene: Scene, k: int, centre) -> bool:
    """Whether object k may sit at ``centre``: inside the image, off the middle line, and at
    least one background pixel away from every other object (bounding squares do not meet)."""
    obj, size = scene.objects[k], scene.image_size
    x, y = float(centre[0]), float(centre[1])
    for c in (x, y):
        if c - obj.size < 0 or c + obj.size > size or c == size / 2:
            return False
    for j, other in enumerate(scene.objects):
        need = obj.size + other.size + _GAP
        if j != k and max(abs(x - other.centre[0]), abs(y - other.centre[1])) < need:
            return False
    return True


def sample_scene(rng: np.random.Generator, image_size: int = SANTORO_IMAGE_SIZE) -> Scene:
    """Six objects (object k has colour k), random shapes, random non-overlapping centres."""
    size = object_size(image_size)
    coords = _coordinates(image_size, size)
    if coords.size == 0 or (image_size - 2 * size) < 3 * (2 * size + _GAP):
        raise DataError(f"image_size={image_size} is too small for Sort-of-CLEVR: use 32 or more")
    shapes = rng.integers(len(SHAPES), size=NUM_OBJECTS).tolist()
    need = 2 * size + _GAP
    while True:  # candidates in one draw (per-call overhead dominates); a dead end restarts
        placed: list[tuple[float, float]] = []
        for x, y in coords[rng.integers(coords.size, size=(32 * NUM_OBJECTS, 2))].tolist():
            if all(abs(x - px) >= need or abs(y - py) >= need for px, py in placed):
                placed.append((x, y))
                if len(placed) == NUM_OBJECTS:
                    return Scene(image_size, tuple(
                        SceneObject(COLOUR_NAMES[k], SHAPES[shapes[k]], placed[k], size)
                        for k in range(NUM_OBJECTS)))


def sample_questions(rng: np.random.Generator, scene: Scene,
                     per_scene=QUESTIONS_PER_SCENE) -> list[Question]:
    """Balanced questions: ``per_scene[0]`` non-relational then ``per_scene[1]`` relational;
    within each, subtype counts differ by at most one (which subtypes get the extra one is
    random) and colours are distinct per subtype while there are enough. Ambiguous questions
    (:func:`is_ambiguous`) are not asked; a subtype with no clear colour left is replaced by
    a count question."""
    out = []
    for subtypes, count in ((NON_RELATIONAL, per_scene[0]), (RELATIONAL, per_scene[1])):
        rank = rng.permutation(len(subtypes)).tolist()
        for subtype, r in zip(subtypes, rank, strict=True):
            m = count // len(subtypes) + (r < count % len(subtypes))
            colours = [COLOUR_NAMES[c] for c in rng.permutation(NUM_OBJECTS).tolist()]
            ok = colours if subtype in ("shape", "count") else \
                [c for c in colours if not is_ambiguous(scene, Question(subtype, c))]
            kind = subtype if ok else "count"
            ok = ok or colours
            picked = ok[:m]
            if m > len(ok):  # (rare) too few clear colours: repeat some
                picked += [ok[c] for c in rng.integers(len(ok), size=m - len(ok)).tolist()]
            out += [Question(kind, c) for c in picked]
    return out


def iter_scenes(count: int, image_size: int, seed: int, split: str):
    """Yield (index, scene, questions). Scene i comes from its own stream (seed, split, i), so
    it does not shift when ``count`` changes."""
    if split not in SPLIT_CODES:
        raise DataError(f"unknown split '{split}': use one of {', '.join(SPLIT_CODES)}")
    for i in range(count):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
        scene = sample_scene(rng, image_size)
        yield i, scene, sample_questions(rng, scene)


# -- behavioural test: answer-preserving perturbations ------------------------------------------
@dataclass(frozen=True)
class Perturbation:
    kind: str  # "move" (one object to a new place) or "recolour" (two objects swap colours)
    objects: tuple[int, ...]  # the objects changed
    scene: Scene


def _candidate(scene: Scene, free: list[int], kind: str, rng, coords) -> Perturbation | None:
    if kind == "move":
        k = int(free[rng.integers(len(free))])
        centre = (float(rng.choice(coords)), float(rng.choice(coords)))
        if not placement_ok(scene, k, centre) or centre == scene.objects[k].centre:
            return None
        return Perturbation("move", (k,), scene.with_object(k, centre=centre))
    a, b = (int(v) for v in rng.choice(free, size=2, replace=False))
    ca, cb = scene.objects[a].colour, scene.objects[b].colour
    return Perturbation("recolour", (min(a, b), max(a, b)),
                        scene.with_object(a, colour=cb).with_object(b, colour=ca))


def perturbations(scene: Scene, question: Question, rng: np.random.Generator, count: int = 2,
                  kinds=("move", "recolour"), tries: int = 100) -> list[Perturbation]:
    """Up to ``count`` changed scenes with the same answer, in the spirit of Mouselinos et al.
    ("Measuring CLEVRness"): move one object, or swap the colours of two objects (colours stay
    distinct: all six are in use), among the objects the question does *not* depend on.

    Every candidate is checked through :func:`answer`: kept only if the answer and the relevant
    objects are unchanged and the question stays unambiguous (moving a bystander can make it
    the new closest object, which the check rejects). Kinds alternate from a random first one;
    a kind that needs more free objects than there are is skipped. Fewer than ``count`` may
    come back (none when the question depends on every object).
    """
    expected = (answer(scene, question), relevant_objects(scene, question))
    free = [k for k in range(len(scene.objects)) if k not in expected[1]]
    usable = [k for k in kinds if (k == "move" and free) or (k == "recolour" and len(free) > 1)]
    unknown = set(kinds) - {"move", "recolour"}
    if unknown:
        raise DataError(f"unknown perturbation kind(s) {sorted(unknown)}: use 'move', 'recolour'")
    coords = _coordinates(scene.image_size, max(o.size for o in scene.objects))
    out, seen = [], set()
    first = int(rng.integers(len(usable))) if usable else 0  # one per question: mix the kinds
    for _ in range(tries):
        if len(out) >= count or not usable:
            break
        kind = usable[(first + len(out)) % len(usable)]
        found = _candidate(scene, free, kind, rng, coords)
        if found is None or found.scene in seen:
            continue
        new = found.scene
        if (answer(new, question), relevant_objects(new, question)) == expected \
                and not is_ambiguous(new, question):
            out.append(found)
            seen.add(new)
    return out


# -- writing CLEVR's layout --------------------------------------------------------------------
def image_filename(split: str, i: int) -> str:
    return f"{PREFIX}_{split}_{i:06d}.png"


def question_entry(split: str, i: int, scene: Scene, question: Question, q_index: int) -> dict:
    """One question in CLEVR's JSON form plus our structured program and relevant objects."""
    return {
        "image_index": i, "image_filename": image_filename(split, i), "split": split,
        "question_index": q_index, "question": question.text,
        "answer": answer(scene, question), "question_type": question.question_type,
        "question_family": question.subtype, "program": question.to_program(),
        "relevant_objects": list(relevant_objects(scene, question)),
    }


def _write_split(root: Path, split: str, count: int, image_size: int, seed: int) -> None:
    for folder in ("images", "masks"):
        (root / folder / split).mkdir(parents=True)
    questions, scenes = [], []
    for i, scene, asked in iter_scenes(count, image_size, seed, split):
        out = render(scene)
        name = image_filename(split, i)
        save_png(out.image, root / "images" / split / name)
        save_png(out.owner, root / "masks" / split / name)
        scenes.append({"image_index": i, "image_filename": name, "split": split,
                       **scene.to_json()})
        questions += [question_entry(split, i, scene, q, len(questions)) for q in asked]
    info = {"split": split, "generator": GENERATOR_NAME, "version": GENERATOR_VERSION}
    # json.dumps, not json.dump: dump streams through the pure-Python encoder (5x slower)
    (root / "questions" / f"{PREFIX}_{split}_questions.json").write_text(
        json.dumps({"info": info, "questions": questions}))
    (root / "scenes" / f"{PREFIX}_{split}_scenes.json").write_text(
        json.dumps({"info": info, "scenes": scenes}))


def _meta(num_train: int, num_test: int, image_size: int, seed: int) -> dict:
    return {
        "generator": GENERATOR_NAME, "version": GENERATOR_VERSION,
        "params": {"num_train": num_train, "num_test": num_test, "image_size": image_size,
                   "seed": seed, "questions_per_scene": list(QUESTIONS_PER_SCENE)},
        "colours": {name: list(rgb) for name, rgb in COLOURS}, "shapes": list(SHAPES),
        "answers": list(ANSWERS), "question_types": list(QUESTION_TYPES),
        "question_families": {"non-relational": list(NON_RELATIONAL),
                              "relational": list(RELATIONAL)},
        "layout": "images/<split>/<name>.png; masks/<split>/<name>.png (0 background, k+1 = "
        "object k); questions/SortOfCLEVR_<split>_questions.json; "
        "scenes/SortOfCLEVR_<split>_scenes.json",
    }


def _check_args(num_train: int, num_test: int, image_size: int) -> None:
    if int(num_train) < 2 or int(num_test) < 1:
        raise DataError(f"num_train={num_train}, num_test={num_test}: Sort-of-CLEVR needs at "
                        "least 2 training scenes (one goes to validation) and 1 test scene")
    if int(image_size) < 32:
        raise DataError(f"image_size={image_size} is too small for Sort-of-CLEVR: use 32 or more")


def generate_sort_of_clevr(root, num_train: int = 4000, num_test: int = 500,
                           image_size: int = SANTORO_IMAGE_SIZE, seed: int = 0) -> Path:
    """Write the dataset under ``root`` (new or empty) in CLEVR's layout; return ``root``.

    ``meta.json`` is written last, so its presence marks a complete dataset.
    """
    _check_args(num_train, num_test, image_size)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise DataError(f"'{root}' is not empty: generate Sort-of-CLEVR into a new folder")
    for folder in ("questions", "scenes"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        _write_split(root, split, int(count), int(image_size), int(seed))
    with open(root / "meta.json", "w") as fh:
        json.dump(_meta(num_train, num_test, image_size, seed), fh, indent=2, sort_keys=True)
    return root


def ensure_sort_of_clevr(cache_dir=None, image_size: int = SANTORO_IMAGE_SIZE, seed: int = 0,
                         num_train: int = 4000, num_test: int = 500) -> Path:
    """A complete copy in ``cache_dir`` (a folder named by every parameter), generated only
    when missing: into a temporary sibling renamed into place, so an interrupted run never
    leaves a half dataset that looks complete (as synthetic-parts does)."""
    _check_args(num_train, num_test, image_size)
    name = f"sort-of-clevr-s{image_size}-seed{seed}-n{num_train}-t{num_test}"
    return ensure_generated(
        cache_dir, name, _meta(num_train, num_test, image_size, seed),
        lambda tmp: generate_sort_of_clevr(tmp, num_train, num_test, image_size, seed))


# -- the perturbed evaluation set -------------------------------------------------------------
def perturbed_dataset(dataset, seed: int = 0, per_question: int = 1, limit: int | None = None,
                      kinds=("move", "recolour")):
    """The behavioural-test set of a Sort-of-CLEVR split (a loaded :class:`VQADataset`).

    For each question (all, or a seeded ``limit`` of them) up to ``per_question``
    answer-preserving :func:`perturbations` of its scene are rendered, each as its own image,
    with the same question, answer, tokens and relevant objects (its ``mask`` follows the moved
    objects). Returns a :class:`VQADataset` with ``source_indices`` (int64, the index in
    ``dataset`` each item perturbs), ``perturbation_kinds`` and ``scenes`` (the new
    descriptions), so consistency = share of items whose prediction equals the source's.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    picks = np.arange(len(dataset)) if limit is None or limit >= len(dataset) else \
        np.sort(rng.choice(len(dataset), size=int(limit), replace=False))
    images, owners, entries, sources, kinds_out, scenes = [], [], [], [], [], []
    for i in picks.tolist():
        if dataset.scene(i) is None or dataset.program(i) is None:
            raise DataError("perturbations need the scenes file and each question's program: "
                            "use a Sort-of-CLEVR split generated by protozoo")
        scene = Scene.from_json(dataset.scene(i))
        if scene.image_size != dataset.image_size:
            raise DataError(f"scenes are {scene.image_size} px but the dataset is "
                            f"{dataset.image_size} px: load it at the generated size")
        question = Question.from_program(dataset.program(i))
        for p in perturbations(scene, question, rng, count=per_question, kinds=kinds):
            out = render(p.scene)
            images.append(out.image)
            owners.append(out.owner)
            entries.append(question_entry("test", i, p.scene, question, len(entries)))
            sources.append(i)
            kinds_out.append(p.kind)
            scenes.append(p.scene)
    if not entries:
        raise DataError("no question of this dataset admits an answer-preserving perturbation")
    paths = [f"sort-of-clevr/perturbed/{n:06d}-of-{s}" for n, s in enumerate(sources)]
    store = ImageStore.from_arrays(np.stack(images), np.zeros(len(images)), paths)
    width = int(dataset[0]["question"].numel())
    table, _ = make_table(entries, list(range(len(entries))), dataset.class_names,
                          dataset.vocab, "unk", width, "the perturbed set")
    out = VQADataset(store, table, dataset.class_names, dataset.vocab,
                     owners=np.stack(owners), mean=dataset.mean,
                     std=dataset.std)
    out.source_indices = np.asarray(sources, dtype=np.int64)
    out.perturbation_kinds = kinds_out
    out.scenes = scenes
    return out


# -- build_data's loader ----------------------------------------------------------------------
SORT_OF_CLEVR_DEFAULTS = {"num_train": 4000, "num_test": 500}  # scenes, 20 questions each
# As for synthetic-parts: the scenes do not follow the run seed, so every run is scored on the
# same test set and a seed sweep does not regenerate the data.
SORT_OF_CLEVR_DATA_SEED = 0


def sort_of_clevr_loader(a: dict):
    """``build_data``'s loader: generates (once, cached) and reads Sort-of-CLEVR.
    ``num_train``/``num_test`` are numbers of scenes (defaults 4000/500)."""
    check_answers(a.get("num_classes"), ANSWERS, "sort-of-clevr")
    root = ensure_sort_of_clevr(
        a["cache_dir"] if a.get("cache_dir") is not None else default_cache_dir(),
        image_size=a["image_size"], seed=SORT_OF_CLEVR_DATA_SEED,
        **{key: a[key] if a.get(key) is not None else SORT_OF_CLEVR_DEFAULTS[key]
           for key in ("num_train", "num_test")})
    train, test, facts = load_vqa(root, image_size=a["image_size"], mean=a["mean"],
                                   std=a["std"], vocab=a.get("vocab"), answers=ANSWERS)
    facts["meta"] = read_meta(root)
    return train, test, facts
