"""Products of a matrix with itself, whose backward passes use that symmetry: one matmul
where autodiff of the generic product runs two.

**MSSA's attention**, softmax(W_k W_kᵀ/√p) W_k per head (query = key = value = W_k):

    S = s · W Wᵀ      (s = 1/√p, per head; S is symmetric)
    A = softmax(S)    row-wise, over the keys that are valid for the query (masks)
    O = A W

The backward pass of generic attention (jax.nn.dot_product_attention with q = k = v = W) sums
three gradients, dQ + dK + dV: four (N × N)·(N × p)-sized matmuls. With one W,

    dA = dO Wᵀ,   dS = A ⊙ (dA − rowsum(dA ⊙ A)),   dW = Aᵀ dO + s · (dS + dSᵀ) W

is three: dS W and dSᵀ W are one matmul with dS + dSᵀ. The forward pass keeps A (the
softmax, under the checkpoint name 'attention_weights', which the 'minimal' remat policy
saves), so the backward pass recomputes neither S nor the softmax. Heads are computed in the
layout (B, K, N, p): the batch dimensions (B, K) of every matmul lead (the generic path keeps
them apart, in (B, N, K, p), and XLA:CPU transposed operands and outputs around each of its
matmuls). Numerics as jax.nn.dot_product_attention's:
the logits and the softmax in float32, the probabilities cast to W's dtype before A·W; the
backward pass reads A in that dtype (in bfloat16, half the memory of the float32 logits the
generic path kept, its gradients within a bfloat16 rounding of autodiff's).

**The Gram matrix** G = WᵀW of ISTA's step matrix M = I + η(W − WᵀW): for a cotangent Ḡ,
autodiff computes dW = W Ḡᵀ + W Ḡ (two d×d×d matmuls); here dW = W (Ḡ + Ḡᵀ), one.

Measured on the 2-core CPU (CRATE-B/16, fp32, batch 8): docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name


def _large_negative(dtype) -> float:
    # what jax.nn.dot_product_attention puts at masked logits: finite, so a fully masked row
    # gives a uniform softmax instead of NaN
    return -0.7 * float(jnp.finfo(dtype).max)


def _logits(heads: jax.Array, valid: jax.Array | None, scale: float) -> jax.Array:
    logits = jnp.einsum("bhqd,bhkd->bhqk", heads, heads,
                        preferred_element_type=jnp.float32) * np.float32(scale)
    if valid is not None:
        logits = jnp.where(valid, logits, _large_negative(jnp.float32))
    return logits


def _forward(heads: jax.Array, valid: jax.Array | None, scale: float):
    weights = jax.nn.softmax(_logits(heads, valid, scale), axis=-1).astype(heads.dtype)
    weights = checkpoint_name(weights, "attention_weights")
    return jnp.einsum("bhqk,bhkd->bhqd", weights, heads), weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _attention(heads: jax.Array, valid: jax.Array | None, scale: float) -> jax.Array:
    return _forward(heads, valid, scale)[0]


def _attention_fwd(heads, valid, scale):
    out, weights = _forward(heads, valid, scale)
    return out, (heads, weights)  # masked entries of A are 0: dS is 0 there without the mask


def _attention_bwd(scale, residuals, d_out):
    heads, weights = residuals
    d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, heads,
                           preferred_element_type=jnp.float32)
    probs = weights.astype(jnp.float32)
    d_logits = probs * (d_weights - jnp.sum(d_weights * probs, axis=-1, keepdims=True))
    symmetric = (d_logits + jnp.swapaxes(d_logits, -1, -2)) * np.float32(scale)
    d_heads = (jnp.einsum("bhkq,bhkd->bhqd", weights, d_out, preferred_element_type=jnp.float32)
               + jnp.einsum("bhqk,bhkd->bhqd", symmetric, heads,
                            preferred_element_type=jnp.float32))
    return d_heads.astype(heads.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def self_attention(w: jax.Array, *, key_mask: jax.Array | None = None,
                   is_causal: bool = False) -> jax.Array:
    """softmax(W_k W_kᵀ/√p) W_k for every head k of W (B, N, K, p); `key_mask` (B, N) bool
    keeps only the keys where it is True, `is_causal` only the earlier positions.
    Returns (B, N, K, p)."""
    n = w.shape[1]
    valid = None
    if is_causal:
        valid = jnp.tril(jnp.ones((n, n), bool))[None, None]
    if key_mask is not None:
        keys = key_mask[:, None, None, :]
        valid = keys if valid is None else valid & keys
    heads = jnp.swapaxes(w, 1, 2)  # (B, K, N, p)
    out = _attention(heads, valid, w.shape[-1] ** -0.5)
    return jnp.swapaxes(out, 1, 2)


@jax.custom_vjp
def gram(w: jax.Array) -> jax.Array:
    """WᵀW of a 2-D W, its backward pass dW = W (Ḡ + Ḡᵀ) (see the module)."""
    return w.T @ w


def _gram_fwd(w):
    return w.T @ w, w


def _gram_bwd(w, g):
    return (w @ (g + g.T),)


gram.defvjp(_gram_fwd, _gram_bwd)
