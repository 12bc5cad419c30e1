"""Several shards at once (interleave > 1), the byte-bounded shuffle buffer, read-ahead, and
states written before either existed."""

import collections
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from crate_jax.data.wds.readahead import ReadAhead
from crate_jax.data.wds.shuffle import ShuffleBuffer, delays
from crate_jax.data.webdataset import WebDatasetReader, shard_order, write_shards

SIZES = (8, 13, 5, 11, 9, 7, 12)
NO_CAPTION = {3, 17, 29, 44, 58}  # bad samples, by global number
LAST_BAD = 40  # the last sample of shard 3 (numbers 26..36) is good; 40 ends nothing
TRUNCATED, CUT_AT = 4, 41  # shard 4 (numbers 37..45) is cut inside sample 41


def _number(key: str) -> int:
    return int(key)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """7 shards of different sizes with bad samples (no caption), one cut short, and one path
    that does not exist; per shard the good keys in file order and whether the last group is
    good (then the shard ends with its last good sample)."""
    root = tmp_path_factory.mktemp("interleave")
    rng = np.random.default_rng(0)
    paths, layout, first = [], [], 0
    for s, size in enumerate(SIZES):
        samples = [{"key": f"{first + i:05d}", "image": rng.bytes(int(rng.integers(200, 3000))),
                    "caption": None if first + i in NO_CAPTION else f"caption {first + i}"}
                   for i in range(size)]
        paths += write_shards(root / f"s{s}", samples, size)
        numbers = list(range(first, first + size))
        if s == TRUNCATED:
            with tarfile.open(paths[-1]) as tf:
                member = tf.getmember(f"{CUT_AT:05d}.jpg")
            raw = Path(paths[-1]).read_bytes()
            Path(paths[-1]).write_bytes(raw[: member.offset_data + 10])
            numbers = [n for n in numbers if n < CUT_AT]
        good = [f"{n:05d}" for n in numbers if n not in NO_CAPTION]
        ends_clean = s != TRUNCATED and first + size - 1 not in NO_CAPTION
        layout.append((good, ends_clean))
        first += size
    missing = str(root / "missing.tar")
    return [*paths, missing], [*layout, ([], False)]


def _reader(paths, **kwargs):
    kwargs = {"seed": 4, "process_index": 0, "process_count": 1, "verify_images": False,
              **kwargs}
    return WebDatasetReader(paths, **kwargs)


def _model_stream(layout, order, k):
    """The documented interleave rule, written out: slots take turns, a turn yields the slot's
    next good sample; a shard whose last group was just read hands its slot to the next shard
    at once, one that runs out otherwise does so at its next turn, in that turn."""
    pending = [list(layout[j][0]) for j in order]
    clean = [layout[j][1] for j in order]
    slots = collections.deque(range(min(k, len(order))))
    next_entry, out = len(slots), []

    def refill(at):
        nonlocal next_entry
        if next_entry < len(order):
            slots[at] = next_entry
            next_entry += 1
        else:
            del slots[at]

    while slots:
        entry = slots[0]
        if not pending[entry]:
            refill(0)
            continue
        out.append(pending[entry].pop(0))
        slots.rotate(-1)
        if not pending[entry] and clean[entry]:
            refill(-1)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_interleaved_stream_follows_the_rule(shards, k):
    paths, layout = shards
    reader = _reader(paths, interleave=k)
    order = shard_order(4, 0, 0, len(paths))
    want = _model_stream(layout, order, k)
    got = [next(reader)["key"] for _ in range(len(want))]
    assert got == want
    assert reader.epoch == 0
    assert next(reader)["key"] == _model_stream(layout, shard_order(4, 1, 0, len(paths)), k)[0]
    assert reader.epoch == 1
    if k > 1:
        assert got != _model_stream(layout, order, 1)

@pytest.mark.parametrize("buffer, max_bytes", [(0, None), (16, None), (16, 9000)])
def test_two_processes_interleaved_cover_every_good_sample_once(shards, buffer, max_bytes):
    paths, layout = shards
    seen = []
    for p in range(2):
        reader = _reader(paths, process_index=p, process_count=2, interleave=3,
                         shuffle_buffer=buffer, shuffle_buffer_bytes=max_bytes)
        mine = {key for (good, _), path in zip(layout, paths, strict=True)
                if path in reader.local_shards for key in good}
        keys = [next(reader)["key"] for _ in range(len(mine))]
        assert sorted(keys) == sorted(mine)
        seen += keys
    assert sorted(seen) == sorted(key for good, _ in layout for key in good)


def test_byte_bound_holds_and_changes_the_order(shards):
    paths, layout = shards
    total = sum(len(good) for good, _ in layout)
    free = _reader(paths, interleave=2, shuffle_buffer=20)
    bounded = _reader(paths, interleave=2, shuffle_buffer=20, shuffle_buffer_bytes=8000)
    largest, free_keys, bounded_keys, free_most = 0, [], [], 0
    for _ in range(total):
        free_keys.append(next(free)["key"])
        sample = next(bounded)
        bounded_keys.append(sample["key"])
        largest = max(largest, len(sample["image"]) + len(sample["caption"]) + 600)
        assert bounded._buffer.bytes <= 8000 + largest
        free_most = max(free_most, free._buffer.bytes)
    assert free_most > 2 * 8000  # the bound did bind
    assert sorted(free_keys) == sorted(bounded_keys) and free_keys != bounded_keys


@pytest.mark.parametrize("k, buffer, max_bytes", [(3, 0, None), (2, 16, None), (3, 16, 9000),
                                                  (8, 5, 4000)])
def test_exact_resume_interleaved(shards, k, buffer, max_bytes):
    paths, layout = shards
    kwargs = {"interleave": k, "shuffle_buffer": buffer, "shuffle_buffer_bytes": max_bytes}
    epoch_len = sum(len(good) for good, _ in layout)
    m = 25
    for n in (0, 1, 7, 30, epoch_len - 3, epoch_len, epoch_len + 4):
        reader = _reader(paths, **kwargs)
        [next(reader) for _ in range(n)]
        state = json.loads(json.dumps(reader.get_state()))
        assert len(json.dumps(state)) < 3000
        expected = [next(reader)["key"] for _ in range(2 * m)]
        resumed = _reader(paths, **kwargs)
        resumed.set_state(state)
        assert [next(resumed)["key"] for _ in range(m)] == expected[:m], f"after {n}"
        again = _reader(paths, **kwargs)
        again.set_state(json.loads(json.dumps(resumed.get_state())))
        assert [next(again)["key"] for _ in range(m)] == expected[m:], f"after {n + m}"
        assert again.stats == reader.stats  # nothing counted twice
    assert reader.stats.truncated_shards >= 1 and reader.stats.unreadable_shards >= 1


def test_close_closes_every_open_shard_and_next_goes_on_exactly(shards):
    from crate_jax.data.wds.shards import default_open

    paths, _ = shards
    kwargs = {"interleave": 3, "shuffle_buffer": 16, "shuffle_buffer_bytes": 9000}
    reference = _reader(paths, **kwargs)
    expected = [next(reference)["key"] for _ in range(60)]
    opened = []

    def tracking(path):
        opened.append(default_open(path))
        return opened[-1]

    reader = _reader(paths, open_fn=tracking, **kwargs)
    got = [next(reader)["key"] for _ in range(25)]
    assert sum(not f.closed for f in opened) == 3  # one per interleave slot
    reader.close()
    assert all(f.closed for f in opened)
    got += [next(reader)["key"] for _ in range(35)]
    assert got == expected
    reader.close()
    assert all(f.closed for f in opened)


def test_shuffle_buffer_resumes_exactly_under_the_byte_bound():
    """The buffer alone, on a synthetic stream: a checkpoint at any point, rebuilt from its
    fields and a replay from the oldest held sample, goes on exactly as the original."""
    rng = np.random.default_rng(1)
    sizes = rng.integers(10, 400, 700).tolist()

    def run(buffer, start=0, stop=None):
        """(samples out, index of the last sample pushed)."""
        out = []
        for i in range(start, len(sizes)):
            buffer.push(i, i, ("cursor", i), sizes[i])
            while (item := buffer.pop(i, False)) is not None:
                out.append(item)
                if len(out) == stop:
                    return out, i
        while (item := buffer.pop(len(sizes) - 1, True)) is not None:
            out.append(item)
        return out, len(sizes) - 1

    for max_bytes in (None, 2000, 300):
        whole, _ = run(ShuffleBuffer(7, 0, 0, 50, max_bytes))
        assert sorted(whole) == list(range(len(sizes)))
        if max_bytes is None:  # the stream sorted by (i + d_i, i)
            d = delays(7, 0, 0, 50, 0)
            assert whole == sorted(range(len(sizes)), key=lambda i: (i + d[i], i))
        else:
            assert whole != run(ShuffleBuffer(7, 0, 0, 50))[0]  # the bound did bind
        for t in (1, 37, 200, 450, 699):
            original = ShuffleBuffer(7, 0, 0, 50, max_bytes)
            head, frontier = run(original, stop=t)
            oldest = original.oldest()
            start = frontier + 1 if oldest is None else oldest[0]
            assert oldest is None or oldest[1] == ("cursor", start)
            resumed = ShuffleBuffer(7, 0, 0, 50, max_bytes, last_out=original.last_out,
                                    level_since=original.level_since)
            assert head + run(resumed, start=start)[0] == whole, (max_bytes, t)


def test_elastic_resume_from_interleaved_states(shards):
    paths, layout = shards
    every = {key for good, _ in layout for key in good}

    def make(p, count):
        return _reader(paths, process_index=p, process_count=count, interleave=2,
                       shuffle_buffer=6, shuffle_buffer_bytes=5000)

    old = [make(q, 2) for q in range(2)]
    before = [next(r)["key"] for r, n in zip(old, (11, 19), strict=True) for _ in range(n)]
    states = [json.loads(json.dumps(r.get_state())) for r in old]
    assert any(s["slots"] for s in states)
    after = []
    for p in range(3):
        new = make(p, 3)
        new.set_states(states)
        while True:
            sample = next(new)
            if new.epoch != 0:
                break
            after.append(sample["key"])
    read = before + after
    assert set(read) == every  # nothing skipped
    repeats = sum(n - 1 for n in collections.Counter(read).values())
    assert new.elastic_report["repeated"] == repeats


def test_bad_settings_are_named(shards):
    paths, _ = shards
    for kwargs, name in (({"interleave": 0}, "interleave"),
                         ({"shuffle_buffer_bytes": -1}, "shuffle_buffer_bytes"),
                         ({"shuffle_buffer": 2.5}, "shuffle_buffer")):
        with pytest.raises(ValueError, match=name):
            _reader(paths, **kwargs)
    state = _reader(paths, interleave=2).get_state()
    with pytest.raises(ValueError, match=r"interleave"):
        _reader(paths, interleave=3).set_state(state)


def test_states_written_before_interleaving_resume(tmp_path):
    """tests/data/webdataset_v2_states.json: states and the keys that followed them, written
    by the reader before interleaving and the byte bound existed (state version 2)."""
    golden = json.loads((Path(__file__).parent / "data" / "webdataset_v2_states.json")
                        .read_text())
    samples, paths, start = [], [], 0
    for i in range(31):
        samples.append({"key": f"{i:05d}", "image": b"img%d" % i,
                        "caption": None if i % 11 == 3 else f"c{i}"})
    for s, size in enumerate((7, 4, 9, 6, 5)):
        paths += write_shards(tmp_path / f"s{s}", samples[start:start + size], size,
                              prefix=f"g{s}-")
        start += size
    for case in golden["cases"]:
        assert case["state"]["version"] == 2
        reader = _reader(paths, seed=3, shuffle_buffer=case["shuffle_buffer"])
        reader.set_state(case["state"])
        assert [next(reader)["key"] for _ in range(15)] == case["next_keys"], case["taken"]
        fresh = _reader(paths, seed=3, shuffle_buffer=case["shuffle_buffer"])
        [next(fresh) for _ in range(case["taken"] + 15)]
        counts = {k: v for k, v in fresh.stats.__dict__.items() if k != "bad_shards"}
        assert counts == {k: v for k, v in reader.stats.__dict__.items() if k != "bad_shards"}


class _Flaky(io.BytesIO):
    """A file whose reads fail once `fail_at` bytes have been read; it records seeks."""

    def __init__(self, data: bytes, fail_at: int):
        super().__init__(data)
        self.fail_at, self.seeks = fail_at, []

    def read(self, n=-1):
        if self.tell() >= self.fail_at:
            raise ConnectionError("backend went away")
        left = self.fail_at - self.tell()
        return super().read(left if n is None or n < 0 else min(n, left))

    def seek(self, pos, whence=io.SEEK_SET):
        self.seeks.append((pos, whence))
        return super().seek(pos, whence)


def test_readahead_seeks_and_fails_like_the_file():
    data = np.random.default_rng(2).bytes(3_000_000)
    raw = _Flaky(data, 200_000)
    f = ReadAhead(raw, chunk=65536, depth=3)
    f.seek(1000)  # before the first read: the file itself seeks (a resume's saved offset)
    assert raw.seeks == [(1000, io.SEEK_SET)]
    assert f.read(5000) == data[1000:6000]
    f.seek(300, io.SEEK_CUR)  # a short skip forward: dropped from the buffer, no seek
    assert raw.seeks == [(1000, io.SEEK_SET)] and f.read(10) == data[6300:6310]
    f.seek(10)  # backwards: the thread restarts there
    assert f.read(100) == data[10:110] and f.tell() == 110
    assert f.read(150_000) == data[110:150_110]
    with pytest.raises(ConnectionError):  # the backend's error, at the read that reaches it
        f.read(100_000)
    f.close()
    assert raw.closed


def test_readahead_matches_plain_reads_on_random_access():
    rng = np.random.default_rng(3)
    data = rng.bytes(500_000)
    plain, ahead = io.BytesIO(data), ReadAhead(io.BytesIO(data), chunk=4096, depth=2)
    for _ in range(400):
        if rng.random() < 0.2:
            offset = int(rng.integers(0, 3000))
            assert ahead.seek(offset, io.SEEK_CUR) == plain.seek(offset, io.SEEK_CUR)
        elif rng.random() < 0.05:
            offset = int(rng.integers(0, len(data)))
            assert ahead.seek(offset) == plain.seek(offset)
        n = int(rng.integers(0, 9000))
        assert ahead.read(n) == plain.read(n)
        assert ahead.tell() == plain.tell()


def test_a_failing_backend_mid_shard_counts_a_truncated_shard(shards, tmp_path):
    paths, layout = shards
    size = os.path.getsize(paths[1])

    def open_fn(path):
        data = Path(path).read_bytes()
        return _Flaky(data, size // 2) if path == paths[1] else io.BytesIO(data)

    reader = _reader(paths[:3], open_fn=open_fn, interleave=2)
    keys = []
    while reader.epoch == 0:
        keys.append(next(reader)["key"])
    assert reader.stats.truncated_shards == 1 and paths[1] in reader.stats.bad_shards
    kept = [key for key in keys[:-1] if key in layout[1][0]]
    assert 0 < len(kept) < len(layout[1][0])  # the samples before the failure, in order
    assert kept == layout[1][0][:len(kept)]
    assert sorted(keys[:-1]) == sorted(layout[0][0] + layout[2][0] + kept)


def _batches(paths, threads, transform, **kwargs):
    from crate_jax.data.wds.batches import OrderedBatches

    reader = _reader(paths, interleave=3, shuffle_buffer=8, **kwargs)
    return OrderedBatches(reader, transform, batch_size=5, threads=threads, in_flight=12)


def _jittery(sample):
    """A transform that takes a random while (so results finish out of order) and cannot use
    every seventh sample."""
    import time

    number = _number(sample["key"])
    time.sleep(np.random.default_rng(number).uniform(0, 0.003))
    if number % 7 == 0:
        return None
    return {"number": np.int64(number), "epoch": np.int64(sample["epoch"])}


def test_ordered_batches_do_not_depend_on_threads_and_resume_exactly(shards):
    paths, _ = shards
    one, four = _batches(paths, 1, _jittery), _batches(paths, 4, _jittery)
    serial = [next(one)["number"].tolist() for _ in range(20)]
    assert [next(four)["number"].tolist() for _ in range(20)] == serial
    assert all(n % 7 for batch in serial for n in batch)
    state = json.loads(json.dumps(four.get_state()))
    want = [next(four)["number"].tolist() for _ in range(6)]
    stats_then = four.reader.stats
    one.close()
    four.close()
    again = _batches(paths, 3, _jittery)
    again.set_state(state)
    assert [next(again)["number"].tolist() for _ in range(6)] == want
    # the unusable samples counted up to the checkpoint's sample, not the ones read ahead
    reference = _reader(paths, interleave=3, shuffle_buffer=8)
    taken = sum(len(b) for b in serial)
    unusable = 0
    while taken:
        if _number(next(reference)["key"]) % 7 == 0:
            unusable += 1
        else:
            taken -= 1
    assert state["stats"]["bad_images"] == unusable
    assert stats_then.bad_images >= unusable
    again.close()
    with pytest.raises(RuntimeError, match="after close"):
        next(again)  # not a hang
    again.set_state(state)  # and a closed iterator can start again
    assert [next(again)["number"].tolist() for _ in range(6)] == want
    again.close()


def test_ordered_batches_raise_the_transform_error_and_stay_failed(shards):
    paths, _ = shards

    def broken(sample):
        if _number(sample["key"]) == 50:
            raise ValueError("transform broke on 50")
        return {"number": np.int64(_number(sample["key"]))}

    batches = _batches(paths, 2, broken)
    with pytest.raises(ValueError, match="broke on 50"):
        for _ in range(100):
            next(batches)
    with pytest.raises(ValueError, match="broke on 50"):
        next(batches)
    batches.close()


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("fail_at", [37, 40, 44])
def test_a_reader_error_comes_after_every_batch_before_it(shards, threads, fail_at):
    """The workers read in turn; an error of the reader (after `fail_at` samples, some of
    them in the chunk it breaks off) reaches the consumer after every complete batch of the
    samples before it, in stream order, then stays."""
    paths, _ = shards
    batches = _batches(paths, threads, _jittery)
    reader = batches.reader
    batches.close()
    served = []

    class Failing(type(reader)):
        def __next__(self):
            if len(served) == fail_at:
                raise OSError("the bucket went away")
            sample = super().__next__()
            served.append(_number(sample["key"]))
            return sample

    reader.__class__ = Failing
    batches.set_state(reader.get_state())
    got = []
    with pytest.raises(OSError, match="went away"):
        for _ in range(20):
            got.append(next(batches)["number"].tolist())
    usable = [n for n in served if n % 7]
    assert got == [usable[i:i + 5] for i in range(0, 5 * (len(usable) // 5), 5)]
    with pytest.raises(OSError, match="went away"):
        next(batches)
    batches.close()  # returns: no worker is left waiting


@pytest.mark.parametrize("key, value", [("interleave", 0), ("shuffle_buffer_bytes", -1),
                                        ("shuffle_buffer", -3)])
def test_the_clipa_recipe_names_a_bad_reader_setting(key, value):
    from crate_jax.config_check import load_config, validate

    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                      "clipa_h14.py"))
    assert config.data.interleave > 1 and config.data.shuffle_buffer_bytes > 0
    validate(config)
    config.data[key] = value
    with pytest.raises(ValueError, match=rf"data\.{key}={value}"):
        validate(config)
