"""The scanned layer stack: the same function as the unrolled one, remat inside the scan,
DropPath per layer; and the step benchmark (benchmarks/model_step.py) as a user runs it."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import randomize

from crate_jax import models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import model_step

TINY = dict(width=32, depth=3, heads=4, image_size=16, num_classes=5)


def _images(batch=2):
    return jnp.asarray(np.random.default_rng(0).normal(size=(batch, 16, 16, 3)), jnp.float32)


def _loss_and_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(_images()) ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)  # one program, not op-by-op dispatch


@pytest.mark.parametrize("name", ["crate-alpha-ti/8"])
def test_scanned_and_unrolled_layers_compute_the_same(name):
    scanned = models.create(name, **TINY)
    randomize(scanned, 3)
    unrolled = models.create(name, **TINY, scan_layers=False)
    nnx.update(unrolled, nnx.state(scanned, nnx.Param))
    (l1, g1), (l2, g2) = _loss_and_grads(scanned), _loss_and_grads(unrolled)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_remat_inside_the_scan_changes_the_compiled_memory():
    temps = {}
    for remat in ("none", "minimal", "dots", "full"):
        abstract = nnx.eval_shape(lambda remat=remat: models.create(
            "crate-alpha-ti/8", width=64, depth=4, heads=2, image_size=32, num_classes=0,
            remat=remat))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        images = jax.ShapeDtypeStruct((64, 32, 32, 3), jnp.float32)

        def loss(p, x, graphdef=graphdef, rest=rest):
            return nnx.merge(graphdef, p, rest)(x).sum()

        compiled = jax.jit(jax.grad(loss)).lower(params, images).compile()
        temps[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temps["none"] > 1.2 * temps["dots"] > 1.2 * 1.2 * temps["full"], temps
    # 'minimal' keeps the matmul products (sparse codes, projections) and recomputes the
    # rest: 34 MB → 22 MB here (16 MB without the suite's quick-compile flags)
    assert temps["none"] > 1.3 * temps["minimal"] > 1.3 * 1.2 * temps["full"], temps


def _compiled_matmuls(name: str, remat: str) -> int:
    """The matmuls (dot instructions) of the compiled gradient of a small model."""
    sizes = dict(width=64, depth=2, heads=2)  # small: each model compiles three gradients
    sizes.update(dict(decoder_width=64, decoder_depth=2, decoder_heads=2)
                 if name.startswith("crate-mae") else dict(num_classes=10))
    model = models.create(name, image_size=32, remat=remat, **sizes)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    images = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)

    def loss(p, x):
        out = nnx.merge(graphdef, p, rest)(x)  # the autoencoder returns several arrays
        return sum(jnp.sum(o) for o in jax.tree.leaves(out)
                   if jnp.issubdtype(o.dtype, jnp.floating))

    hlo = jax.jit(jax.grad(loss)).lower(params, images).compile().as_text()
    return hlo.count(" dot(")


@pytest.mark.parametrize("name", ["crate-alpha-ti/8", "crate-t/8", "vit-ti/16", "crate-mae-t/8"])
def test_minimal_remat_recomputes_no_matmul(name):
    # The default policy saves what each matmul produces (and the codes whose ReLU masks the
    # backward needs): its gradient has exactly the matmuls of 'none', where 'full' adds the
    # forward's again. A name lost inside a custom_jvp (the ReLU's mask read from its input)
    # once made it recompute X·D, one (N, C·d) matmul per layer.
    none = _compiled_matmuls(name, "none")
    assert _compiled_matmuls(name, "minimal") == none
    assert _compiled_matmuls(name, "full") > none


def test_drop_path_rises_per_layer_and_is_off_in_eval():
    model = models.create("crate-alpha-ti/8", **TINY, drop_path_rate=0.5)
    assert model.encoder.drop_rates == pytest.approx((0.0, 0.25, 0.5))
    x = _images(16)
    model.train()
    nnx.reseed(model, dropout=1)
    a = model(x)
    nnx.reseed(model, dropout=2)
    b = model(x)
    assert not np.allclose(a, b)  # a different draw of dropped branches
    model.eval()
    plain = models.create("crate-alpha-ti/8", **TINY)
    nnx.update(plain, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(model(x), plain(x), rtol=1e-5, atol=1e-6)


def test_step_benchmark_prints_model_and_hardware_rates_against_the_matmul_rate():
    """`model_step.py` as a user runs it, on a tiny model: both FLOP rates, the matmul rate
    at the step's shapes and the fraction, consistent with each other."""
    import re
    import subprocess

    from multiprocess_utils import FAST_COMPILE, env

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "model_step.py"), "--model",
         "crate-t/16", "--image-size", "32", "--num-classes", "10", "--batch", "2",
         "--steps", "1", "--rounds", "2", "--repeats", "1", "--remat", "full", "--shapes"],
        cwd=root, env=env(XLA_FLAGS=FAST_COMPILE), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    counts = {kind: re.search(rf"{kind} FLOPs +([0-9.]+) GFLOP/step +([0-9.]+) GFLOP/s",
                              text).groups() for kind in ("model", "hardware")}
    step, rate = ({k: float(v[i]) for k, v in counts.items()} for i in (0, 1))
    assert step["hardware"] > step["model"] > 0, text  # remat 'full' recomputes the forward
    matmul = float(re.search(r"matmul rate at the step's shapes ([0-9.]+) GFLOP/s", text)[1])
    fraction = float(re.search(r"model FLOP rate / matmul rate: ([0-9.]+)", text)[1])
    assert fraction == pytest.approx(rate["model"] / matmul, abs=0.02), text
    assert "MFU n/a" in text and "HFU n/a" in text  # no known peak for a CPU
    assert re.search(r"12 × 5 × 64 × 5 +float32", text), text  # the per-head attention


def test_roofline_weights_each_matmul_shape_by_its_flops():
    """Two shapes, one 3 × as fast alone: the rate at the step's shapes is their FLOPs over
    the time they take alone (a harmonic mean weighted by FLOPs), not the mean of rates."""
    from crate_jax.perf import MatmulShape

    big, small = MatmulShape(1, 100, 100, 100, "float32"), MatmulShape(4, 10, 10, 10, "float32")
    shapes = {big: 2, small: 5}
    seconds = {big: big.flops / 3e9, small: small.flops / 1e9}  # 3 and 1 GFLOP/s alone
    flops, time = model_step.roofline(shapes, seconds)
    assert flops == 2 * 2e6 + 5 * 8e3
    assert time == pytest.approx(2 * 2e6 / 3e9 + 5 * 8e3 / 1e9)
    assert 1e9 < flops / time < 3e9


def test_minimal_remat_keeps_the_fused_attention_kernels_outputs():
    # On a GPU with attention_impl='cudnn' the attention is one cuDNN kernel, not dot_generals:
    # 'minimal' must keep its forward outputs, or the backward pass reruns the kernel. (The
    # kernel itself needs a GPU; this checks the policy against jax's own primitive.)
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from crate_jax.models.encoder import REMAT_POLICIES

    policy = REMAT_POLICIES["minimal"]
    assert policy(cudnn_attention._dot_product_attention_fwd_p_wrapper)
    assert not policy(jax.lax.exp_p)
    matmul = (((1,), (0,)), ((), ()))
    assert not policy(jax.lax.dot_general_p, dimension_numbers=matmul)
