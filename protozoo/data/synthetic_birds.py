"""Synthetic "birds" whose class is the colour and pattern of the head, with the head's exact mask.

A second ground-truth dataset of a different design from synthetic-parts (where the class is the
one textured petal among solid ones), so that no explanation default is tuned to one generator.

Each image shows one bird in profile -- tail (a wedge), body (an ellipse), wing (an ellipse over
the body), head (a disc at the front of the body), beak (a small triangle pointing forward) and an
eye (a dark dot in a light ring) -- with a random centre, facing left or right, rotated by up to
25 degrees and scaled by 0.85-1.1. Its box's longer side is 52-75% of the image side (mean 63%,
measured over 1000 images at 64 px). Behind it lie 2-4 clutter blobs (ellipses and leaves) on a
background that is a gradient between two colours plus per-pixel noise. **The class is the colour
and pattern of the head** ("red-solid", "green-striped", ...); the head mask covers 1.6-2.9% of
the image (mean 2.2%), about 100 pixels at 64 px.

Why the cue is *where* a colour-pattern sits, not whether it is in the image:

* the tail, body, wing and every clutter blob are painted with (colour, pattern) combinations
  drawn at random from the class combinations themselves, independently of the label, so every
  class's colour and pattern also appear elsewhere in many images of other classes;
* textures are *mean-preserving* (light and dark shades balanced over a part's visible pixels),
  so a part's average colour does not give its pattern away;
* the background colours are drawn independently of the class.

The mean colour of a whole image predicts the class at chance (tested); a colour histogram still
carries a little (the head adds its ~2% of class-coloured pixels to the random distractors': a
logistic regression on a 64-bin RGB histogram scored 0.34 against a chance of 0.20).

Only the part next to the eye and the beak decides the class. All parts are drawn into one
ownership map that also paints the image; ``mask`` marks the visible head pixels, the eye
included and the beak excluded; ``box`` is the tight box of the whole bird (clutter excluded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protozoo.data import generated as gen
from protozoo.data.generated import PALETTE, PALETTE_RGB

GENERATOR_VERSION = 1

PATTERNS = ("solid", "striped", "dotted", "checkered")
MAX_CLASSES = len(PALETTE) * len(PATTERNS)

# Ownership ids, back to front: 0 background, 1..MAX_CLUTTER clutter, then the bird's parts.
MAX_CLUTTER = 4
TAIL, BODY, WING, HEAD, BEAK, EYE_RING, PUPIL = range(MAX_CLUTTER + 1, MAX_CLUTTER + 8)
_FIXED_RGB = {BEAK: (245, 150, 40), EYE_RING: (245, 245, 245), PUPIL: (20, 20, 20)}

# The bird in its own frame, in units of the image side at scale 1: x forward (towards the head),
# y down; the origin is the body's centre. Sizes put the head at about 2.4% of the image and the
# bird at about 0.67 of the side (tail tip to beak tip) at scale 1.
_BODY = (0.0, 0.0, 0.20, 0.115, 0.0)  # ellipse: centre x, y, semi-axes a, b, angle
_WING = (-0.04, -0.01, 0.13, 0.06, 0.2)
_TAIL = ((-0.10, 0.0), (-0.31, -0.085), (-0.30, 0.055))  # apex inside the body, then the fan
_HEAD = (0.20, -0.085, 0.088)  # disc: centre x, y, radius
_BEAK = ((0.27, -0.115), (0.27, -0.055), (0.363, -0.077))  # base inside the head, tip forward
_EYE = (0.235, -0.105, 0.030, 0.017)  # centre x, y, ring radius, pupil radius
_SCALE = (0.85, 1.1)
_MAX_TILT = np.deg2rad(25.0)
_CLUTTER_COUNT = (2, MAX_CLUTTER)
_CLUTTER_AXES = ((0.06, 0.12), (0.04, 0.09))  # semi-axis ranges (image sides)

_TEXTURE_CONTRAST = 0.9  # shade offset as a fraction of the room left on each channel
_BACKGROUND_MIX = 0.5  # background colours = palette colours mixed with grey
_BACKGROUND_NOISE = 6.0  # std of per-pixel background noise (grey levels)

PART_DESCRIPTIONS = {
    "background": "gradient between two palette colours mixed 50% with grey, plus per-pixel "
    "noise; independent of class",
    "clutter": f"{_CLUTTER_COUNT[0]}-{_CLUTTER_COUNT[1]} ellipses / leaves behind the bird, each "
    "a class (colour, pattern) combination drawn independently of the label",
    "tail, body, wing": "each a class (colour, pattern) combination drawn independently of "
    "the label",
    "beak, eye": "fixed colours (orange beak; dark pupil in a light ring): the head's landmarks",
    "discriminative_part": "the head (a disc at the front of the body); its colour and pattern "
    "(mean-preserving shades) are the class; mask = its visible pixels, eye included, beak not",
}


# -- shapes in image pixels ---------------------------------------------------------------------
@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    a: float  # semi-axis along the shape (texture u)
    b: float
    angle: float  # direction of the a axis, radians
    leaf: bool = False  # pointed ends: |v|/b <= 1 - (u/a)^2

    def extent(self) -> tuple[float, float, float, float]:
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        hx, hy = math.hypot(self.a * cos, self.b * sin), math.hypot(self.a * sin, self.b * cos)
        return self.cx - hx, self.cy - hy, self.cx + hx, self.cy + hy

    def cover(self, xs, ys):
        """(inside, u, v) on the window's pixel centres; u along the shape, v across it."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        dx, dy = xs - self.cx, ys - self.cy
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        t = (u / self.a) ** 2
        inside = np.abs(v) <= self.b * (1.0 - t) if self.leaf else t + (v / self.b) ** 2 <= 1.0
        return inside, u, v


@dataclass(frozen=True)
class Triangle:
    points: tuple[tuple[float, float], ...]  # apex first; texture u runs from the apex outward

    def extent(self) -> tuple[float, float, float, float]:
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        return min(xs), min(ys), max(xs), max(ys)

    def cover(self, xs, ys):
        (x0, y0), (x1, y1), (x2, y2) = self.points
        sides = [(bx - ax) * (ys - ay) - (by - ay) * (xs - ax)
                 for (ax, ay), (bx, by) in (((x0, y0), (x1, y1)), ((x1, y1), (x2, y2)),
                                            ((x2, y2), (x0, y0)))]
        inside = ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | (
            (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0))
        ax, ay = (x1 + x2) / 2 - x0, (y1 + y2) / 2 - y0
        length = max(math.hypot(ax, ay), 1e-6)
        cos, sin = ax / length, ay / length
        dx, dy = xs - x0, ys - y0
        return inside, dx * cos + dy * sin, -dx * sin + dy * cos


def _window(shape, image_size: int):
    """(rows, cols) slices of the shape's bounding box: drawing works on it, not the image."""
    x0, y0, x1, y1 = shape.extent()
    rows = slice(max(0, int(y0) - 1), min(image_size, math.ceil(y1) + 1))
    cols = slice(max(0, int(x0) - 1), min(image_size, math.ceil(x1) + 1))
    return rows, cols


# -- one sample ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pose:
    centre: tuple[float, float]  # the body's centre, pixels
    facing: int  # +1: head to the right, -1: to the left
    tilt: float  # rotation, radians
    scale: float  # pixels per unit of the bird frame (image side x scale factor)

    def point(self, x: float, y: float) -> tuple[float, float]:
        fx, cos, sin = self.facing * x, math.cos(self.tilt), math.sin(self.tilt)
        return (self.centre[0] + self.scale * (fx * cos - y * sin),
                self.centre[1] + self.scale * (fx * sin + y * cos))

    def angle(self, angle: float) -> float:
        """A direction of the bird frame in the image (mirrored, then rotated)."""
        return math.atan2(math.sin(angle), self.facing * math.cos(angle)) + self.tilt

    def ellipse(self, cx, cy, a, b, angle=0.0) -> Ellipse:
        return Ellipse(*self.point(cx, cy), a * self.scale, b * self.scale, self.angle(angle))

    def triangle(self, points) -> Triangle:
        return Triangle(tuple(self.point(x, y) for x, y in points))


def bird_shapes(pose: Pose) -> dict[int, Ellipse | Triangle]:
    """The bird's parts in image pixels, by ownership id, back to front."""
    hx, hy, hr = _HEAD
    ex, ey, ring, pupil = _EYE
    return {
        TAIL: pose.triangle(_TAIL),
        BODY: pose.ellipse(*_BODY),
        WING: pose.ellipse(*_WING),
        HEAD: pose.ellipse(hx, hy, hr, hr),  # u runs forward, so stripes cross the head
        BEAK: pose.triangle(_BEAK),
        EYE_RING: pose.ellipse(ex, ey, ring, ring),
        PUPIL: pose.ellipse(ex, ey, pupil, pupil),
    }


@dataclass(frozen=True)
class BirdSpec:
    """Every random choice for one image; rendering is a pure function of this."""

    label: int
    pose: Pose
    combos: dict  # ownership id -> (colour, pattern) for the head, tail, body, wing and clutter
    clutter: tuple[Ellipse, ...]  # behind the bird, ids 1..len(clutter)
    background: tuple[int, int, float]  # two palette colours and the gradient's direction
    phases: dict  # ownership id -> texture offset (u, v)
    noise_seed: int

    @property
    def colour(self) -> int:
        return self.combos[HEAD][0]

    @property
    def pattern(self) -> int:
        return self.combos[HEAD][1]


@dataclass(frozen=True)
class Rendered:
    image: np.ndarray  # uint8 [S, S, 3]
    mask: np.ndarray  # bool [S, S], visible head pixels (eye included, beak excluded)
    box: tuple[int, int, int, int]  # xyxy of the whole bird, exclusive x1/y1
    owner: np.ndarray  # int8 [S, S], which part painted each pixel (0 background)


def _place(rng: np.random.Generator, image_size: int) -> Pose:
    """A random pose whose bird lies wholly inside the image."""
    facing = 1 if rng.random() < 0.5 else -1
    tilt = float(rng.uniform(-_MAX_TILT, _MAX_TILT))
    scale = float(rng.uniform(*_SCALE)) * image_size
    at_origin = Pose((0.0, 0.0), facing, tilt, scale)
    ext = np.array([s.extent() for s in bird_shapes(at_origin).values()])
    lo, hi = ext[:, :2].min(axis=0), ext[:, 2:].max(axis=0)
    low, high = 1.0 - lo, image_size - 1.0 - hi
    centre = rng.uniform(low, np.maximum(low, high))
    return Pose((float(centre[0]), float(centre[1])), facing, tilt, scale)


def _clutter(rng: np.random.Generator, image_size: int) -> tuple[Ellipse, ...]:
    count = int(rng.integers(_CLUTTER_COUNT[0], _CLUTTER_COUNT[1] + 1))
    blobs = []
    for _ in range(count):
        a, b = (float(rng.uniform(*r)) * image_size for r in _CLUTTER_AXES)
        cx, cy = (float(v) for v in rng.uniform(0.0, image_size, size=2))
        blobs.append(Ellipse(cx, cy, max(a, b), min(a, b), float(rng.uniform(0.0, np.pi)),
                             leaf=bool(rng.random() < 0.5)))
    return tuple(blobs)


def sample_spec(rng: np.random.Generator, label: int, num_classes: int,
                image_size: int) -> BirdSpec:
    """Draw the random layout of one bird of class ``label``."""
    combos = GENERATOR.class_combos(num_classes)
    pose = _place(rng, image_size)
    clutter = _clutter(rng, image_size)
    # Every other textured part takes a class combination at random, whatever the label.
    others = [*range(1, len(clutter) + 1), TAIL, BODY, WING]
    drawn = rng.integers(num_classes, size=len(others)).tolist()
    parts = {k: combos[j] for k, j in zip(others, drawn, strict=True)}
    parts[HEAD] = combos[label]
    phases = rng.uniform(0.0, 64.0, size=(len(parts), 2)).tolist()
    return BirdSpec(
        label=int(label), pose=pose, combos=parts, clutter=clutter,
        background=(int(rng.integers(len(PALETTE))), int(rng.integers(len(PALETTE))),
                    float(rng.uniform(0.0, 2.0 * np.pi))),
        phases={k: tuple(p) for k, p in zip(sorted(parts), phases, strict=True)},
        noise_seed=int(rng.integers(2**31)),
    )


def _background(spec: BirdSpec, image_size: int) -> np.ndarray:
    first, second, direction = spec.background
    xs, ys = gen.pixel_grid(image_size)
    cos, sin = math.cos(direction) / image_size, math.sin(direction) / image_size
    t = np.clip(xs * cos + ys * sin + (0.5 - 0.5 * (cos + sin) * image_size), 0.0, 1.0)
    ends = (1 - _BACKGROUND_MIX) * PALETTE_RGB[[first, second]] + _BACKGROUND_MIX * 128.0
    # uniform noise (a quarter of the cost of normal noise), scaled to the same std
    noise = np.random.default_rng(spec.noise_seed).random((image_size, image_size, 3),
                                                          dtype=np.float32)
    noise -= 0.5
    noise *= _BACKGROUND_NOISE * math.sqrt(12.0)
    noise += ends[0]
    noise += t[..., None] * (ends[1] - ends[0])  # a linear ramp across the image
    return noise


def render(spec: BirdSpec, image_size: int) -> Rendered:
    """Paint ``spec``: draw every shape into the ownership map, then colour each owner."""
    shapes = dict(enumerate(spec.clutter, start=1)) | bird_shapes(spec.pose)
    xs, ys = gen.pixel_grid(image_size)
    owner = np.zeros((image_size, image_size), dtype=np.int8)
    covers = {}
    for k, shape in shapes.items():  # back to front
        rows, cols = _window(shape, image_size)
        inside, u, v = shape.cover(xs[rows, cols], ys[rows, cols])
        owner[rows, cols][inside] = k
        covers[k] = rows, cols, u, v
    image = _background(spec, image_size)
    half = gen.pattern_cell(image_size)
    for k, (rows, cols, u, v) in covers.items():
        visible = owner[rows, cols] == k  # the shape lies inside its window
        if k in _FIXED_RGB:
            image[rows, cols][visible] = _FIXED_RGB[k]
            continue
        colour, pattern = spec.combos[k]
        phase = spec.phases[k]
        bits = gen.pattern_bits(PATTERNS[pattern], u[visible] + phase[0], v[visible] + phase[1],
                                half)
        image[rows, cols][visible] = gen.mean_preserving(PALETTE_RGB[colour], bits,
                                                         _TEXTURE_CONTRAST)
    mask = (owner == HEAD) | (owner == EYE_RING) | (owner == PUPIL)
    return Rendered(gen.to_uint8(image), mask, gen.box_of(owner >= TAIL), owner)


# -- the dataset (the steps every generator shares: protozoo.data.generated) -------------------
GENERATOR = gen.PartGenerator(
    name="synthetic-birds", version=GENERATOR_VERSION, patterns=PATTERNS,
    sample_spec=sample_spec, render=render, parts=PART_DESCRIPTIONS,
    min_image_size=24)  # below 24 px the pupil is under a pixel
# GENERATOR is the API (class_combos, class_names, iter_specs, arrays, generate, ensure); the
# first six classes differ in colour, later ones reuse a colour with another pattern.
generate_synthetic_birds = GENERATOR.generate
ensure_synthetic_birds = GENERATOR.ensure
