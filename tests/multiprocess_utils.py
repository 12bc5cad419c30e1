"""Helpers for tests that run the trainer as 2 processes × 4 fake CPU devices joined by
jax.distributed (launch/local/multiprocess.sh) next to a plain 1 process × 8 devices run of
the same command, and compare what the two wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "local", "multiprocess.sh")
PROCESSES, DEVICES = 2, 4
# Less XLA:CPU optimisation and the older (quicker to compile) fusion emitters: the same
# numerics in every run that uses them, about half the compile time of the defaults (a cold
# compilation cache: demo.py:smoke on 8 devices took 15.0 CPU-s, 9.1 with a warm one).
# conftest.py gives the in-process tests the same flags.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")
QUIET = ("--config.checkpoint.async_save=False", "--config.measure_flops=False",
         "--config.tensorboard=False")


def env(**updates) -> dict:
    """This environment without any launcher's distributed settings, on the CPU."""
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                "SLURM_", "OMPI_", "CRATE_"))}
    out.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **updates)
    return out


class IndexSource:
    """A random-access source of n examples {'index': i}, to follow examples through a
    pipeline."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import numpy as np
        return {"index": np.int32(i)}


def metrics(workdir) -> dict[int, dict]:
    """metrics.jsonl of a run, merged per step."""
    out: dict[int, dict] = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(row)
    return out


class Pair:
    """One command run twice at once: 2 processes × 4 devices in BASE/NAME/two_processes
    and 1 process × 8 devices in BASE/NAME/one_process (with reference=False, only the
    first: a check of what the 2-process run itself does)."""

    def __init__(self, base: Path, name: str, args: list[str], timeout: float = 400,
                 reference: bool = True):
        self.dir = base / name
        self.multi, self.single = self.dir / "two_processes", self.dir / "one_process"
        self.logdir, self.timeout = self.dir / "logs", timeout
        self.procs = [
            subprocess.Popen(
                ["bash", SCRIPT, f"--processes={PROCESSES}", f"--devices={DEVICES}",
                 "--no-follow", f"--python={sys.executable}", f"--timeout={int(timeout) - 10}",
                 f"--logdir={self.logdir}", "--", *args, f"--workdir={self.multi}"],
                cwd=ROOT, env=env(XLA_FLAGS=FAST_COMPILE), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)]
        if reference:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "crate_jax.main", *args, f"--workdir={self.single}"],
                cwd=ROOT, env=env(XLA_FLAGS=(f"--xla_force_host_platform_device_count="
                                             f"{PROCESSES * DEVICES} {FAST_COMPILE}")),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def wait(self) -> Pair:
        """Both runs finished with exit 0, or an AssertionError with their output."""
        outputs = []
        try:
            for proc in self.procs:
                outputs.append(proc.communicate(timeout=self.timeout)[0])
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        logs = "".join(f"\n--- {p.name} ---\n" + p.read_text()[-4000:]
                       for p in sorted(self.logdir.glob("process_*.log")))
        for proc, out in zip(self.procs, outputs, strict=True):
            assert proc.returncode == 0, f"{self.dir.name}: {out[-4000:]}{logs}"
        return self

    def log(self, process: int) -> str:
        """What process `process` of the 2-process run printed, and the library log files it
        wrote in its workdir (WORKDIR/logs/*_{process}.log), if any."""
        files = [self.logdir / f"process_{process}.log",
                 *sorted((self.multi / "logs").glob(f"*_{process}.log"))]
        return "".join(path.read_text() for path in files)


def wait_for_checkpoint(workdir, proc, minimum: int = 4, timeout: float = 240) -> int:
    """The newest checkpoint step of a running trainer once it is ≥ `minimum` (fails if the
    process ends first, with its output)."""
    import time
    deadline = time.time() + timeout
    directory = os.path.join(workdir, "checkpoints")
    while time.time() < deadline:
        steps = [int(d) for d in (os.listdir(directory) if os.path.isdir(directory) else [])
                 if d.isdigit()]
        if steps and max(steps) >= minimum:
            return max(steps)
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise TimeoutError("no checkpoint appeared")


def assert_runs_match(pair: Pair, eval_prefixes: tuple[str, ...], steps: int = 4,
                      logged_steps: tuple[int, ...] | None = None) -> dict:
    """The 2-process and 1-process runs of `pair` logged the same losses and gradient norms at
    `logged_steps` (default: 2 and `steps`), and the same evaluation metrics (every prefix
    present) at `steps`; returns the final metrics of the 2-process run."""
    for i in range(2):
        assert f"jax.distributed: process {i} of 2, 4 local / 8 global devices" in pair.log(i)
    m, s = metrics(pair.multi), metrics(pair.single)
    logged = sorted(k for k, v in m.items() if "train/loss" in v)
    want = list(logged_steps or (2, steps))
    assert logged == want == sorted(k for k, v in s.items() if "train/loss" in v)
    for step in logged:
        for key in ("train/loss", "train/grad_norm"):
            np.testing.assert_allclose(m[step][key], s[step][key], rtol=1e-5,
                                       err_msg=f"{pair.dir.name}: {key} at step {step}")
    evals = {k for k in s[steps] if k.startswith(eval_prefixes)}
    for prefix in eval_prefixes:  # every evaluator ran
        assert any(k.startswith(prefix) for k in evals), (prefix, sorted(s[steps]))
    assert evals == {k for k in m[steps] if k.startswith(eval_prefixes)}
    for key in sorted(evals):
        np.testing.assert_allclose(m[steps][key], s[steps][key], rtol=1e-5, atol=1e-7,
                                   err_msg=f"{pair.dir.name}: {key}")
    return m[steps]


def child_pids(parent: int) -> set[int]:
    """The processes whose parent is `parent` (started by any of its threads), zombies
    included. Read from every /proc/PID/stat rather than /proc/PARENT/task/*/children: a
    thread can end between the listing of its task folder and the reading of its children
    file (FileNotFoundError), and its children then move to another thread. A process that
    ends while /proc is read is left out."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # the command name (field 2) is in parentheses and may hold spaces: split after it
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            pids.add(int(entry))
    return pids
