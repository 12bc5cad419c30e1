"""Text tower for contrastive training: a ViT-style or CRATE-α transformer over token ids.

    Z⁰ = Embed(t) + P[:T]
    Zᴸ = LN(Encoder(Z⁰))     causal mask; or bidirectional, padding keys masked out or not
    f  = pool(Zᴸ)            eot | first | last | last_token | mean  (see TextConfig)

CLIPA's text tower (registry 'clipa-text-h'): bidirectional, no padding mask, pooled at the
last position, GELU (tanh) MLP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models.config import TextConfig
from crate_jax.models.encoder import Encoder
from crate_jax.models.layers import LayerNorm, normal, param


class TextTransformer(nnx.Module):
    """Maps token ids (B, T), T ≤ context_length, to features (B, width) in float32."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = cfg.storage_dtype
        self.token_embedding = param(rngs, normal(0.02), (cfg.vocab_size, cfg.width),
                                     ("vocab", "embed"), pdt)
        self.pos_embedding = param(rngs, normal(0.01), (1, cfg.context_length, cfg.width),
                                   (None, None, "embed"), pdt)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.norm = LayerNorm(cfg.width, eps=cfg.eps, dtype=jnp.float32, param_dtype=pdt,
                              rngs=rngs)

    def pool_index(self, tokens: jax.Array) -> jax.Array:
        """The position each sequence is pooled at (every pool but 'mean')."""
        cfg = self.cfg
        batch, length = tokens.shape
        if cfg.pool == "first":
            return jnp.zeros((batch,), jnp.int32)
        if cfg.pool == "last":
            return jnp.full((batch,), length - 1, jnp.int32)
        last_real = jnp.maximum((tokens != cfg.pad_id).sum(1) - 1, 0)
        if cfg.pool == "last_token":
            return last_real
        is_eot = tokens == cfg.eot_id
        return jnp.where(is_eot.any(1), jnp.argmax(is_eot, axis=1), last_real)

    def __call__(self, tokens: jax.Array, *, collect: bool = False):
        cfg = self.cfg
        if tokens.ndim != 2 or tokens.shape[1] > cfg.context_length:
            raise ValueError(f"tokens of shape {tokens.shape}: expected (batch, T) with "
                             f"T ≤ context_length={cfg.context_length}")
        dt = cfg.compute_dtype
        z0 = (jnp.take(self.token_embedding[...], tokens, axis=0).astype(dt)
              + self.pos_embedding[...][:, : tokens.shape[1]].astype(dt))
        real = tokens != cfg.pad_id
        key_mask = real if (not cfg.causal and cfg.mask_padding) else None
        z, inter = self.encoder(z0, key_mask, is_causal=cfg.causal, collect=collect)
        z = self.norm(z)
        if cfg.pool == "mean":
            weights = real.astype(jnp.float32)[..., None]
            features = (z * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        else:
            index = self.pool_index(tokens)
            features = jnp.take_along_axis(z, index[:, None, None], axis=1)[:, 0]
        if collect:
            inter["tokens_in"] = z0
            return features, inter
        return features
