"""Procedurally generated shape datasets for tests, demos and smoke runs.

NumPy only, so samples are cheap to make inside grain worker processes. Sample ``i`` of a split
is a pure function of ``(seed, split, i)``: each sample seeds its own generator, so access is
random and there is no global state. The datasets follow grain's random-access source protocol
(``__len__`` and ``__getitem__``) and pickle cheaply.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "diamond",
    "bar",
    "star",
)

# Every colour has one channel >= 190 and (white aside) one <= 70, far from the mid-grey
# background range, so shapes stand out whatever the texture.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 220),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
}

_COLOR_VALUES = tuple(COLORS.values())
_PALETTE = np.array(_COLOR_VALUES, np.float32)
_COLOR_JITTER = 12
_SPLITS = {"train": 0, "test": 1}
_DEFAULT_SIZES = {"train": 50_000, "test": 2_000}
# Stream tags keep the datasets' (and the label permutations') generators disjoint for one seed.
_TAG_CLS, _TAG_CAP, _TAG_SEG, _TAG_HOLDOUT = 1, 2, 3, 4
_STREAM_SAMPLE, _STREAM_LABELS = 0, 1
_RELATIONS = ("left of", "right of", "above", "below")
_TEMPLATES = (
    "a photo of {a}",
    "{d}",
    "{a} on a textured background",
    "a picture of {a}",
    "an image of {a}",
)


# --------------------------------------------------------------------------------------------
# Geometry


def _unit_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape ``kind`` in unit coordinates (u right, v down); it lies in the box [-1, 1]^2.

    ``u`` and ``v`` broadcast against each other (a row and a column give an (H, W) mask).
    """
    name = SHAPES[kind]
    au, av = np.abs(u), np.abs(v)
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return (au <= 1.0) & (av <= 1.0)
    if name == "triangle":
        return (v <= 1.0) & (au <= (v + 1.0) * 0.5)
    if name == "cross":
        return ((au <= 1.0) & (av <= 0.34)) | ((au <= 0.34) & (av <= 1.0))
    if name == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.55**2)
    if name == "diamond":
        return au + av <= 1.0
    if name == "bar":
        return (au <= 1.0) & (av <= 0.4)
    if name == "star":
        return _star(u, v)
    raise AssertionError(name)


_STAR_INNER = 0.5
_STAR_HALF = np.pi / 5  # half the angle between two tips


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Fold the plane into one half-sector (tip on the x axis), then test the straight edge
    # from the tip (1, 0) to the inner vertex.
    theta = np.arctan2(u, -v)  # 0 points up, to the top tip
    phi = np.abs(np.mod(theta + _STAR_HALF, 2 * _STAR_HALF) - _STAR_HALF)
    rho = np.sqrt(u * u + v * v)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    dx = _STAR_INNER * np.cos(_STAR_HALF) - 1.0
    dy = _STAR_INNER * np.sin(_STAR_HALF)
    # Inside is the origin's side of the edge (where the cross product is positive).
    return dx * py - dy * (px - 1.0) >= 0.0


def _fill_fractions(res: int = 256) -> np.ndarray:
    g = (np.arange(res) + 0.5) / res * 2.0 - 1.0
    return np.array([_unit_mask(k, g[None, :], g[:, None]).mean() for k in range(len(SHAPES))])


# Fraction of its box each shape covers: sizes are drawn as areas, so no shape is a size cue.
_FILL = _fill_fractions()


@functools.cache
def _coords(size: int) -> np.ndarray:
    c = np.arange(size, dtype=np.float32) + 0.5
    c.setflags(write=False)
    return c


@functools.cache
def _upsampler(size: int, grid: int) -> np.ndarray:
    """(size, grid) bilinear interpolation matrix (align-corners=False, edge clamped)."""
    pos = np.clip((np.arange(size) + 0.5) * grid / size - 0.5, 0.0, grid - 1.0)
    lo = np.minimum(np.floor(pos).astype(np.int64), grid - 2)
    frac = pos - lo
    a = np.zeros((size, grid), np.float32)
    rows = np.arange(size)
    a[rows, lo] = 1.0 - frac
    a[rows, lo + 1] += frac
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class _Obj:
    """One shape: kind and colour indices, centre and half-size in pixels, jittered RGB."""

    shape: int
    color: int
    cx: float
    cy: float
    r: float
    rgb: tuple[int, int, int]

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r


def _radius(shape: int, area_frac: float, size: int) -> float:
    r = size * np.sqrt(area_frac / (4.0 * _FILL[shape]))
    return float(min(r, size / 2.0))


def _jitter(rng: np.random.Generator, color: int) -> tuple[int, int, int]:
    d = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3).tolist()
    r, g, b = (min(255, max(0, c + e)) for c, e in zip(_COLOR_VALUES[color], d, strict=True))
    return r, g, b


def _uniform_centre(rng: np.random.Generator, r: float, size: int) -> float:
    # The whole box stays inside the image.
    return float(rng.uniform(r, size - r)) if r < size / 2 else size / 2.0


def _place_single(
    rng: np.random.Generator, shape: int, color: int, area_frac: float, size: int
) -> _Obj:
    r = _radius(shape, area_frac, size)
    cx = _uniform_centre(rng, r, size)
    cy = _uniform_centre(rng, r, size)
    return _Obj(shape, color, cx, cy, r, _jitter(rng, color))


def _object_mask(obj: _Obj, size: int) -> np.ndarray:
    c = _coords(size)
    return _unit_mask(obj.shape, (c[None, :] - obj.cx) / obj.r, (c[:, None] - obj.cy) / obj.r)


def _background(rng: np.random.Generator, size: int, textured: bool = True) -> np.ndarray:
    """Smooth low-contrast mid-grey texture, float32 (size, size, 3); with textured=False one
    flat mid-grey."""
    if not textured:
        base = rng.uniform(75.0, 125.0) + rng.uniform(-10.0, 10.0, 3)
        return np.broadcast_to(base.astype(np.float32), (size, size, 3)).copy()
    grid = 4 if rng.random() < 0.5 else 8
    up = _upsampler(size, grid)
    # Mostly luminance variation with a little chroma: channels stay close to each other, so
    # the background never resembles a saturated palette colour.
    coarse = rng.normal(0.0, 14.0, (1, grid, grid)) + rng.normal(0.0, 4.0, (3, grid, grid))
    base = rng.uniform(75.0, 125.0) + rng.uniform(-10.0, 10.0, 3)
    smooth = up @ coarse.astype(np.float32) @ up.T  # (3, size, size)
    img = np.empty((size, size, 3), np.float32)  # channels-last and C-contiguous
    np.add(smooth.transpose(1, 2, 0), base.astype(np.float32), out=img)
    # Plain ufuncs: np.clip's Python-level overhead is a sizeable part of a 32x32 sample.
    np.maximum(img, 30.0, out=img)
    return np.minimum(img, 180.0, out=img)


def _render(
    objs: list[_Obj], masks: list[np.ndarray], rng: np.random.Generator, size: int,
    textured: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 (H, W, 3) and object-id mask uint8 (H, W); later objects on top."""
    img = _background(rng, size, textured)
    ids = np.zeros((size, size), np.uint8)
    for k, (obj, m) in enumerate(zip(objs, masks, strict=True), start=1):
        img[m] = obj.rgb
        ids[m] = k
    # Uniform per-pixel noise in [-6, 6) (std 3.5): cheaper to draw than Gaussian noise.
    noise = rng.random((size, size, 3), dtype=np.float32)
    noise *= 12.0
    noise -= 5.5  # the extra +0.5 rounds on the cast below
    img += noise
    np.maximum(img, 0.0, out=img)
    np.minimum(img, 255.0, out=img)
    return img.astype(np.uint8), ids


# --------------------------------------------------------------------------------------------
# Datasets


@functools.lru_cache(maxsize=4096)
def _block_permutation(seed: int, split_id: int, tag: int, block: int, n: int) -> tuple[int, ...]:
    # Cached: sequential reads hit each block n times, and seeding a generator is not free.
    rng = np.random.default_rng([seed, split_id, tag, _STREAM_LABELS, block])
    return tuple(rng.permutation(n).tolist())


class _ShapesBase:
    _tag = 0

    def __init__(self, split: str, num_examples: int | None, image_size: int, seed: int) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        if num_examples is None:
            num_examples = _DEFAULT_SIZES[split]
        if operator.index(num_examples) < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples}")
        # Below 16 pixels the small shapes of two-shape captions can vanish.
        if operator.index(image_size) < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if operator.index(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split = split
        self.num_examples = int(num_examples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self._split_id = _SPLITS[split]

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed})"
        )

    def _check_index(self, index: int) -> int:
        i = operator.index(index)
        if not 0 <= i < self.num_examples:
            raise IndexError(f"index {i} out of range [0, {self.num_examples})")
        return i

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._split_id, self._tag, _STREAM_SAMPLE, i])

    def _balanced(self, i: int, n: int) -> int:
        # Each consecutive block of n indices holds every class once, in a seeded order: exact
        # balance without giving up random access.
        block, pos = divmod(i, n)
        return _block_permutation(self.seed, self._split_id, self._tag, block, n)[pos]


BACKGROUNDS = ("texture", "plain")


class ShapesClassification(_ShapesBase):
    """Image classification: the label is the shape kind of the single shape in the image; colour,
    position, size and background are nuisance factors.

    background='texture' (the default) draws each image its own smooth texture; 'plain' one
    flat grey. A texture is unique to its image and survives crops and colour jitter, so a
    self-supervised objective that matches two views of one image can match textures instead
    of shapes: the SimDINO demo uses 'plain'.
    """

    _tag = _TAG_CLS

    def __init__(
        self,
        split: str = "train",
        *,
        num_examples: int | None = None,
        image_size: int = 32,
        num_classes: int = 8,
        seed: int = 0,
        background: str = "texture",
    ) -> None:
        super().__init__(split, num_examples, image_size, seed)
        if not 2 <= operator.index(num_classes) <= len(SHAPES):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got {num_classes}")
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
        self.background = background
        self.num_classes = int(num_classes)
        self.class_names: list[str] = list(SHAPES[: self.num_classes])

    def _generate(self, index: int) -> tuple[dict, np.ndarray]:
        i = self._check_index(index)
        label = self._balanced(i, self.num_classes)
        rng = self._rng(i)
        color = int(rng.integers(len(COLORS)))
        obj = _place_single(rng, label, color, rng.uniform(0.10, 0.30), self.image_size)
        image, ids = _render([obj], [_object_mask(obj, self.image_size)], rng, self.image_size,
                             textured=self.background == "texture")
        return {"image": image, "label": np.int32(label)}, ids

    def __getitem__(self, index: int) -> dict:
        return self._generate(index)[0]


@dataclass(frozen=True)
class _CaptionLayout:
    objects: list[_Obj]
    relation: str | None  # "<main> <relation> <second>", None for one shape
    sizes: tuple[str, str] | None  # size words of (main, second)
    caption: str
    label: int


def _choose_heldout(seed: int, k: int, n_colors: int, n_shapes: int) -> list[int]:
    """k seeded (colour, shape) class ids whose removal leaves every colour and shape in use."""
    n = n_colors * n_shapes
    keep = max(n_colors, n_shapes)
    if not 0 <= operator.index(k) <= n - keep:
        raise ValueError(
            f"holdout_pairs must be in [0, {n - keep}] so that every colour and every shape "
            f"keeps a training pair, got {k}"
        )
    if k == 0:
        return []
    rng = np.random.default_rng([seed, 0, _TAG_HOLDOUT, 0, 0])
    # A random cover (each colour and each shape once or more) is never held out.
    colors = rng.permutation(np.resize(np.arange(n_colors), keep))
    shapes = rng.permutation(np.resize(np.arange(n_shapes), keep))
    kept = set((colors * n_shapes + shapes).tolist())
    candidates = np.array([c for c in range(n) if c not in kept])
    return sorted(rng.choice(candidates, size=k, replace=False).tolist())


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class ShapesCaptions(_ShapesBase):
    """Image-caption pairs: one or two shapes; the caption describes them, e.g. 'a red circle' or
    'a small blue square above a large yellow cross'. Each image also has a 'label' = index of the
    (colour, shape) class of its first (main) shape, for zero-shot evaluation.

    Class ``c`` is colour ``c // len(SHAPES)`` and shape ``c % len(SHAPES)``. With
    ``holdout_pairs=k``, ``k`` seeded pairs never appear in 'train' and are the only main
    classes of 'test' (single shapes there), to measure compositional generalisation.
    """

    _tag = _TAG_CAP

    def __init__(
        self,
        split: str = "train",
        *,
        num_examples: int | None = None,
        image_size: int = 32,
        seed: int = 0,
        holdout_pairs: int = 0,
        two_shape_prob: float = 0.3,
    ) -> None:
        super().__init__(split, num_examples, image_size, seed)
        if not 0.0 <= two_shape_prob <= 1.0:
            raise ValueError(f"two_shape_prob must be in [0, 1], got {two_shape_prob}")
        self.class_names: list[str] = [f"{c} {s}" for c in COLORS for s in SHAPES]
        self.num_classes = len(self.class_names)
        self.holdout_pairs = int(holdout_pairs)
        self.heldout_class_ids: list[int] = _choose_heldout(
            self.seed, self.holdout_pairs, len(COLORS), len(SHAPES)
        )
        held = set(self.heldout_class_ids)
        self._train_ids = np.array([c for c in range(self.num_classes) if c not in held])
        if split == "test" and held:
            self._main_ids = np.array(self.heldout_class_ids)
            self._two_shape_prob = 0.0
        else:
            self._main_ids = self._train_ids
            self._two_shape_prob = float(two_shape_prob)

    def _sample_layout(self, i: int, rng: np.random.Generator) -> _CaptionLayout:
        size, n_shapes = self.image_size, len(SHAPES)
        label = int(self._main_ids[self._balanced(i, len(self._main_ids))])
        color, shape = divmod(label, n_shapes)
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        if rng.random() >= self._two_shape_prob:
            obj = _place_single(rng, shape, color, rng.uniform(0.10, 0.30), size)
            desc = self.class_names[label]
            caption = template.format(d=desc, a=_article(desc))
            return _CaptionLayout([obj], None, None, caption, label)

        others = self._train_ids[self._train_ids != label]
        second = int(rng.choice(others)) if len(others) else label
        color2, shape2 = divmod(second, n_shapes)
        main_large = rng.random() < 0.5
        small, large = rng.uniform(0.03, 0.06), rng.uniform(0.10, 0.18)
        r1 = _radius(shape, large if main_large else small, size)
        r2 = _radius(shape2, small if main_large else large, size)
        # Both boxes must fit side by side along the relation's axis.
        scale = min(1.0, (size - 1.0) / (2.0 * (r1 + r2)))
        r1, r2 = r1 * scale, r2 * scale
        relation = _RELATIONS[int(rng.integers(len(_RELATIONS)))]
        main_first = relation in ("left of", "above")
        ra, rb = (r1, r2) if main_first else (r2, r1)  # a comes first along the axis
        slack = size - 2.0 * (ra + rb)
        s0, s1 = np.sort(rng.uniform(0.0, slack, 2))
        ca, cb = float(s0 + ra), float(2.0 * ra + s1 + rb)
        # Keep the across-axis offset under half the along-axis one (where the image allows) so
        # the relation is unambiguous.
        oa = _uniform_centre(rng, ra, size)
        lo, hi = max(rb, oa - (cb - ca) / 2), min(size - rb, oa + (cb - ca) / 2)
        ob = float(rng.uniform(lo, hi)) if lo < hi else float(np.clip(oa, rb, size - rb))
        if relation in ("left of", "right of"):
            pa, pb = (ca, oa), (cb, ob)
        else:
            pa, pb = (oa, ca), (ob, cb)
        p1, p2 = (pa, pb) if main_first else (pb, pa)
        o1 = _Obj(shape, color, p1[0], p1[1], r1, _jitter(rng, color))
        o2 = _Obj(shape2, color2, p2[0], p2[1], r2, _jitter(rng, color2))
        w1, w2 = ("large", "small") if main_large else ("small", "large")
        desc = f"{w1} {self.class_names[label]} {relation} a {w2} {self.class_names[second]}"
        caption = template.format(d=desc, a=_article(desc))
        return _CaptionLayout([o1, o2], relation, (w1, w2), caption, label)

    def _layout(self, index: int) -> _CaptionLayout:
        i = self._check_index(index)
        return self._sample_layout(i, self._rng(i))

    def _generate(self, index: int) -> tuple[dict, np.ndarray]:
        i = self._check_index(index)
        rng = self._rng(i)
        lay = self._sample_layout(i, rng)
        masks = [_object_mask(o, self.image_size) for o in lay.objects]
        image, ids = _render(lay.objects, masks, rng, self.image_size)
        return {"image": image, "caption": lay.caption, "label": np.int32(lay.label)}, ids

    def __getitem__(self, index: int) -> dict:
        return self._generate(index)[0]


_PLACEMENT_TRIES = 24
_MIN_VISIBLE = 0.8  # fraction of its pixels an object keeps when a later one overlaps it


class ShapesSegmentation(_ShapesBase):
    """Shapes on textured backgrounds with their ground-truth masks, for emergent segmentation
    scores.

    Each image holds 1 to ``max_objects`` shapes in distinct colours (while the palette lasts).
    Placement avoids overlap; when a few tries find no free space a later object may cover a
    little of earlier ones (it is drawn on top), and one that finds no room at all is left out.
    """

    _tag = _TAG_SEG

    def __init__(
        self,
        split: str = "test",
        *,
        num_examples: int | None = None,
        image_size: int = 64,
        max_objects: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(split, num_examples, image_size, seed)
        if not 1 <= operator.index(max_objects) <= 255:  # ids live in a uint8 mask
            raise ValueError(f"max_objects must be in [1, 255], got {max_objects}")
        self.max_objects = int(max_objects)
        self.class_names: list[str] = list(SHAPES)

    def _generate(self, index: int) -> tuple[dict, np.ndarray]:
        i = self._check_index(index)
        rng, size = self._rng(i), self.image_size
        n = int(rng.integers(1, self.max_objects + 1))
        # Shrink objects as their number grows so that most placements find free space.
        hi = 0.25 if n == 1 else min(0.15, 0.45 / n)
        lo = 0.08 if n == 1 else min(0.04, hi / 2)
        # Distinct colours (while the palette lasts) keep touching objects apart visually.
        colors = rng.permutation(np.resize(np.arange(len(COLORS)), max(n, len(COLORS))))[:n]
        ids = np.zeros((size, size), np.uint8)
        objs, masks, areas = [], [], []
        for j in range(n):
            shape, area = int(rng.integers(len(SHAPES))), rng.uniform(lo, hi)
            for attempt in range(_PLACEMENT_TRIES):
                scale = 0.85 ** (attempt * 3 // _PLACEMENT_TRIES)  # shrink in the later tries
                obj = _place_single(rng, shape, int(colors[j]), area * scale, size)
                m = _object_mask(obj, size)
                hidden = np.bincount(ids[m], minlength=len(objs) + 1)[1:]
                if j == 0 or not hidden.any():
                    break
                # Late tries may cover a little of earlier objects (drawn on top), but each keeps
                # most of its pixels, so every object id stays a sizeable visible region.
                if attempt >= _PLACEMENT_TRIES * 2 // 3:
                    visible = np.bincount(ids.ravel(), minlength=len(objs) + 1)[1:]
                    if (visible - hidden >= _MIN_VISIBLE * np.array(areas)).all():
                        break
            else:
                continue  # no room: fewer objects
            ids[m] = len(objs) + 1
            objs.append(obj)
            masks.append(m)
            areas.append(int(m.sum()))
        image, ids = _render(objs, masks, rng, size)
        return {"image": image, "mask": ids, "label": np.int32(objs[0].shape)}, ids

    def __getitem__(self, index: int) -> dict:
        return self._generate(index)[0]


# --------------------------------------------------------------------------------------------
# Building blocks shared with the multi-object scenes (crate_jax/data/synthetic_scenes.py)

shape_mask = _unit_mask
smooth_background = _background


def shape_radius(shape: int, area_frac: float, size: int) -> float:
    """Half-size in pixels of a `shape` covering `area_frac` of a size × size image."""
    return _radius(shape, area_frac, size)
