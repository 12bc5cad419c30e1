"""Contrastive image-text losses over the GLOBAL batch.

Embeddings x_i (images) and y_j (texts) are L2-normalised, (B, e), sharded over the batch axes.
With t the temperature scale (and b the SigLIP bias):

    InfoNCE  L = ½·[ CE(t·X Yᵀ, I) + CE(t·Y Xᵀ, I) ]                 mean over the B rows
    SigLIP   L = −(1/B) Σ_i Σ_j log σ( z_ij·(t·x_i·y_j + b) ),  z_ij = +1 if i = j else −1

Layout of the logits: each device keeps its b = B/n rows and all-gathers the other side's
embeddings (B × e), so it holds a (b × B) block of the logits (two for InfoNCE). At a fixed
per-device batch b, per-device memory grows linearly with the number of devices n (b·n·b
logits) and the embeddings gathered are only B × e. The gathers are explicit (`jax.shard_map`),
so the gradients are those of the single-device loss on the concatenated batch: the transpose
of all_gather is a reduce-scatter that returns every device's share.

The batch top-1 image→text accuracy (`with_accuracy=True`), (1/B) Σ_i [argmax_j x_i·y_j = i],
comes from the same blocks: each device holds all B texts for its rows, so its rows' argmax
(first maximum on ties, as jnp.argmax) is the global one, and a psum adds the devices' counts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from crate_jax.parallel.sharding import split_batch_axes


def _infonce_block(x, y_all, x_all, y, scale, offset):
    """Σ over this device's rows of the two cross-entropies."""
    rows = jnp.arange(x.shape[0])
    labels = offset + rows
    logits_xy = scale * (x @ y_all.T)
    logits_yx = scale * (y @ x_all.T)
    ce_xy = jax.nn.logsumexp(logits_xy, axis=1) - logits_xy[rows, labels]
    ce_yx = jax.nn.logsumexp(logits_yx, axis=1) - logits_yx[rows, labels]
    return jnp.sum(ce_xy) + jnp.sum(ce_yx)


def _sigmoid_block(x, y_all, scale, bias, offset):
    logits = scale * (x @ y_all.T) + bias
    positive = jnp.arange(y_all.shape[0])[None, :] == (offset + jnp.arange(x.shape[0]))[:, None]
    sign = 2.0 * positive - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(sign * logits))


def _correct_block(x, y_all, offset):
    """How many of this device's rows have their own text (column offset + row) as the top
    match among all B texts (the loss block's own product: XLA computes it once)."""
    best = jnp.argmax(x @ y_all.T, axis=1)
    return jnp.sum(best == offset + jnp.arange(x.shape[0]), dtype=jnp.int32)


def contrastive_loss(x: jax.Array, y: jax.Array, scale: jax.Array, bias: jax.Array | None = None,
                     *, kind: str = "infonce", mesh: jax.sharding.Mesh | None = None,
                     with_accuracy: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The loss of the global batch. `mesh` None: the current mesh (jax.set_mesh), if any.
    `with_accuracy`: (loss, batch top-1 image→text accuracy) instead (the module doc)."""
    if kind not in ("infonce", "sigmoid"):
        raise ValueError(f"loss: must be 'infonce' or 'sigmoid', got {kind!r}")
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    bias = jnp.zeros((), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    if mesh is None:
        abstract = jax.sharding.get_abstract_mesh()
        mesh = None if abstract.empty else abstract
    axes = split_batch_axes(mesh)
    global_batch = x.shape[0]
    if not axes:
        if kind == "infonce":
            loss = _infonce_block(x, y, x, y, scale, 0) / (2 * global_batch)
        else:
            loss = _sigmoid_block(x, y, scale, bias, 0) / global_batch
        if not with_accuracy:
            return loss
        return loss, _correct_block(x, y, 0).astype(jnp.float32) / global_batch

    def local(x, y, scale, bias):
        offset = jax.lax.axis_index(axes) * x.shape[0]
        y_all = jax.lax.all_gather(y, axes, tiled=True)
        if kind == "infonce":
            x_all = jax.lax.all_gather(x, axes, tiled=True)
            total = _infonce_block(x, y_all, x_all, y, scale, offset) / 2
        else:
            total = _sigmoid_block(x, y_all, scale, bias, offset)
        loss = jax.lax.psum(total, axes) / global_batch
        if not with_accuracy:
            return loss
        correct = jax.lax.psum(_correct_block(x, y_all, offset), axes)
        return loss, correct.astype(jnp.float32) / global_batch

    n = math.prod(mesh.shape[a] for a in axes)
    if global_batch % n:
        raise ValueError(f"batch_size={global_batch} is not divisible by the {n} devices of "
                         f"mesh axes {axes}")
    out_specs = (P(), P()) if with_accuracy else P()
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes), P(), P()),
                         out_specs=out_specs)(x, y, scale, bias)
