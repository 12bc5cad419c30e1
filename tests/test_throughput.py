"""Throughput figures are true for the global batch: the FLOPs per example the trainer
reports come from the train step it compiles anyway, and do not depend on how many devices
the step is split over (XLA's cost analysis of a sharded program is per device)."""

import os

import pytest

from crate_jax.train.metrics import Throughput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flops_per_example(devices: int) -> float:
    """The FLOPs per example the trainer reports (crate_jax.train.loop._header: the step's
    jaxpr FLOPs over the global batch) for the classification smoke run on `devices`."""
    import jax

    from crate_jax.config_check import load_config
    from crate_jax.parallel import make_mesh
    from crate_jax.train.state import build_train_state

    config = load_config(f"{ROOT}/configs/demo_classification.py:smoke")
    mesh = make_mesh({"fsdp": devices}, jax.devices()[:devices])
    state = build_train_state(config, mesh)
    with jax.set_mesh(mesh):
        _, _, flops = state.compile(count_flops=True)  # what train_and_evaluate reports
    assert dict(mesh.shape)["fsdp"] == devices  # the step really is sharded
    return flops / config.batch_size


def test_flops_per_example_on_8_devices_equal_the_1_device_figure():
    one, eight = _flops_per_example(1), _flops_per_example(8)
    assert one > 0
    # counted on the traced program of the global batch: a per-device figure (the old bug,
    # from XLA's cost analysis of the sharded program) would be 8x smaller
    assert eight == pytest.approx(one, rel=1e-6), (one, eight)


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
