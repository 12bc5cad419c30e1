"""Worker processes (crate_jax.data.wds.processes): each worker is a virtual process of the
reader, batches come from the workers in turn, states resume exactly, and faults in a worker
(an error, a kill, a bad setting) reach the consumer named, never as a hang."""

import json
import os
import signal
import time

import numpy as np
import pytest
import wds_worker_factory
from multiprocess_utils import child_pids

from crate_jax.data.wds.processes import ProcessBatches
from crate_jax.data.webdataset import write_shards

FACTORY = "wds_worker_factory:numbered_batches"
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _factory_importable(monkeypatch):
    """Workers inherit the environment: they find the tests' factory module too."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (TESTS, os.environ.get("PYTHONPATH")) if p))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """6 shards of 10 samples, numbered 0..59 in their keys (the images are not decoded)."""
    root = tmp_path_factory.mktemp("workers")
    rng = np.random.default_rng(1)
    samples = [{"key": f"{i:05d}", "image": rng.bytes(300), "caption": f"caption {i}"}
               for i in range(60)]
    return write_shards(root, samples, 10)


def _numbers(batches, n: int) -> list[list[int]]:
    return [next(batches)["number"].tolist() for _ in range(n)]


def _children() -> set[int]:
    return child_pids(os.getpid())


def test_workers_are_virtual_processes_in_turn_and_resume_exactly(paths):
    kwargs = {"paths": paths, "share": 2}
    batches = ProcessBatches(FACTORY, kwargs, processes=2, process_index=0, process_count=1)
    got = _numbers(batches, 3)
    state = json.loads(json.dumps(batches.get_state()))
    got += _numbers(batches, 7)
    # worker k is process k of 2 (1/2 of the buffer each); batch i is worker i % 2's next
    alone = [wds_worker_factory.numbered_batches(process_index=k, process_count=2, **kwargs)
             for k in range(2)]
    reference = [_numbers(alone[i % 2], 1)[0] for i in range(10)]
    assert got == reference
    assert state["processes"] == 2 and state["next"] == 1 and len(state["workers"]) == 2
    metrics = batches.metrics()
    assert metrics["data/bad_images"] >= 1 and 0 < metrics["data/bad_fraction"] < 1
    assert set(batches.pids) <= _children()  # what the no-worker-left checks below rely on
    batches.close()
    assert not set(batches.pids) & _children()
    assert all(w.process.poll() is not None for w in batches._workers)
    with pytest.raises(RuntimeError, match="after close"):
        next(batches)
    batches.set_state(state)  # a closed one starts again, where the state was
    assert _numbers(batches, 7) == reference[3:]
    batches.close()
    for b in alone:
        b.close()


def test_a_second_host_reads_its_own_virtual_processes(paths):
    kwargs = {"paths": paths, "share": 2}
    batches = ProcessBatches(FACTORY, kwargs, processes=2, process_index=1, process_count=2)
    got = _numbers(batches, 4)
    batches.close()
    alone = [wds_worker_factory.numbered_batches(process_index=k, process_count=4, **kwargs)
             for k in (2, 3)]
    assert got == [_numbers(alone[i % 2], 1)[0] for i in range(4)]
    from crate_jax.data.wds import shards

    theirs = {paths.index(p) for k in (2, 3) for p in shards.local_shards(paths, k, 4)}
    assert {int(n) // 10 for batch in got for n in batch} <= theirs != set(range(6))
    for b in alone:
        b.close()


def test_another_worker_count_resumes_through_the_elastic_path(paths):
    two = ProcessBatches(FACTORY, {"paths": paths, "share": 2}, processes=2,
                         process_index=0, process_count=1)
    _numbers(two, 5)
    state = two.get_state()
    two.close()
    one = ProcessBatches(FACTORY, {"paths": paths}, processes=1, process_index=0,
                         process_count=1)
    one.set_state(state)  # one host: the two workers' states go to the elastic resume
    # the in-process pipeline (data.worker_processes=0) takes the same state the same way
    in_process = wds_worker_factory.numbered_batches(process_index=0, process_count=1,
                                                    paths=paths)
    in_process.set_state(state)
    want = _numbers(in_process, 6)
    assert _numbers(one, 6) == want
    from crate_jax.data.wds.reader import WebDatasetReader

    bare = WebDatasetReader(paths, seed=5, process_index=0, process_count=1, shuffle_buffer=6,
                            interleave=2, verify_images=False)  # the factory's reader
    bare.set_states(state["workers"])  # the reader's own elastic resume of the 2 workers
    reference = wds_worker_factory.numbered_batches(process_index=0, process_count=1,
                                                    paths=paths)
    reference.set_state(bare.get_state())
    assert _numbers(reference, 6) == want
    one.close()
    in_process.close()
    reference.close()
    second_host = wds_worker_factory.numbered_batches(process_index=1, process_count=2,
                                                      paths=paths)
    with pytest.raises(ValueError, match=r"data\.worker_processes"):
        second_host.set_state(state)  # one host's part only: it cannot be dealt out again
    second_host.close()


@pytest.mark.parametrize("unpicklable", [False, True])
def test_a_worker_error_reaches_the_consumer_in_turn_and_stays(paths, unpicklable):
    batches = ProcessBatches(FACTORY, {"paths": paths, "fail_at": 12, "unpicklable": unpicklable},
                             processes=2, process_index=0, process_count=1)
    error = (RuntimeError, "Unpicklable: odd failure at 12") if unpicklable else (
        ValueError, "transform broke on 12")
    with pytest.raises(error[0], match=error[1]) as raised:
        for _ in range(30):
            next(batches)
    assert any("data worker process" in note for note in raised.value.__notes__)
    with pytest.raises(error[0], match=error[1]):
        next(batches)
    batches.close()


def test_a_killed_worker_is_named_not_a_hang(paths):
    batches = ProcessBatches(FACTORY, {"paths": paths}, processes=2, process_index=0,
                             process_count=1)
    next(batches)
    os.kill(batches.pids[1], signal.SIGKILL)
    # A hang fails after 120 s instead of stalling the suite; the death itself is noticed at
    # once (the pipe's end of file). A wall-clock bound on the loop would only measure how
    # busy the machine is.
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(120)
    try:
        with pytest.raises(RuntimeError, match=r"data worker process 1 \(pid \d+\) ended "
                                               r"with exit status -9"):
            for _ in range(200):  # the batches it sent before it died come first
                next(batches)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    batches.close()


def _hung(signum, frame):
    raise AssertionError("the consumer hung on a dead worker")


def test_workers_outlive_a_preemption_notice_until_closed(paths):
    """SIGTERM to the process group (a scheduler's preemption notice) leaves the workers
    serving: the trainer may need more batches before its save."""
    batches = ProcessBatches(FACTORY, {"paths": paths}, processes=2, process_index=0,
                             process_count=1)
    reference = ProcessBatches(FACTORY, {"paths": paths}, processes=2, process_index=0,
                               process_count=1)
    first = _numbers(batches, 2)
    for pid in batches.pids:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert first + _numbers(batches, 20) == _numbers(reference, 22)
    batches.close()
    assert all(w.process.returncode is not None for w in batches._workers)
    reference.close()


def test_a_worker_that_cannot_start_leaves_no_other_running(paths, monkeypatch):
    from crate_jax.data.wds import processes

    class NoSecond(processes._Worker):
        def __init__(self, number, *args):
            if number == 1:
                raise OSError("cannot start a process")
            super().__init__(number, *args)

    monkeypatch.setattr(processes, "_Worker", NoSecond)
    before = _children()
    with pytest.raises(OSError, match="cannot start"):
        ProcessBatches(FACTORY, {"paths": paths}, processes=2, process_index=0,
                       process_count=1)
    assert _children() <= before


def test_a_bad_setting_fails_at_the_start_and_leaves_no_worker(paths):
    before = _children()
    with pytest.raises(ValueError, match="shuffle_buffer must be an integer >= 0"):
        ProcessBatches(FACTORY, {"paths": paths, "shuffle_buffer": -1}, processes=2,
                       process_index=0, process_count=1)
    with pytest.raises(TypeError, match="no_such_setting"):
        ProcessBatches(FACTORY, {"paths": paths, "no_such_setting": 1}, processes=1,
                       process_index=0, process_count=1)
    assert _children() <= before


def test_workers_end_when_the_consumer_process_dies(paths, tmp_path):
    """A consumer killed with SIGKILL leaves no worker behind (they notice within ~1 s)."""
    import subprocess
    import sys

    script = tmp_path / "consumer.py"
    script.write_text(
        "import sys, time\n"
        "from crate_jax.data.wds.processes import ProcessBatches\n"
        f"b = ProcessBatches({FACTORY!r}, {{'paths': {paths!r}}}, processes=2, "
        "process_index=0, process_count=1)\n"
        "next(b)\n"
        "print(*b.pids, flush=True)\n"
        "time.sleep(60)\n")
    root = os.path.dirname(TESTS)
    consumer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                text=True, cwd=root,
                                env={**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{root}"})
    pids = [int(p) for p in consumer.stdout.readline().split()]
    assert len(pids) == 2
    consumer.kill()
    consumer.wait()
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids):
        assert time.monotonic() < deadline, "a worker outlived its consumer"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # ended meanwhile
        return "Z"


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    """4 shards of 10 captioned photo-like JPEGs."""
    import io

    from image_utils import photo

    samples = []
    for i in range(40):
        buffer = io.BytesIO()
        photo(40 + i % 7, 36 + i % 5, seed=i).save(buffer, format="JPEG", quality=90)
        samples.append({"key": f"{i:05d}", "image": buffer.getvalue(),
                        "caption": f"a photo of thing {i} on a table"})
    return write_shards(tmp_path_factory.mktemp("jpegs"), samples, 10)


def _image_text_config(shards, **overrides):
    import ml_collections

    return ml_collections.ConfigDict({**dict(
        source="webdataset", shards=shards, tokenizer="builtin:shapes_captions_bert",
        image_size=16, context_length=12, crop_area=(0.4, 1.0), flip=True, shuffle_buffer=8,
        shuffle_buffer_bytes=1 << 20, interleave=2, num_workers=2, worker_processes=2),
        **overrides})


def test_the_image_text_pipeline_in_worker_processes(jpeg_shards):
    """data.worker_processes: the real decode and tokenizer in 2 workers give the batches of
    the one-process pipeline of each virtual process, with half the buffer bounds each."""
    from crate_jax.data import image_text

    data = _image_text_config(jpeg_shards)
    batches = image_text.train_iterator(data, batch_size=4, seed=3)
    got = [next(batches) for _ in range(4)]
    batches.close()
    alone = [image_text.webdataset_batches(data=data, batch_size=4, seed=3, process_index=k,
                                           process_count=2, share=2) for k in range(2)]
    assert alone[0].reader.shuffle_buffer == 4 and alone[0].reader.shuffle_buffer_bytes == 1 << 19
    for i, batch in enumerate(got):
        want = next(alone[i % 2])
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
        np.testing.assert_array_equal(batch["image"], want["image"])
        np.testing.assert_array_equal(batch["tokens"], want["tokens"])
    for b in alone:
        b.close()


def test_bad_worker_settings_are_named_before_any_worker_starts(jpeg_shards, tmp_path):
    import ml_collections

    from crate_jax.config_check import validate
    from crate_jax.data import image_text

    before = _children()
    with pytest.raises(ValueError, match=r"data\.worker_processes=5: 4 shards for 1 host"):
        image_text.train_iterator(_image_text_config(jpeg_shards, worker_processes=5),
                                  batch_size=4, seed=0)
    missing = str(tmp_path / "vocab.txt")
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt"):
        image_text.train_iterator(_image_text_config(jpeg_shards, tokenizer=missing),
                                  batch_size=4, seed=0)
    assert _children() <= before
    with pytest.raises(ValueError, match=r"data\.worker_processes=-1"):
        validate(ml_collections.ConfigDict({"data": {"worker_processes": -1}}))
