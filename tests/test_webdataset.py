"""Tests of crate_jax.data.webdataset: patterns, sharding over processes, bad data, exact resume."""

import dataclasses
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from crate_jax.data.webdataset import (
    ReaderStats,
    WebDatasetReader,
    expand_pattern,
    write_shards,
)

NUM_SAMPLES = 320
PER_SHARD = 40
GARBAGE = {5, 47, 130, 201, 290}  # random bytes instead of a JPEG
CUT_JPEG = {12, 88, 170, 255}  # JPEG cut short
NO_CAPTION = {20, 99, 140, 230, 300, 311}
EMPTY_CAPTION = {33, 150, 262}
PNG = {3, 77, 160}
TRUNCATED_SHARD = 5  # shard file cut in the middle of the image of LOST_FROM
LOST_FROM = 220


def _image(rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, fmt)
    return buf.getvalue()


def _key(i: int) -> str:
    return f"{i:09d}"


@dataclasses.dataclass
class Data:
    shards: list[str]  # as given to the readers: 8 real shards and one missing path
    missing: str
    truncated: str
    samples: dict[str, dict[str, Any]]  # every written sample by key
    good: set[str]
    bad_images: int
    missing_captions: int
    empty_captions: int


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(NUM_SAMPLES):
        ext = "png" if i in PNG else "jpg"
        image = _image(rng, "PNG" if ext == "png" else "JPEG")
        if i in GARBAGE:
            image = rng.integers(0, 256, 300, dtype=np.uint8).tobytes()
        if i in CUT_JPEG:
            # A noisy JPEG cut in its scan data: the header still parses, decoding fails.
            noise = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(noise).save(buf, "JPEG")
            image = buf.getvalue()[: len(buf.getvalue()) * 2 // 3]
            assert Image.open(io.BytesIO(image)).size == (24, 24)
        caption: str | None = f"a photo number {i}"
        if i in NO_CAPTION:
            caption = None
        if i in EMPTY_CAPTION:
            caption = "  \n\t"
        meta = {"i": i, "url": f"http://example.com/{i}.jpg"} if i % 7 else None
        samples.append({"key": _key(i), "image": image, "caption": caption, "json": meta,
                        "ext": ext})
    paths = write_shards(root, samples, PER_SHARD)
    assert len(paths) == NUM_SAMPLES // PER_SHARD

    # Cut one shard in the middle of the image data of sample LOST_FROM.
    truncated = paths[TRUNCATED_SHARD]
    raw = Path(truncated).read_bytes()
    with tarfile.open(truncated) as tf:
        member = tf.getmember(f"{_key(LOST_FROM)}.jpg")
    Path(truncated).write_bytes(raw[: member.offset_data + member.size // 2])

    missing = str(root / "missing.tar")
    shards = [*paths[:3], missing, *paths[3:]]
    readable = [i for i in range(NUM_SAMPLES)
                if not LOST_FROM <= i < (TRUNCATED_SHARD + 1) * PER_SHARD]
    bad = GARBAGE | CUT_JPEG | NO_CAPTION | EMPTY_CAPTION
    return Data(
        shards=shards, missing=missing, truncated=truncated,
        samples={s["key"]: s for s in samples},
        good={_key(i) for i in readable if i not in bad},
        bad_images=sum(i in GARBAGE | CUT_JPEG for i in readable),
        missing_captions=sum(i in NO_CAPTION for i in readable),
        empty_captions=sum(i in EMPTY_CAPTION for i in readable),
    )


def _reader(data: Data, **kwargs: Any) -> WebDatasetReader:
    kwargs = {"process_index": 0, "process_count": 2, **kwargs}
    return WebDatasetReader(data.shards, **kwargs)


def _take(reader: WebDatasetReader, n: int) -> list[dict[str, Any]]:
    return [next(reader) for _ in range(n)]


def _keys(samples: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["shard"], s["key"]) for s in samples]


def _epoch_len(data: Data, reader: WebDatasetReader) -> int:
    return sum(_shard_of(data, k) in reader.local_shards for k in data.good)


def _shard_of(data: Data, key: str) -> str:
    real = [s for s in data.shards if s != data.missing]
    return real[int(key) // PER_SHARD]


# --------------------------------------------------------------------------------------------


def test_expand_pattern() -> None:
    shards = expand_pattern("/data/{000..010}.tar")
    assert len(shards) == 11 and shards[0] == "/data/000.tar" and shards[-1] == "/data/010.tar"
    assert expand_pattern("/d/{00000..12799}.tar")[-1] == "/d/12799.tar"
    assert expand_pattern("{0..10}")[-2:] == ["9", "10"]  # no leading zero: no padding
    assert expand_pattern("{a,b}.tar") == ["a.tar", "b.tar"]
    assert expand_pattern("x{0..1}_{a,b}.tar") == ["x0_a.tar", "x0_b.tar", "x1_a.tar", "x1_b.tar"]
    assert expand_pattern("{a,b{1..2}}") == ["a", "b1", "b2"]
    assert expand_pattern("{0..4..2}") == ["0", "2", "4"]
    assert expand_pattern("{3..1}") == ["3", "2", "1"]
    assert expand_pattern("gs://bucket/dc/{00..02}.tar") == [
        "gs://bucket/dc/00.tar", "gs://bucket/dc/01.tar", "gs://bucket/dc/02.tar"]
    assert expand_pattern("a.tar,b.tar c.tar\n{d,e}.tar") == [
        "a.tar", "b.tar", "c.tar", "d.tar", "e.tar"]
    assert expand_pattern("/plain/path.tar") == ["/plain/path.tar"]
    for bad in ["/d/{000..010.tar", "/d/x}.tar", "/d/{}.tar", "/d/{abc}.tar", "{1..}", "{0..4..0}",
                "", " , "]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            expand_pattern(bad)


def test_write_shards_layout(tmp_path: Path) -> None:
    samples = [
        {"key": "a", "image": b"IMG", "caption": "cap", "json": {"x": 1}},
        {"key": "b", "image": b"PNG", "caption": None, "ext": "png"},
        {"key": "c", "image": b"IMG", "caption": "third"},
    ]
    paths = write_shards(tmp_path / "out", samples, 2, prefix="train-")
    assert [Path(p).name for p in paths] == ["train-00000.tar", "train-00001.tar"]
    with tarfile.open(paths[0]) as tf:
        assert tf.getnames() == ["a.jpg", "a.txt", "a.json", "b.png"]
        assert json.loads(tf.extractfile("a.json").read()) == {"x": 1}  # type: ignore[union-attr]
    # Reproducible bytes: same input, same files.
    again = write_shards(tmp_path / "again", samples, 2, prefix="train-")
    assert Path(paths[0]).read_bytes() == Path(again[0]).read_bytes()


def test_reader_process_checks(data: Data) -> None:
    with pytest.raises(ValueError, match=r"2 shards for 3 processes"):
        WebDatasetReader(data.shards[:2], process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        WebDatasetReader(data.shards, process_index=2, process_count=2)
    reader = WebDatasetReader(data.shards)  # jax decides: one process here
    assert reader.process_count == 1 and reader.local_shards == data.shards


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_two_processes_cover_good_samples_once(data: Data, shuffle_buffer: int) -> None:
    # We notice the end of epoch 0 by stepping into epoch 1. With no shuffle buffer that reads
    # one sample of epoch 1, and counts no bad data as long as its first shard is readable (the
    # first sample of every shard is good). Pick a seed where it is.
    def clean_start(seed: int, p: int) -> bool:
        reader = _reader(data, seed=seed, process_index=p)
        return reader.local_shards[reader.epoch_order(1)[0]] != data.missing

    seed = next(s for s in range(100) if clean_start(s, 0) and clean_start(s, 1))
    seen: list[list[str]] = []
    total = ReaderStats()
    for p in range(2):
        reader = _reader(data, seed=seed, process_index=p, shuffle_buffer=shuffle_buffer)
        keys = []
        while True:
            sample = next(reader)
            if reader.epoch != 0:
                break
            keys.append(sample["key"])
            original = data.samples[sample["key"]]
            assert sample["image"] == original["image"]
            assert sample["caption"] == original["caption"]
            assert sample["json"] == original["json"]
            assert sample["shard"] == _shard_of(data, sample["key"])
            assert sample["index"] == int(sample["key"]) % PER_SHARD
            assert sample["shard"] in reader.local_shards
        seen.append(keys)
        assert len(keys) == _epoch_len(data, reader)
        stats = reader.stats
        for field in ("bad_images", "missing_captions", "empty_captions", "truncated_shards",
                      "unreadable_shards"):
            setattr(total, field, getattr(total, field) + getattr(stats, field))
        total.samples += stats.samples - 1  # the epoch-1 sample that ended the loop
    assert len(seen[0]) == len(set(seen[0])) and len(seen[1]) == len(set(seen[1]))
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == data.good
    if shuffle_buffer:
        return  # stepping into epoch 1 read up to 16 of its samples: counters are not exact
    assert total.samples == len(data.good)
    assert total.bad_images == data.bad_images == 9
    assert total.missing_captions == data.missing_captions == 5
    assert total.empty_captions == data.empty_captions == 3
    assert total.truncated_shards == 1
    assert total.unreadable_shards == 1


def test_stats_bad_shards_and_metrics(data: Data) -> None:
    reader = _reader(data, process_index=1)
    _take(reader, 200)
    assert data.missing in reader.stats.bad_shards
    metrics = reader.stats.as_metrics()
    assert metrics["data/unreadable_shards"] >= 1
    assert 0 < metrics["data/bad_fraction"] < 0.5
    assert set(metrics) >= {"data/samples", "data/bad_images", "data/missing_captions",
                            "data/empty_captions", "data/truncated_shards", "data/bad_fraction"}
    stats = ReaderStats()
    for i in range(150):
        stats.note_bad_shard(f"s{i}")
    stats.note_bad_shard("s60")
    assert len(stats.bad_shards) == 100 and stats.bad_shards[-1] == "s60"


@pytest.mark.parametrize("process_index", [0, 1])
@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_exact_resume(data: Data, shuffle_buffer: int, process_index: int) -> None:
    # A seed where process 1 ends epoch 0 with the missing shard: a checkpoint taken after the
    # epoch's reading has finished must not count it again.
    def ends_with_missing(seed: int) -> bool:
        reader = _reader(data, seed=seed, process_index=1)
        return reader.local_shards[reader.epoch_order(0)[-1]] == data.missing

    seed = next(s for s in range(100) if ends_with_missing(s))
    kwargs = {"seed": seed, "shuffle_buffer": shuffle_buffer, "process_index": process_index}
    epoch_len = _epoch_len(data, _reader(data, **kwargs))
    m = 40
    for n in (0, 1, 37, epoch_len - 5, epoch_len, epoch_len + 3):
        reader = _reader(data, **kwargs)
        _take(reader, n)
        state = json.loads(json.dumps(reader.get_state()))
        expected = _keys(_take(reader, 2 * m))

        resumed = _reader(data, **kwargs)
        resumed.set_state(state)
        got = _take(resumed, m)
        assert _keys(got) == expected[:m], f"resume after {n} samples"
        # Resume again from the resumed reader's state: still the same stream.
        again = _reader(data, **kwargs)
        again.set_state(resumed.get_state())
        got2 = _take(again, m)
        assert _keys(got2) == expected[m:], f"second resume after {n + m} samples"
        # Counters carry over without double counting the replayed part.
        assert again.stats == reader.stats
        assert got[0]["image"] == data.samples[got[0]["key"]]["image"]


def test_resume_state_is_small_and_json(data: Data) -> None:
    reader = _reader(data, shuffle_buffer=16)
    _take(reader, 50)
    state = reader.get_state()
    assert json.loads(json.dumps(state)) == state
    assert {"epoch", "shard_position", "offset"} <= set(state)
    assert len(json.dumps(state)) < 2000
    other = _reader(data, shuffle_buffer=8)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        other.set_state(state)


class _Stream(io.RawIOBase):
    """A non-seekable file object over bytes, like a pipe."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), len(self._data) - self._pos, 1000)  # short reads on purpose
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


SEEKS: list[int] = []


class _Recorder(io.BytesIO):
    """A file that records absolute seeks in SEEKS."""

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            SEEKS.append(pos)
        return super().seek(pos, whence)


def test_resume_with_and_without_seek(data: Data) -> None:
    def stream_open(path: str) -> io.RawIOBase:
        return _Stream(Path(path).read_bytes())

    def recorder_open(path: str) -> io.BytesIO:
        return _Recorder(Path(path).read_bytes())

    reader = _reader(data, seed=1)
    _take(reader, 23)
    state = reader.get_state()
    expected = _keys(_take(reader, 60))
    assert state["offset"] > 0 and state["byte_offset"] > 0
    for open_fn in (stream_open, recorder_open):
        resumed = _reader(data, seed=1, open_fn=open_fn)
        resumed.set_state(state)
        assert _keys(_take(resumed, 60)) == expected
    assert SEEKS[0] == state["byte_offset"]  # went straight to the saved offset
    # A non-seekable stream reads the same epoch as a file.
    streamed = _reader(data, seed=1, open_fn=stream_open)
    fresh = _reader(data, seed=1)
    assert _keys(_take(streamed, 150)) == _keys(_take(fresh, 150))


def test_shard_order_and_seeds(data: Data) -> None:
    reader = _reader(data, seed=7)
    orders = [reader.epoch_order(e) for e in range(4)]
    assert orders[0] == np.random.default_rng([7, 0, 0]).permutation(5).tolist()
    assert any(o != orders[0] for o in orders[1:])

    # With no shuffle buffer, samples follow the shard order of each epoch.
    epoch_len = _epoch_len(data, reader)
    for epoch in range(2):
        shards = [s["shard"] for s in _take(reader, epoch_len)]
        visited = list(dict.fromkeys(shards))
        expected = [reader.local_shards[i] for i in orders[epoch]]
        assert visited == [s for s in expected if s != data.missing]

    same = _reader(data, seed=7)
    other = _reader(data, seed=8)
    first = _keys(_take(_reader(data, seed=7), 100))
    assert _keys(_take(same, 100)) == first
    assert _keys(_take(other, 100)) != first


def test_shuffle_buffer_is_bounded_permutation(data: Data) -> None:
    plain = _reader(data, seed=2)
    epoch_len = _epoch_len(data, plain)
    base = _keys(_take(plain, epoch_len))
    shuffled = _keys(_take(_reader(data, seed=2, shuffle_buffer=16), epoch_len))
    assert sorted(shuffled) == sorted(base) and shuffled != base
    position = {k: i for i, k in enumerate(base)}
    assert max(abs(position[k] - i) for i, k in enumerate(shuffled)) < 16


def _garbage_shards(root: Path, n_shards: int, per_shard: int, good_every: int) -> list[str]:
    rng = np.random.default_rng(1)
    samples = []
    for i in range(n_shards * per_shard):
        good = i % good_every == 0
        image = _image(rng) if good else rng.integers(0, 256, 100, dtype=np.uint8).tobytes()
        samples.append({"key": _key(i), "image": image, "caption": f"c{i}"})
    return write_shards(root, samples, per_shard, prefix="junk-")


def test_bad_fraction_raises_naming_shards(tmp_path: Path) -> None:
    paths = _garbage_shards(tmp_path, 3, 50, good_every=10)
    reader = WebDatasetReader(paths, process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match=r"junk-0000\d\.tar") as info:
        _take(reader, 100)
    assert "bad_images=" in str(info.value) and "max_bad_fraction" in str(info.value)
    with pytest.raises(RuntimeError):  # and it stays failed
        next(reader)
    # A looser threshold reads the same shards without complaint.
    lenient = WebDatasetReader(paths, process_index=0, process_count=1, max_bad_fraction=0.95)
    assert len(_take(lenient, 30)) == 30
    assert lenient.stats.bad_images > 0


def test_no_good_sample_in_epoch_raises(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    paths = write_shards(tmp_path / "allbad", [
        {"key": _key(i), "image": rng.bytes(50), "caption": "c"} for i in range(20)], 10)
    with pytest.raises(RuntimeError, match=r"no good sample.*00000\.tar"):
        next(WebDatasetReader(paths, process_index=0, process_count=1))
    missing = [str(tmp_path / f"nope{i}.tar") for i in range(3)]
    with pytest.raises(RuntimeError, match=r"nope0\.tar"):
        next(WebDatasetReader(missing, process_index=0, process_count=1))


def test_unreadable_and_odd_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    good = write_shards(tmp_path / "good", [
        {"key": f"dir/ключ-{'x' * 120}-{i}", "image": _image(rng), "caption": f"c{i}"}
        for i in range(4)], 4)
    not_tar = tmp_path / "not_a_tar.tar"
    not_tar.write_bytes(rng.bytes(3000))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    # Extra members: a directory, a hidden file, an unknown extension.
    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w") as tf:
        members = [("d", None), ("d/.hidden.jpg", b"x"), ("d/1.jpg", _image(rng)),
                   ("d/1.txt", b"hello"), ("d/1.seg.png", b"mask"), ("d/2.parquet", b"")]
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    shards = [*good, str(not_tar), str(empty), str(odd)]
    reader = WebDatasetReader(shards, process_index=0, process_count=1)
    samples = _take(reader, 5)
    keys = {s["key"] for s in samples}
    assert keys == {f"dir/ключ-{'x' * 120}-{i}" for i in range(4)} | {"d/1"}
    assert next(reader)["key"] in keys and reader.epoch == 1
    # Both bad shards were met in epoch 0, and again in epoch 1 if it visits them first.
    order = [shards[i] for i in reader.epoch_order(1)]
    first_good = min(order.index(s) for s in (good[0], str(odd)))
    assert reader.stats.unreadable_shards == 2 + first_good
    assert reader.stats.truncated_shards == 0 and reader.stats.bad_samples == 0
    assert str(not_tar) in reader.stats.bad_shards and str(empty) in reader.stats.bad_shards
