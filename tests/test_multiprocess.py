"""The multi-host path on one machine: 2 processes × 4 fake CPU devices joined by jax.distributed
(launch/local/multiprocess.sh) train the demo config (with Mixup and CutMix), and match a plain
1 process × 8 devices run of the same config.

Why they can match: the pipeline shuffles the whole source in one global order, cuts it into
per-process batches and deals batch k·P + p to process p (crate_jax/data/pipeline.py), and the
global array is assembled from the processes' rows in process order, so each global batch holds
the same examples, with the same augmentation, whatever the process count
(`test_global_batches_do_not_depend_on_the_process_count`). Only the reduction order of the
collectives differs, hence rtol 1e-5 rather than bitwise.

The 2-process run is also preempted: SIGTERM to process 1 alone, right after jax.distributed
is up; both processes must stop at the same step with a checkpoint, and the same command
resumes and finishes. So the losses compared at steps 2, 4, 6 come from a resumed run.

Both runs use the suite's quick-compile XLA flags (multiprocess_utils.FAST_COMPILE: the same
numerics in both, about half the CPU compile time).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from multiprocess_utils import FAST_COMPILE, IndexSource, metrics
from multiprocess_utils import env as clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "local", "multiprocess.sh")
DEMO = os.path.join(ROOT, "configs", "demo_classification.py")
PROCESSES, DEVICES = 2, 4
STEPS = 6
RESUME_AT = 2  # the 1-process run's checkpoint that resumes on 2 processes
# Mixup and CutMix on (each device mixes its own shard: the same mix on 2 × 4 as on 1 × 8)
OVERRIDES = (f"--config.total_steps={STEPS}", f"--config.optim.total_steps={STEPS}",
             "--config.mixup=0.8", "--config.cutmix=1.0",
             "--config.checkpoint.keep=10", "--config.checkpoint.async_save=False",
             "--config.measure_flops=False", "--config.tensorboard=False")
TIMEOUT = 240


def _target_state(config, mesh):
    """Abstract train state (shapes, dtypes, shardings on `mesh`) of `config`: the loop's own
    (crate_jax.train.state.build_train_state)."""
    from crate_jax.train.state import build_train_state

    return build_train_state(config, mesh).abstract_state


def _launch(workdir, logdir, env, args):
    return subprocess.Popen(
        ["bash", SCRIPT, f"--processes={PROCESSES}", f"--devices={DEVICES}", "--no-follow",
         f"--python={sys.executable}", f"--timeout={TIMEOUT - 10}", f"--logdir={logdir}", "--",
         *args, f"--workdir={workdir}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, logdir) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    logs = "".join(f"\n--- {p.name} ---\n" + p.read_text()[-3000:]
                   for p in sorted(logdir.glob("process_*.log")))
    assert proc.returncode == 0, out + logs
    return out


def _wait_for(path, text, proc, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, f"exited before {text!r}: {proc.communicate()[0]}"
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} never appeared in {path}")


def _start_one(workdir, args):
    """A plain 1 process × 8 devices run."""
    return subprocess.Popen(
        [sys.executable, "-m", "crate_jax.main", *args, f"--workdir={workdir}"],
        cwd=ROOT, env=clean_env(XLA_FLAGS=(f"--xla_force_host_platform_device_count="
                                      f"{PROCESSES * DEVICES} {FAST_COMPILE}")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _resumable_copy(run, step, target):
    """A workdir holding only `run`'s config and its checkpoint at `step`."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.json", target / "config.json")
    shutil.copytree(run / "checkpoints" / str(step), target / "checkpoints" / str(step))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Five runs of one config in two stages (about 60 s):

    1. a plain 1-process × 8-device run (`one_process`: checkpoints every 2 steps, all kept),
       next to a 2-process run whose process 1 alone gets SIGTERM as soon as jax.distributed
       is up: both processes must stop at the same step, save and exit 0;
    2. at once: the same 2-process command resumes and finishes (`two_processes`); the
       1-process run's step-2 checkpoint resumes on 2 processes (`one_to_two`); the 2-process
       run's SIGTERM checkpoint resumes on 1 process (`two_to_one`).
    A persistent compilation cache shared by the two 2-process legs spares the second its
    compiles."""
    base = tmp_path_factory.mktemp("multiprocess")
    multi, single = base / "two_processes", base / "one_process"
    args = [f"--config={DEMO}:smoke", *OVERRIDES]
    env = clean_env(XLA_FLAGS=FAST_COMPILE, JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = [_start_one(single, args)]
    try:
        first = _launch(multi, base / "logs_first", env, args)
        procs.append(first)
        banner = first.stdout.readline()
        pids = [int(p) for p in banner.rsplit("pids", 1)[1].split()]
        assert len(pids) == PROCESSES, banner
        _wait_for(base / "logs_first" / "process_1.log", "jax.distributed: process 1 of 2", first)
        os.kill(pids[1], signal.SIGTERM)
        _finish(first, base / "logs_first")
        out, _ = procs[0].communicate(timeout=TIMEOUT)
        assert procs[0].returncode == 0, out[-5000:]
        stopped = max(int(d.name) for d in (multi / "checkpoints").iterdir() if d.name.isdigit())
        _resumable_copy(multi, stopped, base / "two_to_one")
        _resumable_copy(single, RESUME_AT, base / "one_to_two")
        second = _launch(multi, base / "logs_second", env, args)
        one_to_two = _launch(base / "one_to_two", base / "logs_12", env, args)
        two_to_one = _start_one(base / "two_to_one", args)
        procs += [second, one_to_two, two_to_one]
        _finish(second, base / "logs_second")
        _finish(one_to_two, base / "logs_12")
        out, _ = two_to_one.communicate(timeout=TIMEOUT)
        assert two_to_one.returncode == 0, out[-5000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return base, multi, single, {"two_to_one": stopped, "one_to_two": RESUME_AT}, out


def test_sigterm_to_one_process_stops_all_at_one_step_and_resumes(runs):
    base, multi, *_ = runs
    first = [(base / "logs_first" / f"process_{i}.log").read_text() for i in range(PROCESSES)]
    second = [(base / "logs_second" / f"process_{i}.log").read_text() for i in range(PROCESSES)]
    stops = [re.findall(r"stopping at step (\d+) after a termination signal", log)
             for log in first]
    assert all(len(s) == 1 for s in stops), stops
    step = int(stops[0][0])
    assert stops[1] == stops[0] and 1 <= step < STEPS, stops
    for log in second:
        assert f"resumed from step {step} " in log
        assert f"final: step {STEPS}.0000" in log
    assert (multi / "checkpoints" / str(STEPS)).exists()


def test_two_processes_match_one_process(runs):
    base, multi, single, *_ = runs
    config = json.loads((multi / "config.json").read_text())
    assert config["batch_size"] == 16 and config["mesh"]["fsdp"] == -1
    logs = [(base / "logs_second" / f"process_{i}.log").read_text() for i in range(PROCESSES)]
    for i, log in enumerate(logs):
        assert f"jax.distributed: process {i} of 2, 4 local / 8 global devices" in log, log[-2000:]
    m, s = metrics(multi), metrics(single)
    logged = sorted(k for k, v in m.items() if "train/loss" in v)
    assert logged == [2, 4, 6] and sorted(k for k, v in s.items() if "train/loss" in v) == logged
    for step in logged:
        for key in ("train/loss", "train/grad_norm", "train/accuracy", "train/lr"):
            np.testing.assert_allclose(m[step][key], s[step][key], rtol=1e-5,
                                       err_msg=f"{key} at step {step}")
    # evaluation over the whole split: each process reads every other example, padded
    assert m[STEPS]["val/count"] == s[STEPS]["val/count"] == 40
    np.testing.assert_allclose(m[STEPS]["val/loss"], s[STEPS]["val/loss"], rtol=1e-5)
    assert m[STEPS]["val/top1"] == s[STEPS]["val/top1"]


def test_checkpoint_of_two_processes_restores_in_one(runs):
    """Every process wrote its shards (and its data position); one process restores the
    parameters, and the whole state onto an 8-device mesh, equal to the reference run's."""
    import jax
    from etils import epath

    from crate_jax import parallel
    from crate_jax.train.checkpoint import Checkpointer
    from crate_jax.train.loop import final_params

    _, multi, single, *_ = runs
    step_dir = multi / "checkpoints" / str(STEPS)
    assert sorted(p.name for p in (step_dir / "data").glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert sorted(p.name for p in (step_dir / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0", "ocdbt.process_1"]

    restored, reference = final_params(str(multi)), final_params(str(single))
    flat_r, flat_s = jax.tree.leaves(restored), jax.tree.leaves(reference)
    assert len(flat_r) == len(flat_s) > 0
    for a, b in zip(flat_r, flat_s, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_classification

    config = demo_classification.get_config("smoke")
    mesh = parallel.make_mesh({"fsdp": -1}, devices=jax.devices()[:8])
    target = _target_state(config, mesh)
    state = Checkpointer(epath.Path(multi) / "checkpoints", async_save=False).restore(
        STEPS, target, None)
    ref = Checkpointer(epath.Path(single) / "checkpoints", async_save=False).restore(
        STEPS, target, None)
    assert int(state["step"]) == STEPS
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref), strict=True):
        assert a.sharding.mesh.devices.size == 8
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("resumed, reference, saved_files, new_files", [
    ("two_to_one", "one_process", ["process_0-of-2.json", "process_1-of-2.json"],
     ["process_0-of-1.json"]),
    ("one_to_two", "two_processes", ["process_0-of-1.json"],
     ["process_0-of-2.json", "process_1-of-2.json"]),
])
def test_grain_run_resumes_with_another_process_count(runs, resumed, reference, saved_files,
                                                      new_files):
    """Elastic resume: the grain path's position is the number of global examples consumed,
    the same in every process, so a checkpoint of P processes resumes with P' != P and logs
    what the run of P' processes logged (the data positions of all P are read)."""
    base, _, _, resumed_at, two_to_one_out = runs
    at = resumed_at[resumed]
    ckpt = base / resumed / "checkpoints"
    assert sorted(p.name for p in (ckpt / str(at) / "data").glob("process_*")) == saved_files
    assert sorted(p.name for p in (ckpt / str(STEPS) / "data").glob("process_*")) == new_files
    if resumed == "one_to_two":
        logs = sorted((base / "logs_12").glob("process_*.log"))
        assert len(logs) == PROCESSES
        for log in logs:
            assert f"resumed from step {at} " in log.read_text()
    else:
        assert f"resumed from step {at} " in two_to_one_out
    got, want = metrics(base / resumed), metrics(base / reference)
    logged = sorted(k for k, v in got.items() if "train/loss" in v)
    assert logged and logged == [s for s in (2, 4, 6) if s > at]
    for step in logged:
        for key in ("train/loss", "train/grad_norm", "train/accuracy"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5,
                                       err_msg=f"{key} at step {step}")
    np.testing.assert_allclose(got[STEPS]["val/loss"], want[STEPS]["val/loss"], rtol=1e-5)
    assert got[STEPS]["val/top1"] == want[STEPS]["val/top1"]


@pytest.mark.parametrize("env, called_with", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1"},
     {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}),
    # inside a one-task SLURM allocation, an explicit coordinator still wins (multiprocess.sh)
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234",
      "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 0}),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # one task: nothing to join
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, {}),  # jax reads SLURM's variables
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"CRATE_DISTRIBUTED": "1"}, {}),  # a Cloud TPU slice (launch/tpu/run.sh sets it)
    ({"CRATE_DISTRIBUTED": "0", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, None),
])
def test_when_jax_distributed_is_initialised(env, called_with, monkeypatch):
    from unittest import mock

    from crate_jax.parallel import mesh

    for key in list(os.environ):
        if key.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
                           "OMPI_", "TPU_WORKER", "MEGASCALE", "CRATE_DISTRIBUTED")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(mesh, "_initialized", False)  # each case decides afresh
    with mock.patch("jax.distributed.initialize") as initialize:
        assert mesh.maybe_initialize_distributed() == (called_with is not None)
    if called_with is None:
        initialize.assert_not_called()
    else:
        initialize.assert_called_once_with(**called_with)


def _identity(example, rng):
    return example


def _indices(process_count, steps, n=64, batch=16):
    from crate_jax.data import pipeline

    its = [pipeline.train_iterator(IndexSource(n), batch_size=batch // process_count, seed=0,
                                   transform=_identity, process=(p, process_count))
           for p in range(process_count)]
    return [np.concatenate([next(it)["index"] for it in its]) for _ in range(steps)]


def test_every_example_once_per_epoch_whatever_the_process_count():
    for count in (1, 2, 4):
        steps = _indices(count, steps=8)  # 2 epochs of 4 global batches
        for epoch in (steps[:4], steps[4:]):
            assert sorted(np.concatenate(epoch).tolist()) == list(range(64)), count


def test_global_batches_do_not_depend_on_the_process_count():
    """The processes' batches, concatenated in process order, are the 1-process batches: the
    same examples in the same order (over more than one epoch)."""
    one = _indices(1, steps=8)
    for count in (2, 4):
        for a, b in zip(one, _indices(count, steps=8), strict=True):
            np.testing.assert_array_equal(a, b)
