"""The shape datasets: classification, image-caption pairs and segmentation, drawn with the
primitives of `shapes`.

Sample ``i`` of a split is a pure function of ``(seed, split, i)``: each sample seeds its own
generator, so access is random and there is no global state. The datasets follow grain's
random-access source protocol (``__len__`` and ``__getitem__``) and pickle cheaply.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np

from crate_jax.data.synthetic.shapes import (
    COLORS,
    SHAPES,
    PlacedShape,
    jitter_color,
    object_mask,
    place_shape,
    render,
    shape_radius,
    uniform_centre,
)

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
        obj = place_shape(rng, label, color, rng.uniform(0.10, 0.30), self.image_size)
        image, ids = render([obj], [object_mask(obj, self.image_size)], rng, self.image_size,
                             textured=self.background == "texture")
        return {"image": image, "label": np.int32(label)}, ids

    def __getitem__(self, index: int) -> dict:
        return self._generate(index)[0]


@dataclass(frozen=True)
class _CaptionLayout:
    objects: list[PlacedShape]
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
            obj = place_shape(rng, shape, color, rng.uniform(0.10, 0.30), size)
            desc = self.class_names[label]
            caption = template.format(d=desc, a=_article(desc))
            return _CaptionLayout([obj], None, None, caption, label)

        others = self._train_ids[self._train_ids != label]
        second = int(rng.choice(others)) if len(others) else label
        color2, shape2 = divmod(second, n_shapes)
        main_large = rng.random() < 0.5
        small, large = rng.uniform(0.03, 0.06), rng.uniform(0.10, 0.18)
        r1 = shape_radius(shape, large if main_large else small, size)
        r2 = shape_radius(shape2, small if main_large else large, size)
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
        oa = uniform_centre(rng, ra, size)
        lo, hi = max(rb, oa - (cb - ca) / 2), min(size - rb, oa + (cb - ca) / 2)
        ob = float(rng.uniform(lo, hi)) if lo < hi else float(np.clip(oa, rb, size - rb))
        if relation in ("left of", "right of"):
            pa, pb = (ca, oa), (cb, ob)
        else:
            pa, pb = (oa, ca), (ob, cb)
        p1, p2 = (pa, pb) if main_first else (pb, pa)
        o1 = PlacedShape(shape, color, p1[0], p1[1], r1, jitter_color(rng, color))
        o2 = PlacedShape(shape2, color2, p2[0], p2[1], r2, jitter_color(rng, color2))
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
        masks = [object_mask(o, self.image_size) for o in lay.objects]
        image, ids = render(lay.objects, masks, rng, self.image_size)
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
                obj = place_shape(rng, shape, int(colors[j]), area * scale, size)
                m = object_mask(obj, size)
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
        image, ids = render(objs, masks, rng, size)
        return {"image": image, "mask": ids, "label": np.int32(objs[0].shape)}, ids

    def __getitem__(self, index: int) -> dict:
        return self._generate(index)[0]
