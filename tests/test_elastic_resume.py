"""Elastic resume: a checkpoint written by P processes resumes with P' != P processes.

The grain path's position is the number of global examples consumed, the same in every process,
so any process count continues with the same global batches: unit tests here check the
iterators, and real runs (a 2-process checkpoint resumed on 1 process, and the other way
round) are in tests/test_multiprocess.py, which shares their training runs with its own
checks. The webdataset path resumes at shard granularity (remainder pass,
crate_jax/data/wds_elastic.py): unit tests check that every sample of the epoch is read, and
that the repeats it logs are the true ones.
"""

import collections
import json
import logging
import os

import numpy as np
import pytest
from multiprocess_utils import IndexSource

from crate_jax.data import pipeline
from crate_jax.data.webdataset import WebDatasetReader, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "local", "multiprocess.sh")
DEMO = os.path.join(ROOT, "configs", "demo_classification.py")
STEPS, RESUME_AT = 6, 2
ARGS = (f"--config={DEMO}:smoke", f"--config.total_steps={STEPS}",
        f"--config.optim.total_steps={STEPS}", "--config.checkpoint.keep=10",
        "--config.checkpoint.async_save=False", "--config.measure_flops=False",
        "--config.tensorboard=False")
TIMEOUT = 180


# --------------------------------------------------------------------------- grain, unit level

def _noisy(example, rng):  # the augmentation's RNG must carry over too
    return {"index": example["index"], "noise": rng.random(2)}


def _iterators(count, global_batch=8, n=40):
    return [pipeline.train_iterator(IndexSource(n), batch_size=global_batch // count, seed=3,
                                    transform=_noisy, process=(p, count)) for p in range(count)]


def _global_batches(its, steps):
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its]
        out.append({k: np.concatenate([b[k] for b in parts]) for k in parts[0]})
    return out


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2), (2, 4)])
def test_grain_position_is_process_count_invariant(saved, resumed):
    reference = _global_batches(_iterators(1), 12)  # 40 examples: over two epochs
    old = _iterators(saved)
    _global_batches(old, 7)
    states = [json.loads(json.dumps(it.get_state())) for it in old]
    assert states == [{"examples": 7 * 8}] * saved
    new = _iterators(resumed)
    for it in new:
        it.set_states(states)
    for want, got in zip(reference[7:], _global_batches(new, 5), strict=True):
        np.testing.assert_array_equal(want["index"], got["index"])
        np.testing.assert_array_equal(want["noise"], got["noise"])


def test_grain_states_that_disagree_are_refused():
    it = _iterators(1)[0]
    with pytest.raises(ValueError, match="disagree"):
        it.set_states([{"examples": 8}, {"examples": 16}])
    with pytest.raises(ValueError, match="'examples'"):
        it.set_state({"position": 3})


# --------------------------------------------------------------------------- checkpoint handler

def test_data_state_handler_reads_every_saved_process(tmp_path):
    from etils import epath

    from crate_jax.train.checkpoint import DataStateHandler, DataStateRestore

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        (data / f"process_{i}-of-2.json").write_text(json.dumps({"examples": 24}))
    it = _iterators(1)[0]
    DataStateHandler().restore(epath.Path(data), DataStateRestore(it))
    np.testing.assert_array_equal(next(it)["index"], _global_batches(_iterators(1), 4)[3]["index"])
    # a truly missing state: the error names the file it wanted and the files there are
    (data / "process_1-of-2.json").unlink()
    with pytest.raises(FileNotFoundError) as info:
        DataStateHandler().restore(epath.Path(data), DataStateRestore(it))
    assert "expected process_0-of-1.json" in str(info.value)
    assert "['process_0-of-2.json']" in str(info.value)
    assert "different number of processes" not in str(info.value)


# --------------------------------------------------------------------------- webdataset

SHARD_SIZES = (5, 9, 7, 11, 6, 8, 10)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    paths, first = [], 0
    for s, size in enumerate(SHARD_SIZES):
        samples = [{"key": f"{first + i:06d}", "image": b"not decoded", "caption": f"c{i}"}
                   for i in range(size)]
        paths += write_shards(tmp_path_factory.mktemp(f"wds{s}"), samples, size)
        first += size
    return paths


def _wds(shards, index, count, buffer):
    return WebDatasetReader(shards, seed=5, process_index=index, process_count=count,
                            shuffle_buffer=buffer, verify_images=False)


def _ids(samples):
    return [(s["shard"], s["index"]) for s in samples]


def _remainder(reader):
    """The samples of the reader's remainder pass (it ends when the next epoch starts)."""
    label, out = reader.epoch, []
    while True:
        sample = next(reader)
        if reader.epoch != label:
            return out, sample
        out.append(sample)


@pytest.mark.parametrize("buffer", [0, 6])
@pytest.mark.parametrize("saved, resumed, taken", [(2, 1, (13, 21)), (1, 2, (29,)),
                                                   (3, 2, (20, 11, 9))])
def test_webdataset_elastic_resume(shards, caplog, buffer, saved, resumed, taken):
    every = {(p, i) for p, n in zip(shards, SHARD_SIZES, strict=True) for i in range(n)}
    old = [_wds(shards, q, saved, buffer) for q in range(saved)]
    before = [s for r, n in zip(old, taken, strict=True) for s in _ids([next(r) for _ in range(n)])]
    assert all(r.epoch == 0 for r in old)
    states = [json.loads(json.dumps(r.get_state())) for r in old]
    new = [_wds(shards, p, resumed, buffer) for p in range(resumed)]
    with caplog.at_level(logging.WARNING, logger="crate_jax.data.wds_elastic"):
        for r in new:
            r.set_states(states)
    after, following = [], []
    for r in new:
        rest, first_of_next = _remainder(r)
        after += _ids(rest)
        following.append((r, first_of_next))
    read = before + after
    assert set(read) == every  # nothing skipped
    repeats = sum(n - 1 for n in collections.Counter(read).values())
    report = new[0].elastic_report
    assert report["repeated"] == repeats and report["skipped"] == 0
    assert (repeats > 0) == (buffer > 0)
    lines = [r.getMessage() for r in caplog.records if "elastic resume" in r.getMessage()]
    assert len(lines) == resumed
    assert all(f"{repeats} samples repeated, 0 skipped" in line for line in lines)
    # then normal epochs of the new process count: shard i to process i % resumed
    for r, sample in following:
        assert r.epoch == 1 and sample["shard"] in shards[r.process_index::resumed]


def test_webdataset_checkpoint_in_the_remainder_pass(shards):
    """A checkpoint taken during the remainder pass resumes exactly with the same process
    count, and elastically again with another."""
    old = [_wds(shards, q, 2, 6) for q in range(2)]
    for r, n in zip(old, (10, 3), strict=True):
        [next(r) for _ in range(n)]
    states = [r.get_state() for r in old]
    one = _wds(shards, 0, 1, 6)
    one.set_states(states)
    first = _ids([next(one) for _ in range(8)])
    mid = json.loads(json.dumps(one.get_state()))
    assert mid["remainder"] is not None
    want = _ids([next(one) for _ in range(30)])
    again = _wds(shards, 0, 1, 6)
    again.set_states([mid])  # same process count: exact
    assert _ids([next(again) for _ in range(30)]) == want
    # 1 -> 2 from the middle of the remainder pass: the rest of that pass is still read
    whole = _wds(shards, 0, 1, 6)
    whole.set_states(states)
    whole_pass = _ids(_remainder(whole)[0])
    two = [_wds(shards, p, 2, 6) for p in range(2)]
    for r in two:
        r.set_states([mid])
    rest = [s for r in two for s in _ids(_remainder(r)[0])]
    assert set(first) | set(rest) == set(whole_pass)
    assert len(first) + len(rest) == len(whole_pass) + two[0].elastic_report["repeated"]


def test_webdataset_states_of_other_shards_are_refused(shards):
    old = _wds(shards[:6], 0, 2, 0)
    new = _wds(shards, 0, 1, 0)
    with pytest.raises(ValueError, match="num_shards"):
        new.set_states([old.get_state(), _wds(shards[:6], 1, 2, 0).get_state()])


@pytest.mark.parametrize("config", ["demo.py", "demo_classification.py", "demo_mae.py",
                                    "demo_simdino.py", "demo_lm.py", "crate_bert.py",
                                    "demo_tost.py"])
def test_every_tasks_train_data_is_a_data_iterator(config):
    """Task.train_data's contract (pipeline.DataIterator): batches of NumPy arrays, and a
    position that survives a get_state / set_state round trip."""
    from crate_jax import tasks
    from crate_jax.config_check import load_config

    c = load_config(os.path.join(ROOT, "configs", config) + ":smoke")
    data = tasks.get(c.trainer)(c).train_data(4, seed=0)
    assert isinstance(data, pipeline.DataIterator), type(data)
    first = next(iter(data))
    assert first and all(isinstance(v, np.ndarray) for v in first.values()), first.keys()
    position = data.get_state()
    second = next(data)
    data.set_state(json.loads(json.dumps(position)))  # as the checkpoint stores it
    again = next(data)
    for key in second:
        np.testing.assert_array_equal(again[key], second[key])


def test_the_data_protocols_name_what_they_need():
    from crate_jax.convert.runs import NoDataPosition
    from crate_jax.data.wds.batches import OrderedBatches
    from crate_jax.data.wds.processes import ProcessBatches

    for reader in (WebDatasetReader, OrderedBatches, ProcessBatches, pipeline.TrainIterator):
        assert issubclass(reader, pipeline.DataIterator), reader
    assert isinstance(NoDataPosition(), pipeline.DataPosition)
    assert not isinstance(NoDataPosition(), pipeline.DataIterator)  # a position, no batches

    class NoResume:
        def __iter__(self):
            return self

        def __next__(self):
            return {}

        def get_state(self):
            return {}

    assert not isinstance(NoResume(), pipeline.DataIterator)
