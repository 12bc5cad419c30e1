"""Image models: CRATE, CRATE-α and ViT share one class; `cfg.block` picks the family.

    CRATE:    E  = LN(LN(patchify(x))·W + b)                   linear stem
    CRATE-α:  E  = Conv_P(x)                                   ViT, CRATE-MAE: the same
              Z⁰ = [cls; E] + P                                P learned, or 2-D sin-cos
              Zᴸ = Encoder(Z⁰)                                 L layers (encoder.py)
    CRATE:    y  = Head(LN(pool(Zᴸ)))                          norm after pooling (reference)
    CRATE-α:  y  = Head(pool(LN(Zᴸ)))                          ViT: the same

pool is the cls token, or the mean ('gap'/'mean': over all tokens for CRATE as its reference
does, over the patch tokens for CRATE-α and ViT). With num_classes=0 there is no head and
the model returns the pooled features (an image tower). A ViT may carry DINOv2's register
tokens (`registers`): learned rows after the cls token, without position, skipped by pooling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models.config import VisionConfig
from crate_jax.models.encoder import Encoder
from crate_jax.models.layers import (
    ConvPatchStem,
    Dense,
    LayerNorm,
    LinearPatchStem,
    PositionEmbedding,
    normal,
    param,
    torch_default_bias,
    torch_default_kernel,
    zeros,
)
from crate_jax.models.resize import resize_posemb


class VisionTransformer(nnx.Module):
    """Returns logits (B, classes) in float32, or pooled features (B, d) when num_classes=0.
    With collect=True it returns (output, intermediates); see `encode`."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = cfg.compute_dtype, cfg.storage_dtype
        d = cfg.width
        if cfg.patch_stem == "linear":
            self.stem = LinearPatchStem(cfg.patch_size, cfg.channels, d, eps=cfg.eps, dtype=dt,
                                        param_dtype=pdt, rngs=rngs)
        else:
            self.stem = ConvPatchStem(cfg.patch_size, cfg.channels, d, use_bias=cfg.stem_bias,
                                      dtype=dt, param_dtype=pdt, rngs=rngs,
                                      kaiming=cfg.block in ("crate_alpha", "crate"))
        if cfg.block == "crate":
            cls_std, pos_std = 1.0, 1.0  # the reference draws both from torch.randn
        else:
            cls_std, pos_std = 1e-6, 0.02
        self.cls = param(rngs, normal(cls_std), (1, 1, d), (None, None, "embed"), pdt)
        # DINOv2's register tokens, drawn as it draws them (N(0, 1e-6))
        self.registers = (param(rngs, normal(1e-6), (1, cfg.registers, d),
                                (None, None, "embed"), pdt) if cfg.registers else None)
        self.posemb = PositionEmbedding(cfg.grid, d, kind=cfg.posemb, init_std=pos_std,
                                        param_dtype=pdt, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.norm = LayerNorm(d, eps=cfg.final_eps, dtype=jnp.float32, param_dtype=pdt,
                              rngs=rngs)
        # CRATE: the reference's nn.Linear defaults; CRATE-α and ViT: N(0, 0.02), zero bias
        crate = cfg.block == "crate"
        self.head = (Dense(d, cfg.num_classes, axes=("embed", "classes"),
                           kernel_init=torch_default_kernel() if crate else normal(0.02),
                           bias_init=torch_default_bias(d) if crate else zeros,
                           dtype=jnp.float32, param_dtype=pdt, rngs=rngs)
                     if cfg.num_classes else None)

    def embed(self, images: jax.Array, patch_keep: jax.Array | None = None,
              patch_fill: tuple[jax.Array, jax.Array] | None = None, *,
              any_size: bool = False) -> jax.Array:
        """Z⁰ = [cls; E] + P, (B, 1 + N, d); with R register tokens (ViT, `registers`)
        [cls + P₀; reg₁ … reg_R; E + P₁:], (B, 1 + R + N, d). `patch_keep` (B, M) keeps only
        those patches (after their position embedding is added): CLIPA-style token dropping,
        and MAE's visible patches. `patch_fill` = (mask (B, N) bool, token (1, 1, d)) puts
        the token in place of the masked patches' embeddings, before P is added (CRATE-MAE).
        `any_size` accepts any image side that the patch divides, the position table resized
        in 2-D (bilinear) to its grid: DINO's smaller local views."""
        cfg = self.cfg
        side = images.shape[1]
        other_size = (any_size and images.shape[1] == images.shape[2]
                      and images.shape[3] == cfg.channels and side % cfg.patch_size == 0)
        if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels) and not other_size:
            raise ValueError(f"images of shape {images.shape[1:]} do not match image_size="
                             f"{cfg.image_size}, channels={cfg.channels} (NHWC expected)")
        patches = self.stem(images.astype(cfg.compute_dtype))
        if patch_fill is not None:
            mask, token = patch_fill
            patches = jnp.where(mask[..., None], token.astype(patches.dtype), patches)
        table = self.posemb().astype(patches.dtype)
        if side != cfg.image_size:
            grid = (side // cfg.patch_size,) * 2
            table = resize_posemb(table, grid, old_grid=cfg.grid).astype(patches.dtype)
        patches = patches + table[:, 1:]
        if patch_keep is not None:
            patches = jnp.take_along_axis(patches, patch_keep[..., None], axis=1)
        cls = jnp.broadcast_to(self.cls[...].astype(patches.dtype) + table[:, :1],
                               (patches.shape[0], 1, cfg.width))
        tokens = [cls, patches]
        if self.registers is not None:  # after cls, with no position (DINOv2)
            tokens.insert(1, jnp.broadcast_to(self.registers[...].astype(patches.dtype),
                                              (patches.shape[0], cfg.registers, cfg.width)))
        return jnp.concatenate(tokens, axis=1)

    def encode(self, images: jax.Array, *, patch_keep: jax.Array | None = None,
               patch_fill: tuple[jax.Array, jax.Array] | None = None, collect: bool = False,
               any_size: bool = False):
        """Tokens after the last layer, (B, 1 + N, d), and the intermediates when `collect`:
        tokens_in (B, 1+N, d) and, stacked over layers, tokens_mssa and tokens_out (L, B, 1+N, d),
        codes (L, B, 1+N, d or C·d) and attention (L, B, K, 1+N, 1+N)."""
        z0 = self.embed(images, patch_keep, patch_fill, any_size=any_size)
        z, inter = self.encoder(z0, collect=collect)
        if inter is not None:
            inter["tokens_in"] = z0
        return z, inter

    def pool(self, tokens: jax.Array) -> jax.Array:
        if self.cfg.pool == "cls":
            return tokens[:, 0]
        if self.cfg.block == "crate":
            return tokens.mean(1)
        return tokens[:, 1 + self.cfg.registers:].mean(1)  # the patch tokens

    def head_input(self, tokens: jax.Array) -> jax.Array:
        """The pooled, normalised representation the head reads, (B, d), from the tokens."""
        if self.cfg.block == "crate":
            return self.norm(self.pool(tokens))
        return self.pool(self.norm(tokens))

    def features(self, images: jax.Array) -> jax.Array:
        """head_input of the images in float32: the frozen feature that probes read (for a
        DINO ViT, the cls token after the final norm, as its eval_knn.py takes it)."""
        return self.head_input(self.encode(images)[0]).astype(jnp.float32)

    def __call__(self, images: jax.Array, *, patch_keep: jax.Array | None = None,
                 collect: bool = False, any_size: bool = False):
        z, inter = self.encode(images, patch_keep=patch_keep, collect=collect,
                               any_size=any_size)
        features = self.head_input(z)
        out = features if self.head is None else self.head(features)
        out = out.astype(jnp.float32)
        return (out, inter) if collect else out
