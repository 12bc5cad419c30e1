"""Elastic resume: a checkpoint written by P processes resumes with P' != P processes.

The grain path's position is the number of global examples consumed, the same in every process,
so any process count continues with the same global batches: real multi-process runs
(launch/local/multiprocess.sh, 2 processes × 4 fake CPU devices, and 1 process × 8) checkpoint
at step 2, resume with the other process count, and must log the losses of an uninterrupted
run of that process count. The webdataset path resumes at shard granularity (remainder pass,
crate_jax/data/wds_elastic.py): unit tests check that every sample of the epoch is read, and
that the repeats it logs are the true ones. The module took 124 s on the shared 2-core
development machine (67 s of CPU), almost all of it in the four training runs; the unit tests
alone take about 3 s.
"""

import collections
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from multiprocess_utils import FAST_COMPILE, IndexSource, metrics
from multiprocess_utils import env as clean_env

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


# --------------------------------------------------------------------------- real runs

def _start(workdir, processes, logdir):
    if processes == 1:
        return subprocess.Popen(
            [sys.executable, "-m", "crate_jax.main", *ARGS, f"--workdir={workdir}"], cwd=ROOT,
            env=clean_env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.Popen(
        ["bash", SCRIPT, f"--processes={processes}", f"--devices={8 // processes}",
         "--no-follow", f"--python={sys.executable}", f"--timeout={TIMEOUT - 10}",
         f"--logdir={logdir}", "--", *ARGS, f"--workdir={workdir}"],
        cwd=ROOT, env=clean_env(XLA_FLAGS=FAST_COMPILE), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _wait_all(procs):
    try:
        outs = [p.communicate(timeout=TIMEOUT)[0] for p, _ in procs]
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for (p, logdir), out in zip(procs, outs, strict=True):
        logs = "".join(f"\n--- {f.name} ---\n" + f.read_text()[-3000:]
                       for f in sorted(logdir.glob("process_*.log"))) if logdir.exists() else ""
        assert p.returncode == 0, out[-5000:] + logs
    return outs


def _resumable_copy(run, target):
    """A workdir holding only `run`'s config and its checkpoint at RESUME_AT."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.json", target / "config.json")
    shutil.copytree(run / "checkpoints" / str(RESUME_AT), target / "checkpoints" / str(RESUME_AT))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 1-process and 2-process runs (checkpoints every 2 steps, all kept); then
    each one's step-2 checkpoint resumed with the other process count."""
    base = tmp_path_factory.mktemp("elastic")
    one, two = base / "one", base / "two"
    _wait_all([(_start(one, 1, base / "logs_one"), base / "logs_one"),
               (_start(two, 2, base / "logs_two"), base / "logs_two")])
    two_to_one, one_to_two = base / "two_to_one", base / "one_to_two"
    _resumable_copy(two, two_to_one)
    _resumable_copy(one, one_to_two)
    outs = _wait_all([(_start(two_to_one, 1, base / "logs_21"), base / "logs_21"),
                      (_start(one_to_two, 2, base / "logs_12"), base / "logs_12")])
    return base, outs


@pytest.mark.parametrize("resumed, reference, saved_files, new_files", [
    ("two_to_one", "one", ["process_0-of-2.json", "process_1-of-2.json"],
     ["process_0-of-1.json"]),
    ("one_to_two", "two", ["process_0-of-1.json"],
     ["process_0-of-2.json", "process_1-of-2.json"]),
])
def test_grain_run_resumes_with_another_process_count(runs, resumed, reference, saved_files,
                                                      new_files):
    base, outs = runs
    ckpt = base / resumed / "checkpoints"
    assert sorted(p.name for p in (ckpt / str(RESUME_AT) / "data").glob("process_*")) == \
        saved_files
    assert sorted(p.name for p in (ckpt / str(STEPS) / "data").glob("process_*")) == new_files
    if resumed == "one_to_two":
        for log in (base / "logs_12").glob("process_*.log"):
            assert f"resumed from step {RESUME_AT} " in log.read_text()
    else:
        assert f"resumed from step {RESUME_AT} " in outs[0]
    got, want = metrics(base / resumed), metrics(base / reference)
    logged = sorted(k for k, v in got.items() if "train/loss" in v)
    assert logged == [4, 6]
    for step in logged:
        for key in ("train/loss", "train/grad_norm", "train/accuracy"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5,
                                       err_msg=f"{key} at step {step}")
    np.testing.assert_allclose(got[STEPS]["val/loss"], want[STEPS]["val/loss"], rtol=1e-5)
    assert got[STEPS]["val/top1"] == want[STEPS]["val/top1"]
