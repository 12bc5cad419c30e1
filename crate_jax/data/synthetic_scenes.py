"""Cluttered multi-object scenes with per-pixel ground truth: a segmentation set hard enough to
tell models apart, that also trains them (supervised) on the same images.

Each image holds ``min_objects`` to ``max_objects`` (default 2 to 4) shapes (synthetic.SHAPES)
of varied sizes, colours and textures (solid, stripes, checks, dots; two tones of one palette
colour) that may occlude each other, on a smooth textured background strewn with grey clutter
(strokes and blobs that belong to the background, mask 0). Objects are saturated, the
background and its clutter are not, so an object is defined by its colour region and shape,
not by an edge against a flat backdrop.

**The label** is the shape kind of the *main* object: the largest one, drawn with an area
between 0.14 and 0.26 of the image while every other object covers at most 0.35 of the main
object's area, and never covered by more than 20 % (so it is also the object with the most
visible pixels). Classifying it requires finding the dominant object among distractors and
reading its outline through its texture — supervision that rewards attending to objects, which
is what the emergent-segmentation claim needs; the labels are balanced per block of
``num_classes`` consecutive indices.

**The mask** (uint8, H × W) holds 0 for the background and ``k`` for the k-th object in drawing
order (1 is drawn first, at the bottom): at each pixel the id of the last object drawn there.
Every object keeps at least half of its pixels visible. Sample ``i`` is a pure function of
``(seed, split, i)``; generation is NumPy only and on the fly (about a millisecond at 64 px).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np

from crate_jax.data.synthetic.shapes import (
    COLORS,
    SHAPES,
    shape_mask,
    shape_radius,
    smooth_background,
)

TEXTURES: tuple[str, ...] = ("solid", "stripes", "checks", "dots")
# White is left out: its darker tone would be a background grey.
SCENE_COLORS: tuple[str, ...] = tuple(c for c in COLORS if c != "white")
DARK_TONE = 0.7  # the second tone of a texture: the colour scaled towards black
MAIN_AREA = (0.14, 0.26)  # fraction of the image
OTHER_AREA = (0.015, 0.35)  # fraction of the image, then of the main object's area (upper end)
MAIN_MIN_VISIBLE = 0.8
MIN_VISIBLE = 0.5
_SPLITS = {"train": 0, "test": 1}
_DEFAULT_SIZES = {"train": 50_000, "test": 2_000}
_TAG = 5  # disjoint from synthetic/datasets.py's stream tags 1-4
_TRIES = 30
_NOISE = 6.0  # uniform per-pixel noise in [-6, 6)


@dataclass(frozen=True)
class SceneObject:
    """One object: shape and colour indices, centre and half-size (pixels), texture, the two
    RGB tones, the texture's period (pixels) and angle (stripes)."""

    shape: int
    color: int
    cx: float
    cy: float
    r: float
    texture: int
    tones: tuple[tuple[int, int, int], tuple[int, int, int]]
    period: float
    angle: float

    def mask(self, size: int) -> np.ndarray:
        c = np.arange(size, dtype=np.float32) + 0.5
        return shape_mask(self.shape, (c[None, :] - self.cx) / self.r,
                          (c[:, None] - self.cy) / self.r)

    def paint(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The object's texture at the pixels (rows, cols), uint8 (n, 3)."""
        y, x = rows.astype(np.float32) + 0.5, cols.astype(np.float32) + 0.5
        name = TEXTURES[self.texture]
        if name == "solid":
            second = np.zeros(x.shape, bool)
        elif name == "stripes":
            t = x * np.cos(self.angle) + y * np.sin(self.angle)
            second = np.floor(t / self.period) % 2 == 1
        elif name == "checks":
            second = (np.floor(x / self.period) + np.floor(y / self.period)) % 2 == 1
        else:  # dots on a lattice
            dx = np.mod(x, self.period) - self.period / 2
            dy = np.mod(y, self.period) - self.period / 2
            second = dx * dx + dy * dy <= (0.3 * self.period) ** 2
        tones = np.asarray(self.tones, np.uint8)
        return tones[second.astype(np.int64)]


@dataclass(frozen=True)
class SceneLayout:
    """Objects in drawing order (bottom first) and the index of the main (labelled) one."""

    objects: tuple[SceneObject, ...]
    main: int


def _id_map(masks: list[np.ndarray], size: int) -> np.ndarray:
    ids = np.zeros((size, size), np.uint8)
    for k, m in enumerate(masks, start=1):
        ids[m] = k
    return ids


def _visible_enough(masks: list[np.ndarray], main: int, size: int) -> bool:
    ids = _id_map(masks, size)
    visible = np.bincount(ids.ravel(), minlength=len(masks) + 1)[1:]
    full = np.array([m.sum() for m in masks])
    need = np.where(np.arange(len(masks)) == main, MAIN_MIN_VISIBLE, MIN_VISIBLE) * full
    return bool((full > 0).all() and (visible >= need).all())


@functools.lru_cache(maxsize=4096)
def _block_permutation(seed: int, split_id: int, block: int, n: int) -> tuple[int, ...]:
    rng = np.random.default_rng([seed, split_id, _TAG, 1, block])
    return tuple(rng.permutation(n).tolist())


def _object(rng: np.random.Generator, shape: int, color: int, area: float,
            size: int) -> SceneObject:
    r = shape_radius(shape, area, size)
    cx, cy = (float(rng.uniform(r, size - r)) if r < size / 2 else size / 2 for _ in range(2))
    base = np.asarray(COLORS[SCENE_COLORS[color]], np.float64)
    base = np.clip(base + rng.integers(-12, 13, 3), 0, 255)
    tones = (tuple(int(v) for v in base), tuple(int(v) for v in np.round(base * DARK_TONE)))
    period = float(rng.uniform(3.0, 6.0) * size / 64)
    return SceneObject(shape, color, cx, cy, r, int(rng.integers(len(TEXTURES))), tones,
                       period, float(rng.uniform(0, np.pi)))


def clutter(rng: np.random.Generator, size: int) -> np.ndarray:
    """The background: a smooth texture strewn with 4-9 grey strokes and blobs, float32
    (size, size, 3). Clutter channels stay within 8 of each other (unsaturated)."""
    img = smooth_background(rng, size)
    c = np.arange(size, dtype=np.float32) + 0.5
    x, y = c[None, :], c[:, None]
    for _ in range(int(rng.integers(4, 10))):
        grey = rng.uniform(35.0, 185.0) + rng.uniform(-4.0, 4.0, 3)
        # Python floats keep the float32 arithmetic below in float32.
        px, py = (float(v) for v in rng.uniform(0, size, 2))
        if rng.random() < 0.5:  # a stroke: a thin band around a line through (px, py)
            a = float(rng.uniform(0, np.pi))
            u, v = x - px, y - py
            dist = np.abs(u * np.sin(a) - v * np.cos(a))
            along = np.abs(u * np.cos(a) + v * np.sin(a))
            m = ((dist <= float(rng.uniform(0.5, 1.5)) * size / 64)
                 & (along <= float(rng.uniform(0.15, 0.5)) * size))
        else:  # an ellipse blob
            ax, ay = (float(v) * size for v in rng.uniform(0.03, 0.09, 2))
            u, v = (x - px) / ax, (y - py) / ay
            m = u * u + v * v <= 1.0
        img[m] = grey.astype(np.float32)
    return img


class ShapesScenes:
    """Random-access source of {'image': uint8 (S, S, 3), 'mask': uint8 (S, S), 'label'}:
    cluttered multi-object scenes (see the module docstring). `noise=False` leaves out the
    per-pixel noise, so each object's pixels are exactly its texture (for tests)."""

    def __init__(self, split: str = "train", *, num_examples: int | None = None,
                 image_size: int = 64, num_classes: int = 8, min_objects: int = 2,
                 max_objects: int = 4, seed: int = 0, noise: bool = True) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        num_examples = _DEFAULT_SIZES[split] if num_examples is None else num_examples
        if operator.index(num_examples) < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples}")
        if operator.index(image_size) < 32:
            raise ValueError(f"image_size must be >= 32 (small objects vanish below), "
                             f"got {image_size}")
        if not 2 <= operator.index(num_classes) <= len(SHAPES):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got {num_classes}")
        if not 1 <= operator.index(min_objects) <= operator.index(max_objects) \
                <= len(SCENE_COLORS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(SCENE_COLORS)} "
                             f"(one palette colour each), got {min_objects}, {max_objects}")
        if operator.index(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split, self.num_examples, self.image_size = split, int(num_examples), image_size
        self.num_classes, self.seed, self.noise = int(num_classes), int(seed), bool(noise)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.class_names: list[str] = list(SHAPES[: self.num_classes])
        self._split_id = _SPLITS[split]

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (f"ShapesScenes(split={self.split!r}, num_examples={self.num_examples}, "
                f"image_size={self.image_size}, objects={self.min_objects}-{self.max_objects},"
                f" seed={self.seed})")

    def _rng(self, index: int) -> tuple[int, np.random.Generator]:
        i = operator.index(index)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"index {i} out of range [0, {self.num_examples})")
        return i, np.random.default_rng([self.seed, self._split_id, _TAG, 0, i])

    def _sample_layout(self, i: int, rng: np.random.Generator
                       ) -> tuple[SceneLayout, list[np.ndarray]]:
        size = self.image_size
        block, pos = divmod(i, self.num_classes)
        label = _block_permutation(self.seed, self._split_id, block, self.num_classes)[pos]
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        colors = rng.permutation(len(SCENE_COLORS))[:n]
        main_area = rng.uniform(*MAIN_AREA)
        main = _object(rng, label, int(colors[0]), main_area, size)
        depth_of_main = int(rng.integers(n))  # how many objects lie below the main one
        objs, masks = [main], [main.mask(size)]
        for j in range(1, n):
            shape = int(rng.integers(len(SHAPES)))
            area = rng.uniform(OTHER_AREA[0], OTHER_AREA[1] * main_area)
            below = j <= depth_of_main
            for attempt in range(_TRIES):
                obj = _object(rng, shape, int(colors[j]), area * 0.8 ** (attempt // 10), size)
                where = 0 if below else len(objs)
                trial_objs = [*objs[:where], obj, *objs[where:]]
                trial = [*masks[:where], obj.mask(size), *masks[where:]]
                if _visible_enough(trial, trial_objs.index(main), size):
                    objs, masks = trial_objs, trial
                    break
        return SceneLayout(tuple(objs), objs.index(main)), masks

    def layout(self, index: int) -> SceneLayout:
        """The objects of sample `index` (drawing order) and which one is labelled."""
        i, rng = self._rng(index)
        return self._sample_layout(i, rng)[0]

    def __getitem__(self, index: int) -> dict:
        i, rng = self._rng(index)
        lay, masks = self._sample_layout(i, rng)
        size = self.image_size
        img = clutter(rng, size)
        ids = np.zeros((size, size), np.uint8)
        for k, (obj, m) in enumerate(zip(lay.objects, masks, strict=True), start=1):
            rows, cols = np.nonzero(m)
            img[rows, cols] = obj.paint(rows, cols)
            ids[rows, cols] = k
        if self.noise:
            noise = rng.random(img.shape, dtype=np.float32)
            img += noise * (2 * _NOISE) - _NOISE
        image = np.clip(np.round(img), 0, 255).astype(np.uint8)
        return {"image": image, "mask": ids, "label": np.int32(lay.objects[lay.main].shape)}
