"""Language models on the shared layer stack: causal CRATE / CRATE-α / GPT-2 LMs and
bidirectional CRATE / BERT masked LMs.

Causal LM (CRATE-GPT, the journal paper's causal CRATE; CRATE-α-GPT, the overcomplete sparse
code of arXiv 2410.12288; GPT-2):

    Z⁰     = E[t] + P[:T]                   E ∈ R^{V×d} token, P ∈ R^{ctx×d} position embedding
    Zᴸ     = Encoder(Z⁰)                    every layer's attention under a causal mask
    logits = LN(Zᴸ)·Eᵀ                      tied; untied: LN(Zᴸ)·W_out, W_out ∈ R^{d×V}

Masked LM (CRATE-BERT; BERT):

    Z⁰     = E[t] + P[:T] + S[s]            S: token-type (segment) embedding
    Zᴸ     = LN(Encoder(Z⁰))                bidirectional; padding keys masked out
    H      = LN_h(GELU(Zᴸ·W_h + b_h))       BERT's MLM transform
    logits = H·Eᵀ + b_V                     decoder tied to E, with an output bias
    pooled = tanh(Zᴸ[:, 0]·W_p + b_p)       optional (cfg.pooler), BERT's [CLS] pooler

The layers are pre-norm (each block normalises its input, docs/design.md §1). BERT is post-LN; here
its embedding LayerNorm becomes the final LayerNorm instead, so the parameter count is BERT's
exactly (2L + 1 LayerNorms of width d either way). GPT-2 is pre-norm already: MHSA has biases
on Q, K, V and the output, the MLP on both layers, exactly GPT-2's parameters.

Parameters carry logical axis names: embeddings ('vocab', 'embed'), positions (None, 'embed'),
an untied head ('embed', 'vocab'), the stacked layers ('layers', ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models.encoder import Encoder
from crate_jax.models.layers import Dense, LayerNorm, normal, param, zeros
from crate_jax.models.lm_config import (
    LanguageConfig,
    available_lm,
    config_for_lm,
    lm_preset_fields,
)

__all__ = [
    "CausalLM", "LanguageConfig", "MLMHead", "MaskedLM", "available_lm", "build_lm",
    "config_for_lm", "create_lm", "lm_preset_fields",
]


class _Embeddings(nnx.Module):
    """Z⁰ = E[t] + P[start : start + T] (+ S[s]), in the compute dtype."""

    def __init__(self, cfg: LanguageConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.context_length = cfg.context_length
        init, pdt = normal(cfg.embed_init_std), cfg.storage_dtype
        self.token = param(rngs, init, (cfg.vocab_size, cfg.width), ("vocab", "embed"), pdt)
        self.position = param(rngs, init, (cfg.context_length, cfg.width), (None, "embed"), pdt)
        self.token_type = (param(rngs, init, (cfg.type_vocab_size, cfg.width), (None, "embed"),
                                 pdt) if cfg.type_vocab_size else None)

    def __call__(self, tokens: jax.Array, token_types: jax.Array | None = None,
                 start: jax.Array | int = 0) -> jax.Array:
        """`start` may be traced (a decode step's position); T + start ≤ context_length."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens of shape {tokens.shape}: expected (batch, T) with "
                             f"T ≤ context_length={self.context_length}")
        z = jnp.take(self.token[...], tokens, axis=0).astype(self.dtype)
        positions = jax.lax.dynamic_slice_in_dim(self.position[...], start, tokens.shape[1])
        z = z + positions.astype(self.dtype)
        if self.token_type is not None:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            z = z + jnp.take(self.token_type[...], types, axis=0).astype(self.dtype)
        elif token_types is not None:
            raise ValueError("token_types given, but the model has no token-type embedding "
                             "(type_vocab_size=0)")
        return z


def _times_embedding(h: jax.Array, embedding: jax.Array) -> jax.Array:
    """h·Eᵀ, E stored (V, d); float32 accumulation and result."""
    return jnp.einsum("...d,vd->...v", h, embedding.astype(h.dtype),
                      preferred_element_type=jnp.float32)


def _collected(out: jax.Array, z0: jax.Array, inter: dict,
               collect: bool) -> jax.Array | tuple[jax.Array, dict]:
    """`out`, or with `collect` (out, the encoder's intermediates with 'tokens_in' = Z⁰)."""
    if not collect:
        return out
    inter["tokens_in"] = z0
    return out, inter


class CausalLM(nnx.Module):
    """Next-token LM: tokens (B, T) → logits (B, T, V) in float32 (module docstring).

    block 'crate': MSSA + ISTA; 'crate_alpha': MSSA + ODL (cfg.overcomplete_ratio,
    cfg.ista_steps); 'vit': GPT-2 (MHSA + MLP). `crate_jax.models.lm_cache` decodes it with a
    key-value cache.
    """

    def __init__(self, cfg: LanguageConfig, *, rngs: nnx.Rngs):
        if not cfg.causal:
            raise ValueError("causal: CausalLM needs causal=True (MaskedLM is the "
                             "bidirectional model)")
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.norm = LayerNorm(cfg.width, eps=cfg.eps, dtype=cfg.compute_dtype,
                              param_dtype=cfg.storage_dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        param(rngs, normal(cfg.embed_init_std), (cfg.width, cfg.vocab_size),
                              ("embed", "vocab"), cfg.storage_dtype))

    def logits(self, z: jax.Array) -> jax.Array:
        """LN(Zᴸ)·Eᵀ (tied) or LN(Zᴸ)·W_out, float32, for final tokens (..., d)."""
        h = self.norm(z)
        if self.lm_head is None:
            return _times_embedding(h, self.embeddings.token[...])
        return jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(h.dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, *, collect: bool = False):
        """Logits (B, T, V); with `collect`, also the per-layer intermediates."""
        z0 = self.embeddings(tokens)
        z, inter = self.encoder(z0, None, is_causal=True, collect=collect)
        return _collected(self.logits(z), z0, inter, collect)


class MLMHead(nnx.Module):
    """BERT's masked-LM head: logits = LN(GELU(Z·W_h + b_h))·Eᵀ + b_V (E the token embedding
    when tied, else a (d, V) decoder of its own)."""

    def __init__(self, cfg: LanguageConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        init = normal(cfg.embed_init_std)
        self.dense = Dense(cfg.width, cfg.width, axes=(None, "embed"), kernel_init=init, **kw)
        self.norm = LayerNorm(cfg.width, eps=cfg.eps, **kw)
        self.decoder = (None if cfg.tie_embeddings else
                        param(rngs, init, (cfg.width, cfg.vocab_size), ("embed", "vocab"),
                              cfg.storage_dtype))
        self.bias = param(rngs, zeros, (cfg.vocab_size,), ("vocab",), cfg.storage_dtype)

    def __call__(self, z: jax.Array, embedding: jax.Array) -> jax.Array:
        h = self.norm(jax.nn.gelu(self.dense(z), approximate=False))
        if self.decoder is None:
            logits = _times_embedding(h, embedding)
        else:
            logits = jnp.einsum("...d,dv->...v", h, self.decoder[...].astype(h.dtype),
                                preferred_element_type=jnp.float32)
        return logits + self.bias[...].astype(jnp.float32)


class MaskedLM(nnx.Module):
    """Bidirectional encoder with BERT's MLM head: tokens (B, T) → logits (B, T, V), float32
    (module docstring). block 'crate' (CRATE-BERT), 'crate_alpha' or 'vit' (BERT)."""

    def __init__(self, cfg: LanguageConfig, *, rngs: nnx.Rngs):
        if cfg.causal:
            raise ValueError("causal: MaskedLM needs causal=False (CausalLM is the causal "
                             "model)")
        self.cfg = cfg
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        self.embeddings = _Embeddings(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.norm = LayerNorm(cfg.width, eps=cfg.eps, **kw)
        self.mlm = MLMHead(cfg, rngs=rngs)
        self.pooler = (Dense(cfg.width, cfg.width, axes=(None, "embed"),
                             kernel_init=normal(cfg.embed_init_std), **kw)
                       if cfg.pooler else None)

    def encode(self, tokens: jax.Array, token_types: jax.Array | None = None,
               attention_mask: jax.Array | None = None, *, collect: bool = False):
        """Zᴸ = LN(Encoder(Z⁰)), (B, T, d). `attention_mask` (B, T), True at real tokens:
        padding keys are masked out of every attention (None: nothing masked)."""
        z0 = self.embeddings(tokens, token_types)
        mask = None if attention_mask is None else attention_mask.astype(bool)
        z, inter = self.encoder(z0, mask, is_causal=False, collect=collect)
        return _collected(self.norm(z), z0, inter, collect)

    def pool(self, z: jax.Array) -> jax.Array:
        """BERT's pooled output tanh(Zᴸ[:, 0]·W_p + b_p) (needs cfg.pooler)."""
        if self.pooler is None:
            raise ValueError("pooler: this model was built with pooler=False")
        return jnp.tanh(self.pooler(z[:, 0]))

    def __call__(self, tokens: jax.Array, token_types: jax.Array | None = None, *,
                 attention_mask: jax.Array | None = None,
                 mlm_positions: jax.Array | None = None) -> jax.Array:
        """MLM logits (B, T, V); with `mlm_positions` (B, M) only at those positions,
        (B, M, V), so that the head runs on the masked tokens alone."""
        z = self.encode(tokens, token_types, attention_mask)
        if mlm_positions is not None:
            z = jnp.take_along_axis(z, mlm_positions[..., None], axis=1)
        return self.mlm(z, self.embeddings.token[...])


def build_lm(cfg: LanguageConfig, *, rngs: nnx.Rngs) -> CausalLM | MaskedLM:
    """The module of a language-model configuration."""
    return CausalLM(cfg, rngs=rngs) if cfg.causal else MaskedLM(cfg, rngs=rngs)


def create_lm(name: str, *, rngs: nnx.Rngs | None = None, seed: int = 0,
              **overrides) -> CausalLM | MaskedLM:
    """Build a language model by name, e.g. create_lm('crate-alpha-gpt-small', rngs=rngs).
    Shapes only, nothing allocated: nnx.eval_shape(lambda: create_lm(name))."""
    cfg = config_for_lm(name, **overrides)
    return build_lm(cfg, rngs=rngs if rngs is not None else nnx.Rngs(params=seed,
                                                                      dropout=seed + 1))
