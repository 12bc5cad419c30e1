"""The reference implementations' computation, written from DESIGN.md §1, on our parameters.

The official CRATE (PyTorch) and CRATE-α (JAX, Linen) code compute the same functions as
crate_jax, in another shape. This module rebuilds that shape, and imports none of their code:

    both       a Python loop over the layers (no scan); attention as plain einsums with an
               explicit softmax: A_k = softmax(W_k W_kᵀ/√p), O = A_k W_k
    CRATE      the linear stem LN → Linear → LN; MSSA with one (d, K·p) matrix and the heads
               split by reshape, as PyTorch's qkv Linear; ISTA with its three matmuls
                   Z' = ReLU(X + η·(X·W − (X·Wᵀ)·W) − η·λ)
    CRATE-α    the stem as a strided convolution (Linen's nn.Conv); MSSA through a
               DenseGeneral-shaped (d, K, p) kernel; ODL unrolled as written
                   A₁ = ReLU(η·X·D − η·λ),  A_{k+1} = ReLU(A_k − η·(A_k·Dᵀ − X)·D − η·λ)

`forward(params, images, table, cfg)` takes crate_jax's parameter tree (either layout) and
the fixed position table, so both programs run on the same weights; tests check that the
two agree (tests/test_reference_shapes.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from crate_jax.models import layer_stack
from crate_jax.models.config import VisionConfig


def _ln(x: jax.Array, p: dict, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _attention(w: jax.Array) -> jax.Array:
    """(B, N, K, p) heads, query = key = value: softmax(W Wᵀ/√p) W, explicit softmax."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", w, w) * w.shape[-1] ** -0.5
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, w)


def _crate_layer(x: jax.Array, p: dict, cfg: VisionConfig) -> jax.Array:
    d, heads = cfg.width, cfg.heads
    y = _ln(x, p["attn"]["norm"], cfg.eps)
    w = (y @ p["attn"]["proj"].reshape(d, d)).reshape(*y.shape[:2], heads, d // heads)
    o = _attention(w).reshape(*y.shape[:2], d)
    x = x + o @ p["attn"]["out"].reshape(d, d) + p["attn"]["out_bias"]
    y = _ln(x, p["sparse"]["norm"], cfg.eps)
    weight = p["sparse"]["weight"]
    x1 = y @ weight.T
    return jax.nn.relu(y + cfg.eta * (y @ weight - x1 @ weight) - cfg.eta * cfg.lam)


def _crate_alpha_layer(x: jax.Array, p: dict, cfg: VisionConfig) -> jax.Array:
    y = _ln(x, p["attn"]["norm"], cfg.eps)
    w = jnp.einsum("bnd,dhk->bnhk", y, p["attn"]["proj"])
    x = x + jnp.einsum("bnhk,hkd->bnd", _attention(w), p["attn"]["out"])
    y = _ln(x, p["sparse"]["norm"], cfg.eps)
    dictionary, shrink = p["sparse"]["D"], cfg.eta * cfg.lam
    code = jax.nn.relu(cfg.eta * (y @ dictionary) - shrink)
    for _ in range(cfg.ista_steps - 1):
        code = jax.nn.relu(code - cfg.eta * ((code @ dictionary.T - y) @ dictionary) - shrink)
    return x + code @ p["sparse"]["D1"].T


def _stem(params: dict, images: jax.Array, cfg: VisionConfig) -> jax.Array:
    patch, batch = cfg.patch_size, images.shape[0]
    if cfg.block == "crate":
        grid = cfg.image_size // patch
        x = images.reshape(batch, grid, patch, grid, patch, cfg.channels)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, -1)
        stem = params["stem"]
        x = _ln(x, stem["norm_in"], cfg.eps) @ stem["proj"]["kernel"] + stem["proj"]["bias"]
        return _ln(x, stem["norm_out"], cfg.eps)
    x = jax.lax.conv_general_dilated(images, params["stem"]["kernel"], (patch, patch), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if "bias" in params["stem"]:
        x = x + params["stem"]["bias"]
    return x.reshape(batch, -1, cfg.width)


def forward(params: dict, images: jax.Array, table: jax.Array, cfg: VisionConfig) -> jax.Array:
    """Logits (B, classes) of a CRATE or CRATE-α classifier, computed the reference way."""
    if cfg.block not in ("crate", "crate_alpha"):
        raise ValueError(f"no reference shape for block {cfg.block!r}")
    params = layer_stack.unstack_layers(params)
    x = _stem(params, images, cfg) + table[:, 1:]
    cls = jnp.broadcast_to(params["cls"] + table[:, :1], (x.shape[0], 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1)
    layer = _crate_layer if cfg.block == "crate" else _crate_alpha_layer
    for i in range(cfg.depth):
        x = layer(x, params["encoder"]["layers"][i], cfg)
    if cfg.block == "crate":
        pooled = _ln(x[:, 0] if cfg.pool == "cls" else x.mean(1), params["norm"], cfg.final_eps)
    else:
        x = _ln(x, params["norm"], cfg.final_eps)
        pooled = x[:, 0] if cfg.pool == "cls" else x[:, 1:].mean(1)
    return pooled @ params["head"]["kernel"] + params["head"]["bias"]
