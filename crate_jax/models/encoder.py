"""The layer stack every model shares: one `Layer` per depth, run by `Encoder`.

A layer is one step of alternating minimisation of the sparse rate reduction objective:
compress the tokens against K subspaces (MSSA), then sparsify them (ISTA / ODL). The ViT
layer has the same shape with MHSA and an MLP, for side-by-side comparisons.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models.blocks import ISTA, MHSA, MLP, MSSA, ODL
from crate_jax.models.config import TowerConfig
from crate_jax.models.layers import DropPath, LayerScale

# Keys of the intermediates dict; each value is stacked over layers: (L, B, ...).
INTERMEDIATE_KEYS = ("tokens_mssa", "tokens_out", "codes", "attention")

REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": None,  # save nothing, recompute the whole layer in the backward pass
}


class Layer(nnx.Module):
    """One layer, pre-norm, with the residuals of DESIGN.md §1:

        Z½ = Z + DropPath(LS₁(MSSA(Z)))          (ViT: MHSA)
        CRATE:   Z' = ISTA(Z½)                   no skip connection around ISTA
        CRATE-α: Z' = Z½ + DropPath(LS₂(ODL(Z½)))
        ViT:     Z' = Z½ + DropPath(LS₂(MLP(Z½)))
    """

    def __init__(self, cfg: TowerConfig, *, drop_path: float, rngs: nnx.Rngs):
        self.block = cfg.block
        kw = dict(eps=cfg.eps, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                  rngs=rngs)
        if cfg.block == "vit":
            self.attn = MHSA(cfg.width, cfg.heads, attention_impl=cfg.attention_impl, **kw)
            self.sparse = MLP(cfg.width, cfg.hidden_dim,
                              approximate_gelu=cfg.mlp_activation == "gelu_tanh", **kw)
        else:
            self.attn = MSSA(cfg.width, cfg.heads, out_bias=cfg.block == "crate",
                             attention_impl=cfg.attention_impl, **kw)
            if cfg.block == "crate":
                self.sparse = ISTA(cfg.width, eta=cfg.eta, lam=cfg.lam, **kw)
            else:
                self.sparse = ODL(cfg.width, ratio=cfg.overcomplete_ratio, steps=cfg.ista_steps,
                                  eta=cfg.eta, lam=cfg.lam, **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs) if drop_path > 0 else None
        scaled = cfg.layer_scale_init is not None
        ls = dict(param_dtype=cfg.storage_dtype, rngs=rngs)
        self.scale_attn = LayerScale(cfg.width, cfg.layer_scale_init, **ls) if scaled else None
        self.scale_sparse = (LayerScale(cfg.width, cfg.layer_scale_init, **ls)
                             if scaled and cfg.block != "crate" else None)

    def _residual_branch(self, x: jax.Array, scale: LayerScale | None) -> jax.Array:
        if scale is not None:
            x = scale(x)
        return x if self.drop_path is None else self.drop_path(x)

    def __call__(self, z: jax.Array, key_mask: jax.Array | None = None, *,
                 is_causal: bool = False, collect: bool = False):
        """Returns (Z', intermediates of this layer or None)."""
        o, attn = self.attn(z, key_mask=key_mask, is_causal=is_causal, return_attention=collect)
        z_half = z + self._residual_branch(o, self.scale_attn)
        if self.block == "crate":
            z_out = code = self.sparse(z_half)
        else:
            o, code = self.sparse(z_half)
            z_out = z_half + self._residual_branch(o, self.scale_sparse)
        if not collect:
            return z_out, None
        return z_out, dict(tokens_mssa=z_half, tokens_out=z_out, codes=code, attention=attn)


class Encoder(nnx.Module):
    """Runs `depth` layers. With `collect=True` it also returns the per-layer intermediates,
    stacked over layers; without it the attention maps are never formed."""

    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.remat = cfg.remat
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.layers = nnx.List([Layer(cfg, drop_path=r, rngs=rngs) for r in rates])

    def __call__(self, z: jax.Array, key_mask: jax.Array | None = None, *,
                 is_causal: bool = False, collect: bool = False):
        def run(layer, z, key_mask):
            return layer(z, key_mask, is_causal=is_causal, collect=collect)

        if self.remat != "none":
            run = nnx.remat(run, policy=REMAT_POLICIES[self.remat])
        per_layer = []
        for layer in self.layers:
            z, inter = run(layer, z, key_mask)
            per_layer.append(inter)
        if not collect:
            return z, None
        return z, {k: jnp.stack([p[k] for p in per_layer]) for k in INTERMEDIATE_KEYS}
