"""The layer stack every model shares: `depth` layers, stacked and run by one `nnx.scan`.

A layer is one step of alternating minimisation of the sparse rate reduction objective:
compress the tokens against K subspaces (MSSA), then sparsify them (ISTA / ODL). The ViT
layer has the same shape with MHSA and an MLP, for side-by-side comparisons.

The layers' parameters are stacked on a leading axis of length L, whose logical axis name is
`layers` ('encoder/layers/attn/proj' is (L, d, K, p)); one layer body is traced and compiled
whatever the depth. `cfg.scan_layers=False` unrolls the same scan into per-layer code.
crate_jax.models.layer_stack converts to and from the per-layer layout
('encoder/layers/{i}/...') that converters and checkpoints written before the scan use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from crate_jax.models.blocks import ISTA, MHSA, MLP, MSSA, ODL, SAVED_NAMES
from crate_jax.models.config import TowerConfig
from crate_jax.models.layers import LayerScale, StochasticDepth, drop_path
from crate_jax.models.tssa import TSSA, CausalTSSA
from crate_jax.parallel.sharding import constrain_to_batch

LAYER_AXIS = "layers"  # the logical name of the stacked parameters' leading axis

# Keys of the intermediates dict; each value is stacked over layers: (L, B, ...).
INTERMEDIATE_KEYS = ("tokens_mssa", "tokens_out", "codes", "attention")


def _attention_product(prim, *_, **params) -> bool:
    """The attention's own products: a dot_general with batch dimensions (the per-head Q·Kᵀ
    and A·V of the XLA path), or the forward kernel of cuDNN's fused attention (its output
    and softmax statistics, which its backward kernel reads; without them the backward pass
    would run the attention forward again)."""
    if prim is jax.lax.dot_general_p:
        return bool(params["dimension_numbers"][1][0])
    return prim.name.startswith("dot_product_attention_fwd")


REMAT_POLICIES = {
    # The blocks' named products (blocks.SAVED_NAMES: projections, attention outputs, sparse
    # codes, ...) and the attention's products: no matmul is recomputed, while the norms,
    # activations, ReLU masks and softmax are, from them. Inside the layer scan this keeps
    # about half the per-layer residuals of 'none', which XLA:CPU zeroes, fills and slices
    # every step (crate-alpha-b/32 on the 2-core CPU: a step 1.95 s → 1.47 s,
    # benchmarks/model_step.py). The default.
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES), _attention_product),
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": None,  # save nothing, recompute the whole layer in the backward pass
}


def remat_body(body, remat: str):
    """`body` (a scanned layer function) under the remat policy `remat`; 'none' leaves it to
    autodiff, which keeps every intermediate it uses."""
    if remat == "none":
        return body
    # prevent_cse=False: the scan already keeps XLA from merging the recomputation into the
    # forward pass (jax.checkpoint's documentation); the extra barrier would only cost.
    return nnx.remat(body, prevent_cse=False, policy=REMAT_POLICIES[remat])


def tost_blocks(cfg: TowerConfig, kw: dict) -> tuple[nnx.Module, MLP]:
    """ToST's (TSSA, MLP): causal TSSA with its per-position bias in a causal language model
    (nanoGPT's init, the residual projections N(0, 0.02/√(2L))), else bidirectional TSSA
    (timm's N(0, 0.02) on every Linear); zero biases. docs/design.md §1 "TSSA and ToST"."""
    causal = bool(getattr(cfg, "causal", False))
    out_std = 0.02 / (2 * cfg.depth) ** 0.5 if causal else 0.02
    if causal:
        attn = CausalTSSA(cfg.width, cfg.heads, context_length=cfg.context_length,
                          out_init_std=out_std, **kw)
    else:
        attn = TSSA(cfg.width, cfg.heads, **kw)
    mlp = MLP(cfg.width, cfg.hidden_dim, approximate_gelu=cfg.mlp_activation == "gelu_tanh",
              init_std=0.02, out_init_std=out_std, **kw)
    return attn, mlp


class Layer(nnx.Module):
    """One layer, pre-norm, with the residuals of docs/design.md §1:

        Z½ = Z + DropPath(LS₁(MSSA(Z)))          (ViT: MHSA; ToST: TSSA)
        CRATE:   Z' = ISTA(Z½)                   no skip connection around ISTA
        CRATE-α: Z' = Z½ + DropPath(LS₂(ODL(Z½)))
        ViT:     Z' = Z½ + DropPath(LS₂(MLP(Z½)))       ToST: the same
    """

    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.block = cfg.block
        kw = dict(eps=cfg.eps, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                  rngs=rngs)
        if cfg.block == "tost":
            self.attn, self.sparse = tost_blocks(cfg, kw)
        elif cfg.block == "vit":
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
        scaled = cfg.layer_scale_init is not None
        ls = dict(param_dtype=cfg.storage_dtype, rngs=rngs)
        self.scale_attn = LayerScale(cfg.width, cfg.layer_scale_init, **ls) if scaled else None
        self.scale_sparse = (LayerScale(cfg.width, cfg.layer_scale_init, **ls)
                             if scaled and cfg.block != "crate" else None)

    @staticmethod
    def _residual_branch(x: jax.Array, scale: LayerScale | None, rate: jax.Array | None,
                         key: jax.Array | None) -> jax.Array:
        if scale is not None:
            x = scale(x)
        return x if key is None else drop_path(x, rate, key)

    def __call__(self, z: jax.Array, key_mask: jax.Array | None = None, *,
                 drop_rate: jax.Array | None = None, drop_keys: jax.Array | None = None,
                 is_causal: bool = False, collect: bool = False):
        """Returns (Z', intermediates of this layer or None). `drop_keys` (2,) keys for the
        DropPath of the two branches at `drop_rate`; None: no DropPath."""
        keys = (None, None) if drop_keys is None else (drop_keys[0], drop_keys[1])
        o, attn = self.attn(z, key_mask=key_mask, is_causal=is_causal, return_attention=collect)
        z_half = checkpoint_name(
            z + self._residual_branch(o, self.scale_attn, drop_rate, keys[0]), "layer_mid")
        if self.block == "crate":
            z_out = code = self.sparse(z_half)
        else:
            o, code = self.sparse(z_half)
            z_out = z_half + self._residual_branch(o, self.scale_sparse, drop_rate, keys[1])
        if not collect:
            return z_out, None
        return z_out, dict(tokens_mssa=z_half, tokens_out=z_out, codes=code, attention=attn)


class Encoder(nnx.Module):
    """Runs `depth` layers, Zˡ⁺¹ = Layerˡ(Zˡ), as one scan over the stacked parameters. With
    `collect=True` it also returns the per-layer intermediates, stacked over layers (the
    scan's outputs); without it the attention maps are never formed.

    DropPath rises linearly from 0 at the first layer to cfg.drop_path_rate at the last; the
    rates and the keys are scanned inputs, so the layers still share one body. Remat
    (cfg.remat) wraps the body: inside the scan, only what the policy saves is kept per layer.
    """

    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.remat = cfg.remat
        self.depth = cfg.depth
        self.unroll = 1 if cfg.scan_layers else cfg.depth
        self.drop_rates = tuple(cfg.drop_path_rate * i / max(cfg.depth - 1, 1)
                                for i in range(cfg.depth))
        self.stochastic_depth = (StochasticDepth(rngs=rngs) if cfg.drop_path_rate > 0
                                 else None)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
        def make_layers(rngs: nnx.Rngs) -> Layer:
            return Layer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)

    def layer(self, index: int) -> Layer:
        """Layer `index` on its own (a view of slice `index` of the stacked parameters), for
        per-layer tools such as the white-box measurements."""
        if not 0 <= index < self.depth:
            raise IndexError(f"layer {index} of a {self.depth}-layer encoder")
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))

    def __call__(self, z: jax.Array, key_mask: jax.Array | None = None, *,
                 is_causal: bool = False, collect: bool = False):
        keys = None if self.stochastic_depth is None else self.stochastic_depth.keys(self.depth)
        xs = {"drop_rate": jnp.asarray(self.drop_rates, jnp.float32)}
        if keys is not None:
            xs["drop_keys"] = keys

        def body(layer: Layer, z: jax.Array, xs: dict):
            z, inter = layer(constrain_to_batch(z), key_mask, drop_rate=xs["drop_rate"],
                             drop_keys=xs.get("drop_keys"), is_causal=is_causal,
                             collect=collect)
            return constrain_to_batch(z), inter

        body = remat_body(body, self.remat)
        scan = nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                        unroll=self.unroll)
        return scan(self.layers, z, xs)
