"""Tests of crate_jax.data.synthetic: determinism, shapes, balance, masks, captions, held-out."""

import collections
import pickle
import re

import numpy as np
import pytest

from crate_jax.data.synthetic import (
    COLORS,
    SHAPES,
    ShapesCaptions,
    ShapesClassification,
    ShapesSegmentation,
)

PALETTE = np.array(list(COLORS.values()), np.float64)
PAIR_RE = re.compile(r"\b(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b")
RELATION_RE = re.compile(r"\b(left of|right of|above|below)\b")


def _pairs(caption: str) -> list[tuple[str, str]]:
    return PAIR_RE.findall(caption)


def test_constants() -> None:
    assert len(SHAPES) >= 8 and len(set(SHAPES)) == len(SHAPES)
    assert len(COLORS) >= 6
    for rgb in COLORS.values():
        assert len(rgb) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in rgb)


@pytest.mark.parametrize("cls", [ShapesClassification, ShapesCaptions, ShapesSegmentation])
def test_determinism(cls: type) -> None:
    a, b = cls("train", seed=3), cls("train", seed=3)
    for i in (0, 7, 4321):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], np.ndarray):
                np.testing.assert_array_equal(x[k], y[k])
            else:
                assert x[k] == y[k]
    # Random access: reading order does not matter.
    np.testing.assert_array_equal(a[5]["image"], cls("train", seed=3)[5]["image"])
    other_seed, test = cls("train", seed=4), cls("test", seed=3)
    for i in range(5):
        assert not np.array_equal(a[i]["image"], other_seed[i]["image"])
        assert not np.array_equal(a[i]["image"], test[i]["image"])
    # The train and test splits share no image.
    train_imgs = {a[i]["image"].tobytes() for i in range(40)}
    assert not train_imgs & {test[i]["image"].tobytes() for i in range(40)}


def test_caption_determinism() -> None:
    a, b = ShapesCaptions(seed=1), ShapesCaptions(seed=1)
    assert [a[i]["caption"] for i in range(20)] == [b[i]["caption"] for i in range(20)]


@pytest.mark.parametrize(
    ("cls", "size", "keys"),
    [
        (ShapesClassification, 32, {"image", "label"}),
        (ShapesCaptions, 32, {"image", "caption", "label"}),
        (ShapesSegmentation, 64, {"image", "mask", "label"}),
    ],
)
def test_shapes_dtypes_ranges(cls: type, size: int, keys: set[str]) -> None:
    ds = cls()
    for i in range(10):
        s = ds[i]
        assert set(s) == keys
        assert s["image"].shape == (size, size, 3) and s["image"].dtype == np.uint8
        assert s["image"].flags["C_CONTIGUOUS"]
        assert isinstance(s["label"], np.int32) and s["label"].shape == ()
        assert 0 <= s["label"] < len(ds.class_names)
        if "caption" in s:
            assert isinstance(s["caption"], str) and s["caption"]
        if "mask" in s:
            assert s["mask"].shape == (size, size) and s["mask"].dtype == np.uint8
    small = cls(image_size=16)
    assert small[0]["image"].shape == (16, 16, 3)


def test_lengths_and_index_errors() -> None:
    assert len(ShapesClassification("train")) == 50_000
    assert len(ShapesClassification("test")) == 2_000
    assert len(ShapesCaptions("test")) == 2_000
    for cls in (ShapesClassification, ShapesCaptions, ShapesSegmentation):
        ds = cls(num_examples=10)
        assert len(ds) == 10
        ds[9]
        for bad in (10, 11, -1, -10):
            with pytest.raises(IndexError):
                ds[bad]


def test_value_errors_name_the_argument() -> None:
    for cls in (ShapesClassification, ShapesCaptions, ShapesSegmentation):
        with pytest.raises(ValueError, match="split"):
            cls("validation")
    for n in (0, 1, len(SHAPES) + 1):
        with pytest.raises(ValueError, match="num_classes"):
            ShapesClassification(num_classes=n)
    max_k = len(COLORS) * len(SHAPES) - max(len(COLORS), len(SHAPES))
    ShapesCaptions(holdout_pairs=max_k)
    for k in (-1, max_k + 1):
        with pytest.raises(ValueError, match="holdout_pairs"):
            ShapesCaptions(holdout_pairs=k)
    for m in (0, 256):
        with pytest.raises(ValueError, match="max_objects"):
            ShapesSegmentation(max_objects=m)
    with pytest.raises(ValueError, match="image_size"):
        ShapesClassification(image_size=8)
    with pytest.raises(ValueError, match="two_shape_prob"):
        ShapesCaptions(two_shape_prob=1.5)


def test_num_classes_picks_first_shapes() -> None:
    ds = ShapesClassification(num_classes=4)
    assert ds.class_names == list(SHAPES[:4])
    assert {int(ds[i]["label"]) for i in range(40)} == set(range(4))


@pytest.mark.parametrize("cls", [ShapesClassification, ShapesCaptions])
def test_label_balance(cls: type) -> None:
    ds = cls("train", seed=5)
    n, k = 800, len(ds.class_names)
    counts = collections.Counter(int(ds[i]["label"]) for i in range(n))
    assert set(counts) == set(range(k))
    assert max(counts.values()) <= 2 * n / k


def test_classification_shape_area_and_contrast() -> None:
    ds = ShapesClassification(seed=2)
    for i in range(64):
        sample, ids = ds._generate(i)
        inside = ids == 1
        assert 0.08 <= inside.mean() <= 0.40
        img = sample["image"].astype(np.float64)
        gap = np.abs(img[inside].mean(0) - img[~inside].mean(0)).max()
        assert gap > 60


def test_plain_background_keeps_the_shape_and_flattens_the_rest() -> None:
    """background='plain': the same shape, colour and place as the textured image of that
    index; outside it one grey plus the ±6 pixel noise, where a texture varies far more."""
    textured, plain = ShapesClassification(seed=3), ShapesClassification(seed=3,
                                                                         background="plain")
    spreads = {"texture": [], "plain": []}
    for i in range(32):
        (a, ids_a), (b, ids_b) = textured._generate(i), plain._generate(i)
        np.testing.assert_array_equal(ids_a, ids_b)
        assert a["label"] == b["label"]
        np.testing.assert_allclose(a["image"][ids_a == 1].mean(0), b["image"][ids_b == 1].mean(0),
                                   atol=3)
        for kind, image in (("texture", a["image"]), ("plain", b["image"])):
            outside = image[ids_a == 0].astype(np.int64)
            spreads[kind].append((outside.max(0) - outside.min(0)).max())
    assert max(spreads["plain"]) <= 12
    assert min(spreads["texture"]) > 12
    with pytest.raises(ValueError, match="background"):
        ShapesClassification(background="plane")


@pytest.mark.parametrize("max_objects", [1, 2, 4])
def test_segmentation_masks_match_rendering(max_objects: int) -> None:
    ds = ShapesSegmentation(max_objects=max_objects, seed=1)
    n_ids = set()
    for i in range(40):
        s = ds[i]
        img, mask = s["image"].astype(np.float64), s["mask"]
        ids = set(np.unique(mask).tolist()) - {0}
        n_ids.add(len(ids))
        assert 1 in ids and len(ids) <= max_objects and max(ids) <= max_objects
        obj = mask == 1
        assert 0.03 <= obj.mean() <= 0.50
        # Object 1's pixels are one (jittered, noisy) palette colour.
        nearest = np.abs(PALETTE - img[obj].mean(0)).max(1).argmin()
        assert np.abs(img[obj] - PALETTE[nearest]).max() <= 40
        # The background resembles no palette colour.
        bg = img[mask == 0]
        assert (np.abs(bg[:, None, :] - PALETTE[None]).max(-1) > 25).all()
    assert max(n_ids) == max_objects


def test_captions_name_the_label_class() -> None:
    ds = ShapesCaptions(seed=4, two_shape_prob=0.5)
    phrasings, n_two = set(), 0
    for i in range(200):
        s = ds[i]
        cap, name = s["caption"], ds.class_names[int(s["label"])]
        color, shape = name.split()
        assert color in COLORS and shape in SHAPES
        pairs = _pairs(cap)
        assert pairs[0] == (color, shape), cap
        assert len(pairs) in (1, 2)
        if len(pairs) == 2:
            n_two += 1
            assert re.search(r"\b(small|large)\b.*\b(small|large)\b", cap)
        phrasings.add(cap.replace(name, "X").split("X")[0][:6])
    assert 60 < n_two < 140
    assert len(phrasings) >= 3


def test_caption_relations_match_positions() -> None:
    ds = ShapesCaptions(seed=6, two_shape_prob=1.0)
    relations = collections.Counter()
    for i in range(120):
        sample, ids = ds._generate(i)
        lay = ds._layout(i)
        assert lay.caption == sample["caption"] and lay.label == sample["label"]
        rel = RELATION_RE.findall(sample["caption"])
        assert rel == [lay.relation]
        relations[lay.relation] += 1
        (y1, x1), (y2, x2) = (np.argwhere(ids == k).mean(0) for k in (1, 2))
        dx, dy = x2 - x1, y2 - y1  # from the main shape to the second one
        along, across = {"left of": (dx, dy), "right of": (-dx, dy)}.get(
            lay.relation, (dy, dx) if lay.relation == "above" else (-dy, dx)
        )
        assert along > 0 and abs(across) < along, (sample["caption"], dx, dy)
        # Their boxes do not overlap along the relation's axis.
        b1, b2 = lay.objects[0].box, lay.objects[1].box
        axis = 0 if lay.relation in ("left of", "right of") else 1
        first, second = (b1, b2) if lay.relation in ("left of", "above") else (b2, b1)
        assert first[axis + 2] <= second[axis] + 1e-6
        # Size words agree with the areas drawn.
        a1, a2 = (ids == 1).sum(), (ids == 2).sum()
        assert (a1 > a2) == (lay.sizes == ("large", "small"))
    assert set(relations) == {"left of", "right of", "above", "below"}


def test_heldout_pairs() -> None:
    k = 12
    train = ShapesCaptions("train", seed=7, holdout_pairs=k, two_shape_prob=0.5)
    test = ShapesCaptions("test", seed=7, holdout_pairs=k)
    assert train.heldout_class_ids == test.heldout_class_ids
    assert train.heldout_class_ids == sorted(set(train.heldout_class_ids))
    assert len(train.heldout_class_ids) == k
    assert ShapesCaptions(seed=8, holdout_pairs=k).heldout_class_ids != train.heldout_class_ids
    held = {tuple(train.class_names[c].split()) for c in train.heldout_class_ids}
    seen = set()
    for i in range(2000):
        # The layout alone gives the caption (the same as train[i]["caption"]), without rendering.
        pairs = _pairs(train._layout(i).caption)
        assert not held & set(pairs)
        seen.update(pairs)
    assert {c for c, _ in seen} == set(COLORS)
    assert {s for _, s in seen} == set(SHAPES)
    labels = set()
    for i in range(200):
        s = test[i]
        assert int(s["label"]) in test.heldout_class_ids
        assert len(_pairs(s["caption"])) == 1
        labels.add(int(s["label"]))
    assert labels == set(test.heldout_class_ids)


def test_heldout_pairs_at_the_limit_keep_every_colour_and_shape() -> None:
    k = len(COLORS) * len(SHAPES) - max(len(COLORS), len(SHAPES))
    for seed in range(3):
        ds = ShapesCaptions(seed=seed, holdout_pairs=k)
        kept = [ds.class_names[c].split() for c in range(len(ds.class_names))]
        kept = [p for c, p in enumerate(kept) if c not in ds.heldout_class_ids]
        assert {c for c, _ in kept} == set(COLORS) and {s for _, s in kept} == set(SHAPES)


def test_pickle_round_trip() -> None:
    ds = ShapesCaptions("train", seed=2, holdout_pairs=5)
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy[11]["image"], ds[11]["image"])
    assert copy[11]["caption"] == ds[11]["caption"]
