"""launch/gpu/slurm.sbatch under a simulated SLURM allocation of 2 "nodes" on this machine.

The script runs as sbatch runs it (bash, SLURM_JOB_* variables of a 2-node job, the README's
CRATE_CONFIG / CRATE_WORKDIR), with tests/fake_slurm/ first on PATH: its `srun` starts one
local process per node with the variables srun gives each task (SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS, SLURM_STEP_NODELIST, ...), its `nvidia-smi -L` lists 2 GPUs, and each process
has 2 fake CPU devices. No JAX_COORDINATOR_ADDRESS is set: jax.distributed must find the
coordinator as on a cluster, from SLURM's variables (jax/_src/clusters/slurm_cluster.py: the
first host of SLURM_STEP_NODELIST, port 61440 + SLURM_JOB_ID mod 4096), and the script must
set mesh.dcn to the number of nodes (on GPUs every host is a slice; see the script).

The README's config (configs/clipa_l14.py, in smoke mode: a contrastive run) trains 2 steps,
then the same job submitted again with total_steps=4 resumes from step 2 on both processes.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys

import pytest
from multiprocess_utils import FAST_COMPILE, QUIET, ROOT, env

SCRIPT = os.path.join(ROOT, "launch", "gpu", "slurm.sbatch")
FAKE_SLURM = os.path.join(ROOT, "tests", "fake_slurm")
NODES, DEVICES = 2, 2
TIMEOUT = 400  # each submission; about a minute on an idle 2-core machine
# jax's SLURM coordinator port: 61440 + SLURM_JOB_ID mod 4096 (slurm_cluster.py)
PORT_BASE, PORT_SPAN = 65535 - 2**12 + 1, 2**12


def _free_job_id() -> int:
    """A job id whose coordinator port (as jax derives it) is free on this machine."""
    for _ in range(100):
        job_id = random.randrange(10_000, 10_000_000)
        port = PORT_BASE + job_id % PORT_SPAN
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in jax's SLURM coordinator range")


def _submit(workdir, job_id: int, *args: str) -> str:
    """`sbatch --nodes=2 launch/gpu/slurm.sbatch ARGS` as SLURM would run the batch script."""
    job_env = env(
        PATH=os.pathsep.join([FAKE_SLURM, os.environ["PATH"]]),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES} {FAST_COMPILE}",
        JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        FAKE_GPUS=str(DEVICES), PYTHON=sys.executable, CRATE_CONFIG="configs/clipa_l14.py:smoke",
        CRATE_WORKDIR=str(workdir), SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NUM_NODES=str(NODES), SLURM_NNODES=str(NODES),
        SLURM_JOB_NODELIST="127.0.0.1,localhost")  # two names of this machine: two "nodes"
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=workdir.parent, env=job_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm") / "run"
    common = ("--config.optim.total_steps=4", "--config.log_every=2", *QUIET)
    first = _submit(workdir, _free_job_id(), "--config.total_steps=2", *common)
    second = _submit(workdir, _free_job_id(), "--config.total_steps=4", *common)
    return workdir, first, second


def test_tasks_join_through_slurm_variables(job):
    _, first, second = job
    for out in (first, second):
        assert f"on {NODES} nodes (127.0.0.1,localhost): configs/clipa_l14.py:smoke" in out
        for task in range(NODES):  # the stand-in nvidia-smi's GPUs, all given to the task
            gpus = ",".join(map(str, range(DEVICES)))
            assert f"task {task} on {socket.gethostname()}: GPUs {gpus}" in out, out[-3000:]
            assert (f"jax.distributed: process {task} of {NODES}, {DEVICES} local / "
                    f"{NODES * DEVICES} global devices") in out, out[-3000:]


def test_mesh_has_one_dcn_entry_per_node(job):
    workdir, first, _ = job
    config = json.loads((workdir / "config.json").read_text())
    assert config["mesh"] == {"dcn": NODES, "data": 1, "fsdp": -1, "tensor": 1}
    # the 8 devices: 2 nodes along dcn, each node's 4 along fsdp
    assert f"mesh {{'dcn': {NODES}, 'data': 1, 'fsdp': {DEVICES}, 'tensor': 1}}" in first


def test_resubmitted_job_resumes_on_every_task(job):
    workdir, first, second = job
    assert re.search(r"^final: .*\bstep 2\.0000,", first, flags=re.M), first[-3000:]
    assert second.count(f"resumed from step 2 in {workdir}") == NODES, second[-3000:]
    assert re.search(r"^final: .*\bstep 4\.0000,", second, flags=re.M), second[-3000:]
    steps = sorted(json.loads(line)["step"]
                   for line in (workdir / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in line)
    assert steps == [2, 4]
    data = workdir / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == [
        f"process_{i}-of-{NODES}.json" for i in range(NODES)]


class _Gpu:
    """A stand-in for a GPU of a multi-node run: what make_mesh reads. XLA numbers the
    slices by host (boot id), so slice_index = node."""

    def __init__(self, id: int, node: int):
        self.id, self.slice_index, self.process_index = id, node, node
        self.platform, self.device_kind = "gpu", "NVIDIA H100 80GB HBM3"


def test_the_readme_four_node_job_gets_one_dcn_entry_per_node():
    """`sbatch --nodes=4` with 8 GPUs a node: the script's mesh.dcn=4 puts each node's GPUs on
    one fsdp row; the configs' own dcn=1 would be refused, naming the setting."""
    from crate_jax import parallel

    gpus = [_Gpu(i, i // 8) for i in range(32)]
    mesh = parallel.make_mesh({"dcn": 4, "data": 1, "fsdp": -1, "tensor": 1}, devices=gpus)
    assert dict(mesh.shape) == {"dcn": 4, "data": 1, "fsdp": 8, "tensor": 1}
    for node in range(4):
        assert {d.slice_index for d in mesh.devices[node].flat} == {node}
    with pytest.raises(ValueError, match=r"mesh.dcn=1, but the 32 devices span 4 slice.*"
                                         r"set mesh.dcn=4"):
        parallel.make_mesh({"dcn": 1, "data": 1, "fsdp": -1, "tensor": 1}, devices=gpus)


def test_missing_workdir_is_named_before_anything_starts(tmp_path):
    job_env = env(PATH=os.pathsep.join([FAKE_SLURM, os.environ["PATH"]]),
                  CRATE_CONFIG="configs/clipa_l14.py", SLURM_JOB_ID="1",
                  SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,localhost")
    out = subprocess.run(["bash", SCRIPT], cwd=tmp_path, env=job_env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode != 0 and "CRATE_WORKDIR" in out.stderr, out.stderr
    assert "task 0" not in out.stdout + out.stderr  # srun never ran
