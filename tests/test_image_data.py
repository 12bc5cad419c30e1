"""Classification input: image folders, the train and eval transforms (TFDS is tested on a
real prepared dataset in test_tfds_arrayrecord.py), and the grain pipeline's determinism,
host sharding and exact resume."""

import io

import ml_collections
import numpy as np
import pytest
from PIL import Image

from crate_jax.data import images, pipeline
from crate_jax.data.synthetic import ShapesClassification


def _data(**kw):
    base = dict(source="synthetic_shapes", image_size=16, num_classes=4,
                num_train_examples=64, num_eval_examples=20, train_split="train",
                eval_split="test", train_augment="inception_crop")
    return ml_collections.ConfigDict({**base, **kw})


def _batches(it, n):
    return [next(it) for _ in range(n)]


def test_pipeline_deterministic_sharded_and_resumable():
    data = _data()
    source = ShapesClassification("train", num_examples=64, image_size=16, num_classes=4)
    make = lambda process: pipeline.train_iterator(
        source, batch_size=8, seed=3, transform=images.train_transform(data), process=process)
    a, b = _batches(make((0, 1)), 3), _batches(make((0, 1)), 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    # two hosts read disjoint halves of one epoch, and global batch k (host 0's k-th batch +
    # host 1's k-th batch) holds the same examples as the one-host batch k of twice the size
    one_host = pipeline.train_iterator(source, batch_size=16, seed=3,
                                       transform=images.train_transform(data), process=(0, 1))
    host0, host1 = _batches(make((0, 2)), 4), _batches(make((1, 2)), 4)
    for a, b, whole in zip(host0, host1, _batches(one_host, 4), strict=True):
        np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), whole["image"])
    # resume mid-epoch and across the epoch boundary
    it = make((0, 1))
    _batches(it, 5)
    state = it.get_state()
    want = _batches(it, 6)
    resumed = make((0, 1))
    resumed.set_state(state)
    for x, y in zip(want, _batches(resumed, 6), strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    # a new epoch is a new order
    first_epoch = [x["label"] for x in _batches(make((0, 1)), 16)]
    assert not all(np.array_equal(p, q) for p, q in zip(first_epoch[:8], first_epoch[8:],
                                                          strict=True))


def test_transforms():
    rng = np.random.default_rng(0)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    example = {"image": jpeg.getvalue(), "label": 3}
    out = images.train_transform(_data(randaugment=(2, 9), color_jitter=0.4))(example, rng)
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.uint8
    out = images.eval_transform(_data())(example)
    assert out["image"].shape == (16, 16, 3) and out["label"] == 3
    with pytest.raises(ValueError, match="train_augment"):
        images.train_transform(_data(train_augment="mosaic"))
    # inception crop: area and aspect ratio of the box stay in range
    image = Image.fromarray(np.zeros((100, 200, 3), np.uint8))
    for seed in range(20):
        assert images.inception_crop(image, np.random.default_rng(seed), 32).size == (32, 32)


def test_image_folder(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                path = tmp_path / split / name / f"{i}.jpg"
                Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(path)
    source = images.ImageFolder(str(tmp_path), "train")
    assert source.class_names == ["cat", "dog"] and len(source) == 6
    assert source[5]["label"] == 1 and isinstance(source[5]["image"], bytes)
    with pytest.raises(FileNotFoundError, match=r"data\.data_dir"):
        images.ImageFolder(str(tmp_path), "test")
