"""TSSA and causal TSSA against the independent NumPy implementation (numpy_reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx
from model_utils import randomize

from crate_jax.models import tssa

B, N, D, K, T = 2, 9, 32, 4, 12


def _tokens(seed=0, shape=(B, N, D)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _p(var):
    return np.asarray(var[...])


def _build(cls, seed=1, **kwargs):
    module = cls(D, K, eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                 **kwargs)
    randomize(module, seed, std=0.3)
    return module


def _reference(module, z, causal):
    x = ref.layer_norm(z, _p(module.norm.scale), _p(module.norm.bias), 1e-6)
    args = (x, _p(module.proj).reshape(D, -1), _p(module.proj_bias).reshape(-1),
            _p(module.temperature))
    tail = (_p(module.out).reshape(-1, D), _p(module.out_bias))
    if causal:
        return ref.causal_tssa(*args, _p(module.denom_bias), *tail, heads=K)
    return ref.tssa(*args, *tail, heads=K)


@pytest.mark.parametrize("causal", [False, True])
def test_tssa_matches_reference(causal):
    extra = dict(context_length=T) if causal else {}
    module = _build(tssa.CausalTSSA if causal else tssa.TSSA, **extra)
    z = _tokens()
    out, pi = module(jnp.asarray(z), is_causal=causal, return_attention=True)
    want, want_pi = _reference(module, z, causal)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pi, want_pi, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pi).sum(1), 1.0, rtol=1e-6)  # a softmax over heads
    assert module(jnp.asarray(z), is_causal=causal)[1] is None


def test_causal_tssa_sees_only_the_past():
    """Changing tokens after position n leaves outputs up to n unchanged; the full-sequence
    TSSA is not causal (its statistics see every token)."""
    causal = _build(tssa.CausalTSSA, context_length=T)
    full = _build(tssa.TSSA)
    z = _tokens()
    z2 = z.copy()
    z2[:, 5:] = _tokens(seed=3)[:, 5:]
    a, _ = causal(jnp.asarray(z))
    b, _ = causal(jnp.asarray(z2))
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert not np.allclose(a[:, 5:], b[:, 5:])
    c, _ = full(jnp.asarray(z))
    d, _ = full(jnp.asarray(z2))
    assert not np.allclose(c[:, :5], d[:, :5])


def test_tssa_is_permutation_equivariant():
    """Token statistics are order-free: permuting the tokens permutes the output."""
    module = _build(tssa.TSSA)
    z = _tokens()
    perm = np.random.default_rng(5).permutation(N)
    out, _ = module(jnp.asarray(z))
    out_perm, _ = module(jnp.asarray(z[:, perm]))
    np.testing.assert_allclose(out_perm, np.asarray(out)[:, perm], rtol=1e-5, atol=1e-6)


def test_tssa_gradients_match_finite_differences():
    module = _build(tssa.CausalTSSA, context_length=T)
    z = jnp.asarray(_tokens().astype(np.float64), jnp.float32)
    graphdef, state = nnx.split(module)

    def loss(state, z):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(z)[0]))

    g_state, g_z = jax.grad(loss, argnums=(0, 1))(state, z)
    assert float(jnp.abs(g_state["denom_bias"][...]).sum()) > 0  # β is trained
    assert float(jnp.abs(g_state["temperature"][...]).sum()) > 0
    direction = _tokens(seed=9)
    eps = 1e-2
    fd = (loss(state, z + eps * direction) - loss(state, z - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(g_z, direction)), float(fd), rtol=2e-2)


def test_tssa_refuses_what_it_cannot_do():
    module = _build(tssa.TSSA)
    z = jnp.asarray(_tokens())
    with pytest.raises(ValueError, match="key_mask"):
        module(z, key_mask=jnp.ones((B, N), bool))
    with pytest.raises(ValueError, match="is_causal"):
        module(z, is_causal=True)
    causal = _build(tssa.CausalTSSA, context_length=4)
    with pytest.raises(ValueError, match="context_length=4"):
        causal(z)


def test_tssa_bfloat16_close_to_float32():
    module = _build(tssa.TSSA)
    z = jnp.asarray(_tokens())
    want, _ = module(z)
    module.dtype = jnp.bfloat16
    module.norm.dtype = jnp.bfloat16
    got, _ = module(z.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.1, atol=0.05)


def test_attention_scaling_benchmark_runs_and_fits_slopes(tmp_path):
    """benchmarks/attention_scaling.py at toy sizes: MSSA's memory grows ~N², TSSA's ~N;
    the budget stops the timing of what does not fit, not its compiled memory."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import attention_scaling

    out = tmp_path / "scaling.json"
    result = attention_scaling.main(["--tokens", "128,256,512", "--rounds", "1", "--width",
                                     "32", "--heads", "4", "--budget", "4MiB", "--json",
                                     str(out)])
    assert json.loads(out.read_text())["summary"] == result["summary"]
    mssa, tssa = result["summary"]["mssa"], result["summary"]["tssa"]
    assert mssa["memory_exponent"] > 1.6 and 0.7 < tssa["memory_exponent"] < 1.2
    assert tssa["largest_measured_tokens_in_budget"] == 512
    assert mssa["largest_measured_tokens_in_budget"] < 512
    skipped = [r for r in result["rows"] if r["seconds"] is None]
    assert skipped and all(r["peak_bytes"] > 4 * 2**20 for r in skipped)
