"""Webdataset shards converted to ArrayRecord (crate_jax.data.wds.to_array_record), and the
grain path that trains on them (data.source='array_record')."""

import io
import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest
from image_utils import photo

from crate_jax.data import image_text
from crate_jax.data import tokenizer as tokenizers
from crate_jax.data.wds import to_array_record
from crate_jax.data.webdataset import write_shards

BAD_IMAGE, NO_CAPTION = {5, 17}, {9}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards of 8 captioned JPEGs (two with corrupt images, one without a caption), plus one
    shard cut short inside its sample 28 and a path that does not exist."""
    root = tmp_path_factory.mktemp("pairs")
    samples = []
    for i in range(32):
        buffer = io.BytesIO()
        photo(30 + i % 9, 28 + i % 4, seed=i).save(buffer, format="JPEG", quality=90)
        image = buffer.getvalue()
        if i in BAD_IMAGE:
            image = image[:40] + bytes(200)
        samples.append({"key": f"{i:05d}", "image": image,
                        "caption": None if i in NO_CAPTION else f"a photo of thing {i}",
                        "json": {"n": i}})
    paths = write_shards(root, samples, 8)
    with tarfile.open(paths[3]) as tf:
        cut = tf.getmember("00028.jpg").offset_data + 10
    raw = open(paths[3], "rb").read()
    open(paths[3], "wb").write(raw[:cut])
    return [*paths, str(root / "missing.tar")], samples


def _good(samples):
    return {s["key"]: s for s in samples if int(s["key"]) not in BAD_IMAGE | NO_CAPTION
            and int(s["key"]) < 28}


def test_conversion_keeps_every_good_sample_once_byte_for_byte(shards, tmp_path):
    paths, samples = shards
    out = str(tmp_path / "ar")
    report = to_array_record.convert(paths, out, per_file=10)
    good = _good(samples)
    assert report["records"] == len(good) == 25
    names = sorted(os.listdir(out))
    assert names == ["conversion.json", "data-00000-of-00003.array_record",
                     "data-00001-of-00003.array_record", "data-00002-of-00003.array_record"]
    assert json.load(open(os.path.join(out, "conversion.json")))["records"] == 25
    assert report["data/bad_images"] == 2 and report["data/missing_captions"] == 1
    assert report["data/truncated_shards"] == 1 and report["data/unreadable_shards"] == 1
    records = to_array_record.Records(os.path.join(out, "*.array_record"))
    assert len(records) == 25
    seen = {}
    for i in reversed(range(len(records))):  # random access, any order
        record = records[i]
        seen[record["key"]] = record
    assert seen.keys() == good.keys()
    for key, record in seen.items():
        assert record["image"] == good[key]["image"] and record["caption"] == good[key]["caption"]


def test_conversion_refuses_a_used_folder_and_leaves_nothing_when_it_fails(shards, tmp_path):
    paths, _ = shards
    out = tmp_path / "ar"
    to_array_record.convert(paths[:1], str(out))
    with pytest.raises(FileExistsError, match="already holds"):
        to_array_record.convert(paths[:1], str(out))
    empty = tmp_path / "none"
    with pytest.raises(RuntimeError, match="no good sample"):
        to_array_record.convert([paths[-1]], str(empty))  # only the missing shard
    assert os.listdir(empty) == []
    with pytest.raises(ValueError, match="per_file"):
        to_array_record.convert(paths, str(tmp_path / "x"), per_file=0)


def test_a_conversion_that_breaks_midway_removes_its_files(shards, tmp_path, monkeypatch):
    paths, _ = shards
    real, calls = to_array_record.encode, []

    def failing(sample):
        calls.append(sample["key"])
        if len(calls) == 12:  # two files of 5 written, the third open
            raise OSError("disk full")
        return real(sample)

    monkeypatch.setattr(to_array_record, "encode", failing)
    out = tmp_path / "broken"
    with pytest.raises(OSError, match="disk full"):
        to_array_record.convert(paths, str(out), per_file=5)
    assert os.listdir(out) == []
    # what a SIGKILLed conversion leaves is hidden, and the next run into OUT removes it
    (out / ".part-00007.array_record.tmp").write_bytes(b"half")
    monkeypatch.setattr(to_array_record, "encode", real)
    to_array_record.convert(paths, str(out), per_file=10)
    assert not [n for n in os.listdir(out) if n.startswith(".part-")]


def test_the_command_line_prints_what_it_did(shards, tmp_path, capsys):
    paths, _ = shards
    to_array_record.main([f"--shards={paths[0]}", f"--out={tmp_path / 'cli'}",
                          "--per_file=4"])
    out = capsys.readouterr().out
    assert "7 records in 2 files" in out and "1 bad samples" in out


def _config(paths, **overrides):
    return ml_collections.ConfigDict({**dict(
        source="array_record", paths=paths, tokenizer="builtin:shapes_captions_bert",
        image_size=16, context_length=12, crop_area=(0.4, 1.0), flip=True, num_workers=0),
        **overrides})


def test_training_pairs_cover_the_set_each_epoch_and_resume_exactly(shards, tmp_path):
    paths, samples = shards
    out = str(tmp_path / "ar")
    to_array_record.convert(paths, out, per_file=7)
    data = _config(os.path.join(out, "*.array_record"))
    batches = image_text.train_iterator(data, batch_size=5, seed=2)
    epoch = [next(batches) for _ in range(5)]  # 25 pairs: one epoch
    assert all(b["image"].shape == (5, 16, 16, 3) and b["image"].dtype == np.uint8
               for b in epoch)
    tok = image_text.tokenizer_for(data)
    want = tokenizers.tokenize(tok, [s["caption"] for s in _good(samples).values()], 12)
    got = np.concatenate([b["tokens"] for b in epoch])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    state = batches.get_state()
    after = [next(batches) for _ in range(3)]
    again = image_text.train_iterator(data, batch_size=5, seed=2)
    again.set_state(json.loads(json.dumps(state)))
    for a, b in zip(after, [next(again) for _ in range(3)], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.paths=.*to_array_record"):
        image_text.train_iterator(_config(str(tmp_path / "*.array_record")), batch_size=4,
                                  seed=0)
    with pytest.raises(ValueError, match=r"data\.paths=.*gcsfuse"):
        image_text.train_iterator(_config("gs://bucket/ar/*.array_record"), batch_size=4,
                                  seed=0)
