"""Each block against the NumPy implementation of docs/design.md §1 (numpy_reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx
from model_utils import randomize

from crate_jax.models import blocks, layers

B, N, D, K = 2, 7, 32, 4
RTOL, ATOL = 2e-5, 2e-5


def _tokens(seed=0, shape=(B, N, D)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _p(var):
    return np.asarray(var[...])


def _build(cls, *args, seed=1, **kwargs):
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    module = cls(*args, **kw, **kwargs)
    randomize(module, seed)
    return module


def test_layer_norm():
    ln = _build(layers.LayerNorm, D, eps=1e-5)
    z = _tokens()
    np.testing.assert_allclose(ln(jnp.asarray(z)),
                               ref.layer_norm(z, _p(ln.scale), _p(ln.bias), 1e-5),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("out_bias", [True, False])
@pytest.mark.parametrize("return_attention", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal", "keys"])
def test_mssa(out_bias, return_attention, mask):
    mssa = _build(blocks.MSSA, D, K, out_bias=out_bias, eps=1e-6, attention_impl=None)
    z = _tokens()
    key_mask = np.ones((B, N), bool)
    key_mask[0, -3:] = False
    kwargs = dict(is_causal=mask == "causal", key_mask=key_mask if mask == "keys" else None)
    out, attn = mssa(jnp.asarray(z), return_attention=return_attention,
                     **{**kwargs, "key_mask": None if kwargs["key_mask"] is None
                        else jnp.asarray(kwargs["key_mask"])})
    x = ref.layer_norm(z, _p(mssa.norm.scale), _p(mssa.norm.bias), 1e-6)
    want, want_attn = ref.mssa(x, _p(mssa.proj).reshape(D, -1), _p(mssa.out).reshape(-1, D),
                               _p(mssa.out_bias) if out_bias else None, heads=K,
                               causal=kwargs["is_causal"], key_mask=kwargs["key_mask"])
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    if return_attention:
        np.testing.assert_allclose(attn, want_attn, rtol=1e-4, atol=1e-5)
    else:
        assert attn is None



@pytest.mark.parametrize("mask", ["none", "causal", "keys"])
def test_mssa_backward_uses_query_equals_key_equals_value(mask):
    """MSSA's attention has a hand-written backward pass (models/symmetric.py: dW =
    Aᵀ·dO + s·(dS + dSᵀ)·W, one matmul fewer than autodiff of generic attention). Its
    gradients, for the input tokens and every parameter, equal autodiff's through the explicit
    softmax (the return_attention path) and through jax.nn.dot_product_attention."""
    from crate_jax.models import symmetric

    mssa = _build(blocks.MSSA, D, K, out_bias=True, eps=1e-6, attention_impl=None)
    z = jnp.asarray(_tokens(2))
    cot = jnp.asarray(_tokens(3))
    key_mask = np.ones((B, N), bool)
    key_mask[1, -2:] = False
    kwargs = dict(is_causal=mask == "causal",
                  key_mask=jnp.asarray(key_mask) if mask == "keys" else None)

    def grads(explicit):
        def loss(module, z):
            out, _ = module(z, return_attention=explicit, **kwargs)
            return jnp.sum(out * cot)
        g_params, g_z = nnx.grad(loss, argnums=(0, 1))(mssa, z)
        return [g_z, *jax.tree.leaves(g_params)]

    for a, b in zip(grads(False), grads(True), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # the attention alone, against autodiff of jax's own attention on (B, N, K, p) heads
    w = jnp.asarray(_tokens(4, (B, N, K, D // K)))
    d_out = jnp.asarray(_tokens(5, (B, N, K, D // K)))
    mask4 = None if kwargs["key_mask"] is None else kwargs["key_mask"][:, None, None, :]
    _, ours = jax.vjp(lambda w: symmetric.self_attention(w, **kwargs), w)
    _, theirs = jax.vjp(lambda w: jax.nn.dot_product_attention(
        w, w, w, mask=mask4, is_causal=kwargs["is_causal"]), w)
    np.testing.assert_allclose(ours(d_out)[0], theirs(d_out)[0], rtol=1e-4, atol=1e-5)


def test_gram_backward_is_autodiffs():
    """symmetric.gram (ISTA's WᵀW, backward dW = W(Ḡ + Ḡᵀ) in one matmul) against autodiff
    of w.T @ w, for a cotangent that is not symmetric."""
    from crate_jax.models import symmetric

    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)
    ours, vjp = jax.vjp(symmetric.gram, w)
    theirs, auto = jax.vjp(lambda w: w.T @ w, w)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    np.testing.assert_allclose(vjp(g)[0], auto(g)[0], rtol=1e-5, atol=1e-6)

def test_ista_matches_reference():
    ista = _build(blocks.ISTA, D, eta=0.1, lam=0.1, eps=1e-5)
    z = _tokens()
    x = ref.layer_norm(z, _p(ista.norm.scale), _p(ista.norm.bias), 1e-5)
    want = ref.ista_three_matmul(x, _p(ista.weight), 0.1, 0.1)
    got = ista(jnp.asarray(z))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert 0.05 < float((np.asarray(got) == 0).mean()) < 0.95, "test needs a mix of zeros"


def _ista_three_matmul_jax(x, w, eta, lam):
    return jax.nn.relu(x + eta * (x @ w - x @ w.T @ w) - eta * lam)


def test_ista_fused_equals_three_matmul_values_and_gradients():
    """ReLU(X·M − ηλ), M = I + η(W − WᵀW), equals ReLU(X + η(XW − XWᵀW) − ηλ), and so do the
    gradients with respect to W and X."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(B * N, D)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 0.3, size=(D, D)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(B * N, D)), jnp.float32)
    eta, lam = 0.1, 0.1

    def fused(x, w):
        m = jnp.eye(D) + eta * (w - w.T @ w)
        return jax.nn.relu(x @ m - eta * lam)

    np.testing.assert_allclose(fused(x, w), _ista_three_matmul_jax(x, w, eta, lam),
                               rtol=1e-5, atol=1e-5)
    g_fused = jax.grad(lambda x, w: jnp.sum(fused(x, w) * cot), argnums=(0, 1))(x, w)
    g_three = jax.grad(lambda x, w: jnp.sum(_ista_three_matmul_jax(x, w, eta, lam) * cot),
                       argnums=(0, 1))(x, w)
    for a, b in zip(g_fused, g_three, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    # The module itself uses the fused form: its gradient wrt W equals the three-matmul one.
    ista = _build(blocks.ISTA, D, eta=eta, lam=lam, eps=1e-5)
    z = jnp.asarray(_tokens(5))
    cot3 = cot.reshape(B, N, D)

    g_module = nnx.grad(lambda module: jnp.sum(module(z) * cot3))(ista)["weight"][...]
    w0 = ista.weight[...]
    xn = ista.norm(z)
    g_ref = jax.grad(lambda w: jnp.sum(_ista_three_matmul_jax(xn, w, eta, lam) * cot3))(w0)
    np.testing.assert_allclose(g_module, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps,ratio", [(1, 4), (2, 4), (3, 2)])
def test_odl(steps, ratio):
    odl = _build(blocks.ODL, D, ratio=ratio, steps=steps, eta=0.1, lam=0.1, eps=1e-6)
    z = _tokens()
    x = ref.layer_norm(z, _p(odl.norm.scale), _p(odl.norm.bias), 1e-6)
    want_out, want_code = ref.odl(x, _p(odl.D), _p(odl.D1), 0.1, 0.1, steps)
    out, code = odl(jnp.asarray(z))
    assert code.shape == (B, N, ratio * D)
    np.testing.assert_allclose(code, want_code, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    assert 0.05 < float((np.asarray(code) == 0).mean()) < 0.95


@pytest.mark.parametrize("causal", [False, True])
def test_mhsa_and_mlp(causal):
    mhsa = _build(blocks.MHSA, D, K, eps=1e-6, attention_impl=None)
    z = _tokens()
    x = ref.layer_norm(z, _p(mhsa.norm.scale), _p(mhsa.norm.bias), 1e-6)
    flat = lambda name: _p(getattr(mhsa, name)).reshape(D, -1)
    bias = lambda name: _p(getattr(mhsa, name + "_bias")).reshape(-1)
    want, want_attn = ref.mhsa(x, flat("query"), bias("query"), flat("key"), bias("key"),
                               flat("value"), bias("value"), _p(mhsa.out).reshape(-1, D),
                               _p(mhsa.out_bias), heads=K, causal=causal)
    out, attn = mhsa(jnp.asarray(z), is_causal=causal, return_attention=True)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(attn, want_attn, rtol=1e-4, atol=1e-5)
    fused, _ = mhsa(jnp.asarray(z), is_causal=causal)
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=1e-4)

    mlp = _build(blocks.MLP, D, 3 * D, eps=1e-6)
    x = ref.layer_norm(z, _p(mlp.norm.scale), _p(mlp.norm.bias), 1e-6)
    want = ref.mlp(x, _p(mlp.fc1.kernel), _p(mlp.fc1.bias), _p(mlp.fc2.kernel), _p(mlp.fc2.bias))
    np.testing.assert_allclose(mlp(jnp.asarray(z))[0], want, rtol=1e-4, atol=1e-4)


def test_stems():
    images = _tokens(2, (B, 16, 24, 3))
    conv = _build(layers.ConvPatchStem, 8, 3, D, use_bias=True)
    want = ref.conv_stem(images, _p(conv.kernel), _p(conv.bias))
    np.testing.assert_allclose(conv(jnp.asarray(images)), want, rtol=1e-4, atol=1e-4)

    lin = _build(layers.LinearPatchStem, 8, 3, D, eps=1e-5)
    x = ref.layer_norm(ref.patchify(images, 8), _p(lin.norm_in.scale), _p(lin.norm_in.bias),
                       1e-5)
    x = x @ _p(lin.proj.kernel) + _p(lin.proj.bias)
    want = ref.layer_norm(x, _p(lin.norm_out.scale), _p(lin.norm_out.bias), 1e-5)
    np.testing.assert_allclose(lin(jnp.asarray(images)), want, rtol=1e-4, atol=1e-4)


def test_sincos_position_embedding():
    emb = layers.PositionEmbedding((3, 5), 16, kind="sincos2d", param_dtype=jnp.float32,
                                   rngs=nnx.Rngs(0))
    table = np.asarray(emb())
    assert table.shape == (1, 16, 16)
    np.testing.assert_array_equal(table[0, 0], 0.0)  # the cls row
    np.testing.assert_allclose(table[0, 1:], ref.sincos_2d(3, 5, 16), rtol=1e-6, atol=1e-6)
    assert not nnx.state(emb, nnx.Param)  # fixed, not trained
    with pytest.raises(ValueError, match="posemb"):
        layers.PositionEmbedding((2, 2), 16, kind="rope", param_dtype=jnp.float32,
                                 rngs=nnx.Rngs(0))


def test_drop_path_and_layer_scale():
    depth = layers.StochasticDepth(rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((64, 3, 4))
    keys = depth.keys(3)
    assert keys.shape == (3, 2)
    y = np.asarray(layers.drop_path(x, jnp.float32(0.5), keys[1, 0]))
    per_sample = y.reshape(64, -1)
    # whole samples are dropped or kept (scaled by 1/(1-rate)), never single entries
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample.min(1) == per_sample.max(1)).all()
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    np.testing.assert_array_equal(layers.drop_path(x, jnp.float32(0.0), keys[0, 0]), x)
    depth.eval()
    assert depth.keys(3) is None

    ls = layers.LayerScale(4, 1e-4, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ls(x), 1e-4 * np.ones((64, 3, 4)), rtol=1e-6)
