"""Throughput figures are true for the global batch: the FLOPs per example the trainer
reports come from the train step it compiles anyway, and do not depend on how many devices
the step is split over (XLA's cost analysis of a sharded program is per device)."""

import os
import re
import subprocess
import sys

import pytest
from multiprocess_utils import FAST_COMPILE

from crate_jax.train.metrics import Throughput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reported_gflops(tmp_path, devices: int) -> float:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                                       f"{FAST_COMPILE}")
    out = subprocess.run(
        [sys.executable, "-m", "crate_jax.main",
         f"--config={ROOT}/configs/demo_classification.py:smoke",
         f"--workdir={tmp_path}/run_{devices}", "--config.total_steps=1",
         "--config.eval_every=0", "--config.measure_flops=True"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    found = re.search(r"([0-9.eE+-]+) GFLOPs/example/step", out.stdout)
    assert found, out.stdout
    assert f"'fsdp': {devices}" in out.stdout, out.stdout  # the step really was sharded
    return float(found.group(1))


def test_flops_per_example_on_8_devices_equal_the_1_device_figure(tmp_path):
    one, eight = _reported_gflops(tmp_path, 1), _reported_gflops(tmp_path, 8)
    assert one > 0
    # the sharded program adds only a few collective/bookkeeping ops; a per-device figure
    # (the old bug) would be 8x smaller
    assert eight == pytest.approx(one, rel=0.1), (one, eight)


def test_throughput_divides_global_flops_by_devices_once(monkeypatch):
    import jax

    clock = iter([0.0, 2.0])
    monkeypatch.setattr("crate_jax.train.metrics.time.perf_counter", lambda: next(clock))
    meter = Throughput(batch_size=64, flops_per_step=8e12, total_steps=10, start_step=0)
    line = meter.measure(step=2)  # 1 s per step
    devices = jax.device_count()
    assert line["perf/tflops_per_device"] == pytest.approx(8.0 / devices)
    assert line["perf/examples_per_s"] == pytest.approx(64.0)
    assert line["perf/eta_s"] == pytest.approx(8.0)
