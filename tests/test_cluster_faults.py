"""The faults a shared cluster brings (issue 37): bad paths and settings get one line, SIGTERM
at the very start exits 0 with nothing written, a full disk leaves whole files and a clear
line and resumes exactly, the advice after a NaN can be followed, and one trainer per workdir.
"""

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_train import DEMO, ROOT, smoke_config

from crate_jax.train import checkpoint as checkpoint_module
from crate_jax.train import logfile
from crate_jax.train import workdir as workdir_files
from crate_jax.train.lock import WorkdirLock
from crate_jax.train.loop import final_params, train_and_evaluate
from crate_jax.train.workdir import RunFailed


def _main(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crate_jax.main", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs)



def _damaged_run(tmp_path) -> str:
    """A workdir whose two checkpoints are empty step folders (what a cut copy leaves; the
    kinds of damage are tests/test_checkpoint_faults.py's)."""
    workdir = tmp_path / "damaged"
    for step in ("2", "4"):
        (workdir / "checkpoints" / step).mkdir(parents=True)
    return str(workdir)


def test_path_and_setting_faults_get_one_line_and_no_traceback(tmp_path):
    """Issue 37 A: each fault ends with one stderr line naming the file or setting."""
    afile = tmp_path / "afile"
    afile.write_text("")
    readonly = tmp_path / "ro"
    readonly.mkdir(mode=0o555)
    # root writes anywhere but in /proc (or a read-only mount)
    unwritable = "/proc/crate_jax_run" if os.geteuid() == 0 else f"{readonly}/run"
    smoke = f"--config={DEMO}:smoke"
    cases = {  # name → (arguments, what the line names, extra Popen arguments)
        "missing config": ([f"--config={tmp_path}/nope.py"], f"{tmp_path}/nope.py", {}),
        "unknown argument": ([f"--config={DEMO}:smoke,bogus"], "'bogus'", {}),
        "empty workdir": ([smoke, "--workdir="], "--workdir is empty", {}),
        "workdir is a file": ([smoke, f"--workdir={afile}"], f"{afile} is a file", {}),
        "unwritable": ([smoke, f"--workdir={unwritable}"], f"{unwritable} cannot be written",
                       {}),
        "every checkpoint damaged": (
            [smoke, f"--workdir={_damaged_run(tmp_path)}"], "none of the 2 checkpoints", {}),
    }
    procs = {name: _main(*args, **kw) for name, (args, _, kw) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, (name, out, err)
        assert "Traceback" not in out + err, (name, err)
        # one error line, the last; warnings (each one line) may come before it
        errors = [line for line in err.splitlines() if line.startswith(("error:", "crate_jax"))]
        assert errors == err.strip().splitlines()[-1:], (name, err)
        assert cases[name][1] in errors[0], (name, err)
    assert os.listdir(readonly) == [] and afile.read_text() == ""
    assert not os.path.exists(unwritable)


def test_sigterm_right_after_start_exits_0_and_writes_nothing(tmp_path):
    """Issue 37 B: the handler is in place a fraction of a second after the interpreter
    starts (before absl and jax load); the signal sent the moment it is (SigCgt of
    /proc/PID/status) ends the run with exit 0 and no workdir."""
    proc = _main(f"--config={DEMO}:smoke", f"--workdir={tmp_path / 'run'}")
    deadline, caught = time.time() + 60, False
    while not caught and time.time() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt"))
        caught = bool(mask & (1 << (signal.SIGTERM - 1)))
        time.sleep(0.002)
    assert caught, "no SIGTERM handler was installed"
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert "nothing was written" in out and not (tmp_path / "run").exists(), out
    assert time.time() - started < 60  # it stops before compiling


def test_atomic_writes_leave_the_old_file_or_none(tmp_path, monkeypatch):
    """Issue 37 C: a write cut by ENOSPC leaves the previous config.json (or none), no
    temporary file, and an OSError naming the file; a cut config.json left by an older
    version is named, not "Expecting value: line 1 column 1"."""
    path = tmp_path / "config.json"
    workdir_files.atomic_write_text(path, '{"a": 1}')

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workdir_files.os, "fsync", full_disk)
    for target in (path, tmp_path / "new.json"):
        with pytest.raises(OSError, match=rf"cannot write {re.escape(str(target))}: No space"):
            workdir_files.atomic_write_text(target, '{"a": 2}')
    assert sorted(os.listdir(tmp_path)) == ["config.json"] and path.read_text() == '{"a": 1}'
    path.write_text("")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is empty"):
        workdir_files.read_json(path)


def test_a_full_disk_stops_the_log_file_quietly(tmp_path, capsys):
    """Issue 37 C: /dev/full answers every write with ENOSPC; one warning, not a
    "--- Logging error ---" traceback per record."""
    handler = logfile.DeferredFileHandler()
    handler.open("/dev/full")
    for i in range(20):
        handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, f"record {i}", (), None))
    err = capsys.readouterr().err
    assert "Logging error" not in err and err.count("\n") == 1, err
    assert "the log file /dev/full can no longer be written" in err
    handler.close()


@pytest.fixture(scope="module")
def nan_then_corrected(tmp_path_factory):
    """A start that hits a NaN before its first checkpoint (optim.eps=0), then the corrected
    command in the same workdir: a plain 4-step run that saves every step."""
    workdir = tmp_path_factory.mktemp("nan")
    with pytest.raises(FloatingPointError) as failure:
        train_and_evaluate(smoke_config(**{"optim.eps": 0.0, "checkpoint.every": 1}),
                           str(workdir))
    config = smoke_config(**{"checkpoint.every": 1, "checkpoint.keep": 10})
    final = train_and_evaluate(config, str(workdir))
    return workdir, str(failure.value), final


def test_a_nan_without_checkpoint_accepts_the_corrected_command(nan_then_corrected):
    """Issue 37 E: no checkpoint was saved, so the corrected config is taken."""
    workdir, message, final = nan_then_corrected
    assert "No checkpoint was saved" in message and "higher optim.eps" in message
    assert final["step"] == 4
    assert json.loads((workdir / "config.json").read_text())["optim"]["eps"] == 1e-8


def test_a_changed_lr_on_resume_names_the_override_and_it_works(nan_then_corrected, tmp_path):
    """Issue 37 E and F: resuming with a lower optim.lr is refused with the exact flag that
    lets it through; with that flag the run resumes, after taking over the stale lock a
    killed predecessor on this host left."""
    workdir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(nan_then_corrected[0]), str(workdir)], check=True)
    changed = {"optim.lr": 1e-4, "total_steps": 5}
    with pytest.raises(ValueError) as refused:
        train_and_evaluate(smoke_config(**changed), str(workdir))
    assert "add --config.resume_overrides=optim.lr" in str(refused.value)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (workdir / "lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid,
                                              "started": "then", "token": "old"}))
    final = train_and_evaluate(smoke_config(**changed, resume_overrides="optim.lr"),
                               str(workdir))
    assert final["step"] == 5 and not (workdir / "lock").exists()
    with pytest.raises(ValueError, match=r"model\.name cannot change on resume"):
        train_and_evaluate(smoke_config(resume_overrides="model.name"), str(workdir))


def test_enospc_at_a_save_is_one_line_and_the_rerun_resumes_exactly(
        nan_then_corrected, tmp_path, monkeypatch):
    """Issue 37 C: the save of step 3 hits a full disk: the run ends naming the directory
    and the last good step (2), leaves no temporary folder, and the same command, once space
    is free, resumes from step 2 to the parameters of the run that never failed."""
    workdir = tmp_path / "run"
    save = checkpoint_module.DataStateHandler.save

    def full_disk(self, directory, args):
        if "3.orbax-checkpoint-tmp" in str(directory.parent):
            path = directory / "process_0-of-1.json"
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(self, directory, args)

    monkeypatch.setattr(checkpoint_module.DataStateHandler, "save", full_disk)
    config = smoke_config(**{"checkpoint.every": 1, "checkpoint.keep": 10,
                             "checkpoint.async_save": True})
    with pytest.raises(RunFailed) as failure:
        train_and_evaluate(config, str(workdir))
    message = str(failure.value)
    assert f"saving the checkpoint of step 3 in {workdir / 'checkpoints'} failed" in message
    assert "No space left on device" in message and "last good checkpoint is step 2" in message
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert not (workdir / "lock").exists()
    monkeypatch.setattr(checkpoint_module.DataStateHandler, "save", save)
    assert train_and_evaluate(config, str(workdir))["step"] == 4
    reference = final_params(str(nan_then_corrected[0]))
    resumed = final_params(str(workdir))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_second_trainer_is_refused_before_writing(tmp_path):
    """Issue 37 F: a live lock (this process, fresh) refuses a second trainer with the same
    config and with another one, naming the holder, and nothing is written."""
    workdir = tmp_path / "run"
    holder = WorkdirLock(str(workdir))
    holder.acquire()
    try:
        for updates in ({}, {"optim.lr": 5e-4}):
            with pytest.raises(RunFailed, match=rf"another trainer holds {workdir}/lock \(host "
                                                rf"\S+, pid {os.getpid()}, started "):
                train_and_evaluate(smoke_config(**updates), str(workdir))
        assert os.listdir(workdir) == ["lock"]
    finally:
        holder.release()
    assert os.listdir(workdir) == []


STALE_S = 4.0


def exercise_lock(workdir: str) -> None:
    """Issue 37 F, on any storage (a local path here, gs:// in test_gcs.py): a live lock is
    refused and kept fresh by its heartbeat; once its holder stops refreshing it goes stale
    and is taken over; the old holder's release then leaves the new holder's lock alone."""
    # stale_s is 16 heartbeats: wide enough that a loaded machine (the suite on 2 cores, the
    # GCS emulator answering slowly) never lets a live lock look stale; at 1.5 s it once did.
    first = WorkdirLock(workdir, refresh_s=0.25, stale_s=STALE_S)
    first.acquire()
    second = WorkdirLock(workdir, refresh_s=0.25, stale_s=STALE_S)
    holder = rf"another trainer holds {re.escape(workdir)}/lock \(host \S+, pid {os.getpid()}"
    with pytest.raises(RunFailed, match=holder):
        second.check()
    time.sleep(STALE_S + 1.0)  # longer than stale_s: only the heartbeat keeps it live
    with pytest.raises(RunFailed, match=holder):
        second.acquire()
    first._stop.set()  # the holder freezes (a killed job on another host): no more beats
    first._thread.join()
    time.sleep(STALE_S + 0.5)
    second.check()
    second.acquire()
    first.release()
    with pytest.raises(RunFailed, match=holder):
        WorkdirLock(workdir, stale_s=STALE_S).check()
    second.release()
    WorkdirLock(workdir).check()  # released: free


def test_the_lock_on_a_local_disk(tmp_path):
    exercise_lock(str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run") == []


_WANDB_RUN = """
import sys, time
from crate_jax.train.metrics import MetricWriter
writer = MetricWriter(sys.argv[1], tensorboard=False, wandb_project="crate-test")
writer.write(1, {"train/loss": 1.0})
print(writer._wandb.id, flush=True)
time.sleep(600)  # killed here, without finish()
"""


def test_wandb_resumes_the_same_run_after_a_kill(tmp_path, monkeypatch):
    """Issue 37 G, offline (no network): a writer killed by SIGKILL, then the restart's
    writer: one wandb run id, kept in WORKDIR/wandb_run_id and passed back to wandb.init."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    killed = subprocess.Popen([sys.executable, "-c", _WANDB_RUN, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    first_id = killed.stdout.readline().strip()
    killed.kill()
    killed.wait()
    from crate_jax.train.metrics import MetricWriter
    writer = MetricWriter(tmp_path, tensorboard=False, wandb_project="crate-test")
    second_id = writer._wandb.id
    writer.write(2, {"train/loss": 0.5})
    writer.close()
    assert first_id and first_id == second_id == (tmp_path / "wandb_run_id").read_text()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>; wandb adds -1 to the second folder when both start within
    # the same second
    named = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{first_id}(-\d+)?")
    assert len(runs) == 2 and all(named.fullmatch(name) for name in runs), runs
