"""Throughput figures are true, and each is what its name says.

Model FLOPs (3 × the forward of the global batch; MFU's numerator) do not depend on the remat
policy, on gradient accumulation or on how many devices the step is split over; hardware FLOPs
(what the compiled step runs; HFU's numerator) grow with remat's recomputation and with
feature-cached accumulation's second forward pass. The counting rules themselves are checked on
small programs whose FLOPs are counted by hand."""

import os

import jax
import jax.numpy as jnp
import pytest

from crate_jax import perf
from crate_jax.train.metrics import Throughput, progress_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(config_name: str, devices: int = 1, **settings):
    """(config, the trainer's TrainState) of a smoke config on `devices` devices, with
    `settings` set ('model.overrides.remat' and the like)."""
    from crate_jax.config_check import load_config
    from crate_jax.parallel import make_mesh
    from crate_jax.train.state import build_train_state

    config = load_config(f"{ROOT}/configs/{config_name}:smoke")
    with config.unlocked():
        for key, value in settings.items():
            *parents, leaf = key.split(".")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
    mesh = make_mesh({"fsdp": devices}, jax.devices()[:devices])
    return config, mesh, build_train_state(config, mesh)


def _counts(config_name: str, **settings) -> perf.StepFlops:
    """Model and hardware FLOPs of one step, hardware counted on the traced step."""
    _, mesh, state = _state(config_name, **settings)
    with jax.set_mesh(mesh):
        return perf.StepFlops(model=state.model_flops(),
                              hardware=perf.jaxpr_flops(state.trace().jaxpr))


def test_flops_per_example_on_8_devices_equal_the_1_device_figure():
    per_example = {}
    for devices in (1, 8):
        config, mesh, state = _state("demo_classification.py", devices)
        with jax.set_mesh(mesh):
            _, _, flops = state.compile(count_flops=True)  # what train_and_evaluate reports
        assert dict(mesh.shape)["fsdp"] == devices  # the step really is sharded
        per_example[devices] = (flops.model / config.batch_size,
                                flops.hardware / config.batch_size)
    one, eight = per_example[1], per_example[8]
    assert one[0] > 0 and one[1] > 0
    # counted on the traced program of the global batch: a per-device figure (the old bug,
    # from XLA's cost analysis of the sharded program) would be 8x smaller
    assert eight == pytest.approx(one, rel=1e-6), (one, eight)


def test_model_flops_are_three_forward_passes_of_the_model():
    """The classification model's own forward FLOPs on the global batch, counted apart: the
    model FLOPs of the step are 3 × those (plus the loss's few elementwise operations)."""
    from flax import nnx

    config, mesh, state = _state("demo_classification.py")
    model = nnx.eval_shape(lambda: state.task.build_model(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    side = model.cfg.image_size
    images = jax.ShapeDtypeStruct((config.batch_size, side, side, 3), jnp.float32)
    forward = perf.traced_flops(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, images)
    with jax.set_mesh(mesh):
        flops = state.model_flops()
    assert 3 * forward <= flops < 1.01 * 3 * forward, (flops, forward)


def test_remat_changes_hardware_flops_not_model_flops():
    counts = {remat: _counts("demo_classification.py", **{"model.overrides.remat": remat})
              for remat in ("none", "minimal", "full")}
    models = {r: c.model for r, c in counts.items()}
    assert models["none"] == models["minimal"] == models["full"], models
    hardware = {r: c.hardware for r, c in counts.items()}
    # 'minimal' recomputes norms and activations (no matmul); 'full' the whole forward
    assert hardware["none"] <= hardware["minimal"] < hardware["full"], hardware
    assert hardware["full"] > 1.2 * hardware["none"], hardware
    # without remat the step runs about what the model needs (3 × forward is a convention:
    # the stem needs no input gradient, an elementwise backward costs less than 2 forwards)
    assert hardware["none"] == pytest.approx(models["none"], rel=0.1), (hardware, models)


def test_feature_cached_accumulation_counts_each_example_once():
    """Contrastive accumulation over 4 micro-batches runs every micro-batch's forward pass
    twice (features, then their backward pass): more hardware FLOPs, the same model FLOPs as
    the whole batch in one pass."""
    one = _counts("demo.py", batch_size=32)
    four = _counts("demo.py", batch_size=32, grad_accum_steps=4)
    assert four.model == pytest.approx(one.model, rel=1e-9), (four, one)
    assert four.hardware > 1.2 * one.hardware, (four, one)


def test_a_frozen_tower_counts_one_forward_pass():
    """Freezing the text tower takes its backward pass out of the model FLOPs: 2 × its
    forward FLOPs fewer (the text forward counted apart, on the batch's tokens)."""
    from flax import nnx

    _, mesh, state = _state("demo.py", batch_size=32)
    _, mesh, frozen = _state("demo.py", batch_size=32, freeze=("text",))
    with jax.set_mesh(mesh):
        trained, fixed = state.model_flops(), frozen.model_flops()
    model = nnx.eval_shape(lambda: state.task.build_model(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model.text, nnx.Param, ...)
    tokens = state.example_batch()["tokens"]
    text = perf.traced_flops(lambda p, t: nnx.merge(graphdef, p, rest)(t), params,
                             jax.ShapeDtypeStruct(tokens.shape, tokens.dtype))
    assert trained - fixed == pytest.approx(2 * text, rel=0.02), (trained, fixed, text)


def test_model_flops_count_trained_operations_three_times():
    """By hand: x·c (2·4·8·8 = 512) depends on no trained input: once; (x·c)·w (512) and the
    sum (32 inputs) do: three times; the same again behind a stop_gradient: once."""
    w, c, x = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((8, 8), (8, 8), (4, 8)))

    def loss(w, c, x):
        return jnp.sum((x @ c) @ w)

    jaxpr = jax.jit(loss).trace(w, c, x).jaxpr
    assert perf.jaxpr_flops(jaxpr) == 512 + 512 + 32
    assert perf.model_flops(jaxpr, [True, False, False]) == 512 + 3 * (512 + 32)
    assert perf.model_flops(jaxpr, [False, False, False]) == 512 + 512 + 32

    def stopped(w, c, x):
        return jnp.sum(jax.lax.stop_gradient((x @ c) @ w) @ c)

    jaxpr = jax.jit(stopped).trace(w, c, x).jaxpr
    assert perf.model_flops(jaxpr, [True, False, False]) == 512 + 3 * 512 + 512 + 32


def test_model_flops_follow_a_loop_carry_that_becomes_trained():
    """A scan whose carry starts as data and passes through w: the carry depends on w from
    the first iteration's output on, so every iteration's matmul (512) counts 3 ×; a carry
    that only ever meets c stays untrained (once), and only what follows it counts 3 ×."""
    w, c, x = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((8, 8), (8, 8), (4, 8)))

    def through_w(w, c, x):
        return jax.lax.scan(lambda z, _: (z @ w, None), x, None, length=5)[0].sum()

    def through_c(w, c, x):
        z = jax.lax.scan(lambda z, _: (z @ c, None), x, None, length=5)[0]
        return (z @ w).sum()

    jaxpr = jax.jit(through_w).trace(w, c, x).jaxpr
    assert perf.model_flops(jaxpr, [True, False, False]) == 3 * (5 * 512 + 32)
    jaxpr = jax.jit(through_c).trace(w, c, x).jaxpr
    assert perf.model_flops(jaxpr, [True, False, False]) == 5 * 512 + 3 * (512 + 32)


def test_matmul_shapes_of_a_scanned_attention():
    """The dot_generals as batched matmuls (batch, m, k, n), with the scan's multiplicity."""
    q = jax.ShapeDtypeStruct((2, 5, 3, 4), jnp.float32)  # (B, N, K, p)

    def attention(q):
        def layer(z, _):
            logits = jnp.einsum("bqhd,bkhd->bhqk", z, z)  # (B, K, N, N)
            # (B, K, N, N)·(B, N, K, p): batch (B, K), contract the keys; out (B, K, N, p)
            out = jax.lax.dot_general(logits, z, (((3,), (1,)), ((0, 1), (0, 2))))
            return jnp.swapaxes(out, 1, 2), None
        return jax.lax.scan(layer, q, None, length=7)[0]

    shapes = perf.matmul_shapes(jax.jit(attention).trace(q).jaxpr)
    assert shapes == {perf.MatmulShape(6, 5, 4, 5, "float32"): 7,
                      perf.MatmulShape(6, 5, 5, 4, "float32"): 7}
    assert sum(s.flops * n for s, n in shapes.items()) == perf.jaxpr_flops(
        jax.jit(attention).trace(q).jaxpr)


def test_throughput_names_model_and_hardware_rates_and_utilisations(monkeypatch):
    clock = iter([0.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    monkeypatch.setattr("crate_jax.train.metrics.time.perf_counter", lambda: next(clock))
    monkeypatch.setattr(perf, "peak_flops", lambda device=None: 10e12)
    meter = Throughput(batch_size=64, flops=perf.StepFlops(model=8e12, hardware=12e12),
                       total_steps=10, start_step=0)
    line = meter.measure(step=2)  # 1 s per step
    devices = jax.device_count()
    assert line["perf/model_tflops_per_device"] == pytest.approx(8.0 / devices)
    assert line["perf/hardware_tflops_per_device"] == pytest.approx(12.0 / devices)
    assert line["perf/mfu"] == pytest.approx(0.8 / devices)
    assert line["perf/hfu"] == pytest.approx(1.2 / devices)
    assert line["perf/examples_per_s"] == pytest.approx(64.0)
    assert line["perf/eta_s"] == pytest.approx(8.0)
    text = progress_line(2, 10, line)
    assert f"model {8.0 / devices:.2f} TFLOP/s/dev" in text
    assert f"hardware {12.0 / devices:.2f} TFLOP/s/dev" in text
    assert f"MFU {80 / devices:.1f}%" in text and f"HFU {120 / devices:.1f}%" in text
    small = {"perf/examples_per_s": 1.0, "perf/step_time_s": 1.0, "perf/eta_s": 0.0,
             "perf/model_tflops_per_device": 0.00133, "perf/hardware_tflops_per_device": 0.5}
    text = progress_line(1, 1, small)  # a CPU's rates read in GFLOP/s, not "0.00 TFLOP/s"
    assert "model 1.33 GFLOP/s/dev" in text and "hardware 500 GFLOP/s/dev" in text
    # no FLOPs measured (measure_flops=False): no rate and no utilisation at all
    unmeasured = Throughput(batch_size=64, flops=None, total_steps=10, start_step=0)
    assert not any("flop" in k or k in ("perf/mfu", "perf/hfu") for k in
                   unmeasured.measure(step=1))
    assert "perf/step_memory_mib" not in line  # no plan given: none logged
    planned = Throughput(batch_size=64, flops=None, total_steps=10, start_step=0,
                         memory_bytes=3 * 2**20)
    assert planned.measure(step=1)["perf/step_memory_mib"] == 3.0


def test_planned_peak_counts_a_donated_output_once():
    """The plan's peak: inputs + temporaries + the outputs that do not overwrite an input. A
    donated input updated in place adds nothing; without donation the output is new."""
    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    kept = jax.jit(lambda a: a + 1.0).lower(x).compile()
    donated = jax.jit(lambda a: a + 1.0, donate_argnums=0).lower(x).compile()
    size = 256 * 256 * 4
    assert perf.planned_peak_bytes(kept) >= 2 * size
    assert perf.planned_peak_bytes(kept) - perf.planned_peak_bytes(donated) == size
