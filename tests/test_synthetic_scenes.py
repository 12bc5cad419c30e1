"""Tests of crate_jax.data.synthetic_scenes: the masks against the painted pixels and the
geometry, occlusion order, object counts and sizes, the label, determinism, validation."""

import ml_collections
import numpy as np
import pytest

from crate_jax import analyze
from crate_jax.data.images import image_source
from crate_jax.data.synthetic_scenes import (
    MAIN_AREA,
    MAIN_MIN_VISIBLE,
    MIN_VISIBLE,
    OTHER_AREA,
    ShapesScenes,
)


def _chroma(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.int32)
    return x.max(-1) - x.min(-1)


def test_mask_is_exactly_where_objects_were_painted():
    """Without noise: every object pixel carries that object's texture, every object pixel
    is saturated and every background pixel (textured ground and grey clutter) is not."""
    ds = ShapesScenes("train", image_size=64, seed=2, noise=False)
    for i in range(30):
        sample, lay = ds[i], ds.layout(i)
        image, mask = sample["image"], sample["mask"]
        assert mask.dtype == np.uint8 and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= set(range(len(lay.objects) + 1))
        for k, obj in enumerate(lay.objects, start=1):
            rows, cols = np.nonzero(mask == k)
            assert len(rows) > 0
            np.testing.assert_array_equal(image[rows, cols], obj.paint(rows, cols))
        chroma = _chroma(image)
        assert chroma[mask > 0].min() >= 60, i
        assert chroma[mask == 0].max() <= 45, i


def test_occlusion_order_and_visibility():
    """The mask is the objects' shapes painted in drawing order (later on top); every object
    keeps half of its pixels, the labelled one 80 %, and it has the most visible pixels."""
    ds = ShapesScenes("test", image_size=64, seed=5)
    overlapping = 0
    for i in range(60):
        sample, lay = ds[i], ds.layout(i)
        full = [obj.mask(64) for obj in lay.objects]
        want = np.zeros((64, 64), np.uint8)
        for k, m in enumerate(full, start=1):
            want[m] = k
        np.testing.assert_array_equal(sample["mask"], want)
        visible = np.array([(sample["mask"] == k).sum() for k in range(1, len(full) + 1)])
        sizes = np.array([m.sum() for m in full])
        overlapping += int((visible < sizes).any())
        need = np.full(len(full), MIN_VISIBLE)
        need[lay.main] = MAIN_MIN_VISIBLE
        assert (visible >= need * sizes).all(), i
        assert int(np.argmax(visible)) == lay.main
        assert sample["label"] == lay.objects[lay.main].shape
    assert overlapping >= 5  # occlusion does happen


def test_object_geometry_against_explicit_formulas():
    ds = ShapesScenes("train", image_size=64, seed=0)
    c = np.arange(64) + 0.5
    x, y = np.meshgrid(c, c)
    seen = set()
    for i in range(80):
        for obj in ds.layout(i).objects:
            u, v = (x - obj.cx) / obj.r, (y - obj.cy) / obj.r
            if obj.shape == 0:  # circle
                want = u * u + v * v <= 1
            elif obj.shape == 1:  # square
                want = (np.abs(u) <= 1) & (np.abs(v) <= 1)
            elif obj.shape == 5:  # diamond
                want = np.abs(u) + np.abs(v) <= 1
            else:
                continue
            seen.add(obj.shape)
            assert (obj.mask(64) != want).sum() <= 2  # float32 rounding on the boundary
    assert seen == {0, 1, 5}


def test_counts_sizes_and_colours():
    ds = ShapesScenes("train", image_size=64, min_objects=2, max_objects=5, seed=1)
    counts = []
    for i in range(150):
        lay = ds.layout(i)
        n = len(lay.objects)
        counts.append(n)
        assert 2 <= n <= 5
        assert len({o.color for o in lay.objects}) == n  # distinct colours
        areas = np.array([o.mask(64).sum() for o in lay.objects]) / 64 ** 2
        main = areas[lay.main]
        assert MAIN_AREA[0] * 0.85 <= main <= MAIN_AREA[1] * 1.15
        others = np.delete(areas, lay.main)
        assert (others <= OTHER_AREA[1] * main * 1.3).all()
    assert set(counts) == {2, 3, 4, 5}


def test_labels_balanced_and_deterministic():
    ds = ShapesScenes("train", num_classes=6, seed=3)
    labels = [int(ds[i]["label"]) for i in range(36)]
    for b in range(6):
        assert sorted(labels[6 * b:6 * b + 6]) == list(range(6))
    again = ShapesScenes("train", num_classes=6, seed=3)
    for i in (0, 7, 31):
        for key in ("image", "mask"):
            np.testing.assert_array_equal(ds[i][key], again[i][key])
    other, test = ShapesScenes("train", num_classes=6, seed=4), ShapesScenes("test", seed=3)
    for i in range(4):
        assert not np.array_equal(ds[i]["image"], other[i]["image"])
        assert not np.array_equal(ds[i]["image"], test[i]["image"])
    big = ShapesScenes("train", image_size=128, seed=3)[0]
    assert big["image"].shape == (128, 128, 3) and big["mask"].shape == (128, 128)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(image_size=16), "image_size"), (dict(min_objects=4, max_objects=3), "min_objects"),
    (dict(max_objects=9), "max_objects"), (dict(num_classes=1), "num_classes"),
    (dict(split="val"), "split"), (dict(seed=-1), "seed")])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShapesScenes(**kwargs)
    with pytest.raises(IndexError):
        ShapesScenes(num_examples=3)[3]


def test_registered_as_training_source_and_analyze_data():
    data = ml_collections.ConfigDict(dict(source="synthetic_scenes", image_size=32,
                                          num_classes=4, num_eval_examples=5, max_objects=3))
    source = image_source(data, "test")
    assert isinstance(source, ShapesScenes) and len(source) == 5
    assert source.max_objects == 3 and source.num_classes == 4
    loaded = analyze.load_images("synthetic_scenes", 32, 3)
    assert loaded["image"].shape == (3, 32, 32, 3) and loaded["mask"].shape == (3, 32, 32)
    np.testing.assert_array_equal(loaded["mask"][1], ShapesScenes("test", image_size=32)[1]
                                  ["mask"])
