"""Masked autoencoders: CRATE-MAE (the CRATE encoder, then its transpose, the CRATE decoder)
and a ViT-MAE baseline with the same interface (DESIGN.md §1, "CRATE autoencoder blocks").

    E  = stem(x)                                      (B, N, d) patch embeddings
    m  ∈ {0, 1}^{B×N}                                 1 = hidden patch (ratio r of them)
  mask tokens in the encoder (CRATE-MAE, the official crate_ae):
    Z⁰ = [cls; m ⊙ t_mask + (1 − m) ⊙ E] + P          P fixed 2-D sin-cos, every patch
    H  = LN(Encoderᴸ(Z⁰))
  visible patches only (ViT-MAE, and CRATE-MAE with mask_in_encoder=False):
    Z⁰ = [cls; (E + P)[visible]];  H = LN(Encoderᴸ(Z⁰))·W_e
    H  = unshuffle(H, fill = t_mask) + P_dec         back to 1 + N tokens
    Ŷ  = Linear(LN(Decoder(H)))[1:]                    (B, N, P²·C) predicted pixels

The encoder is a `VisionTransformer` without head (`backbone`), so a finetune (config
`init_from` with `init_prefix='backbone'`), the probes and the white-box tools see exactly the
image model they know. The CRATE decoder layer (`DecoderLayer`) is the transpose of the CRATE
encoder layer (encoder.Layer):

    encoder:  Z½ = Z + MSSA(LN(Z));   Z' = ReLU(LN(Z½)·M − ηλ)     compress, then sparsify
    decoder:  G  = LN(Z)·Wᵀ;          Z' = G − MSSA(LN(G))          un-sparsify, de-compress

and the decoder runs its layers in the forward order of its own stack, as the reference does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from crate_jax.models.blocks import MSSA, kaiming_uniform
from crate_jax.models.config import TowerConfig, VisionConfig
from crate_jax.models.encoder import LAYER_AXIS, Encoder, remat_body
from crate_jax.models.layers import Dense, LayerNorm, normal, param, sincos_2d, xavier_uniform
from crate_jax.models.vision import VisionTransformer
from crate_jax.parallel.sharding import constrain_to_batch


@dataclasses.dataclass(frozen=True, kw_only=True)
class MAEConfig:
    """encoder: the image model without head (num_classes=0). The decoder has the encoder's
    block family (CRATE: DecoderLayer; ViT: ViT layers) at its own width/depth/heads.
    mask_in_encoder: the encoder sees every position, hidden ones as the mask token
    (CRATE-MAE); False: it sees the visible patches only (MAE)."""

    encoder: VisionConfig
    decoder_width: int
    decoder_depth: int
    decoder_heads: int
    mask_in_encoder: bool = True

    def __post_init__(self):
        if self.encoder.num_classes:
            raise ValueError("num_classes: a masked autoencoder's encoder has no head "
                             f"(num_classes=0), got {self.encoder.num_classes}")
        if self.encoder.block == "crate_alpha":
            raise ValueError("block: masked autoencoders are 'crate' (CRATE-MAE) or 'vit' "
                             "(ViT-MAE)")
        if self.decoder_width % 4:
            raise ValueError(f"decoder_width: the decoder's sin-cos table needs a multiple "
                             f"of 4, got {self.decoder_width}")
        _ = self.decoder  # builds (so validates) the decoder's TowerConfig

    @property
    def decoder(self) -> TowerConfig:
        enc = self.encoder
        extra = {} if enc.block == "crate" else {"mlp_dim": 4 * self.decoder_width}
        return TowerConfig(block=enc.block, width=self.decoder_width, depth=self.decoder_depth,
                           heads=self.decoder_heads, layer_norm_eps=enc.layer_norm_eps,
                           dtype=enc.dtype, param_dtype=enc.param_dtype,
                           attention_impl=enc.attention_impl, remat=enc.remat,
                           scan_layers=enc.scan_layers, **extra)

    @property
    def patch_dim(self) -> int:
        return self.encoder.patch_size ** 2 * self.encoder.channels

    @property
    def decoder_embed(self) -> bool:
        """A linear map from the encoder width to the decoder width before the decoder."""
        return not self.mask_in_encoder or self.decoder_width != self.encoder.width


class DecoderLayer(nnx.Module):
    """One CRATE decoder layer, the transpose of the encoder's compress-then-sparsify step:

        G  = LN(Z)·Wᵀ              W ∈ R^{d×d}, no bias, no ReLU: undoes the sparse coding
        Z' = G − MSSA(LN(G))        the compression step taken backwards (subtracted)
    """

    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, rngs=rngs)
        self.dtype = cfg.compute_dtype
        self.norm = LayerNorm(cfg.width, eps=cfg.eps, **kw)
        # stored (d, d) as the encoder's ISTA dictionary is, kaiming-uniform like it
        self.weight = param(rngs, kaiming_uniform(in_axis=1, out_axis=0),
                            (cfg.width, cfg.width), ("embed", "mlp"), cfg.storage_dtype)
        self.attn = MSSA(cfg.width, cfg.heads, out_bias=True, eps=cfg.eps,
                         attention_impl=cfg.attention_impl, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.norm(z)
        g = (x.reshape(-1, x.shape[-1]) @ self.weight[...].astype(self.dtype).T).reshape(z.shape)
        g = checkpoint_name(g, "layer_mid")  # a matmul product: saved under remat "minimal"
        o, _ = self.attn(g)
        return g - o


class CrateDecoder(nnx.Module):
    """`depth` DecoderLayers, stacked on the `layers` axis and run by one scan."""

    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.remat, self.depth = cfg.remat, cfg.depth
        self.unroll = 1 if cfg.scan_layers else cfg.depth

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, rngs=rngs)

        self.layers = make_layers(rngs)

    def layer(self, index: int) -> DecoderLayer:
        """Layer `index` on its own (a view of slice `index` of the stacked parameters)."""
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))

    def __call__(self, z: jax.Array, *, collect: bool = False):
        """Z after every layer; with `collect`, (Z, every layer's output (L, B, N, d))."""
        def body(layer: DecoderLayer, z: jax.Array):
            z = constrain_to_batch(layer(constrain_to_batch(z)))
            return z, (z if collect else None)

        body = remat_body(body, self.remat)
        scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0),
                        unroll=self.unroll)
        z, outs = scan(self.layers, z)
        return (z, outs) if collect else z


def hidden_count(ratio: float, num_patches: int) -> int:
    """round(r·N), the patches a mask hides; ValueError naming mask_ratio unless it hides at
    least one patch and leaves at least one."""
    hidden = round(ratio * num_patches)
    if not 0 < hidden < num_patches:
        raise ValueError(f"mask_ratio={ratio} hides {hidden} of {num_patches} patches; it must "
                         "hide at least one and leave at least one")
    return hidden


def random_mask(rng: jax.Array, batch: int, num_patches: int, ratio: float
                ) -> tuple[jax.Array, jax.Array]:
    """(mask (B, N) bool, True = hidden; visible (B, N − round(r·N)) int32 patch indices in
    ascending order): every example hides exactly round(r·N) patches chosen uniformly."""
    hidden = hidden_count(ratio, num_patches)
    noise = jax.random.uniform(rng, (batch, num_patches))
    visible = jnp.sort(jnp.argsort(noise, axis=1)[:, : num_patches - hidden], axis=1)
    mask = jnp.ones((batch, num_patches), bool)
    mask = mask.at[jnp.arange(batch)[:, None], visible].set(False)
    return mask, visible.astype(jnp.int32)


class MaskedAutoencoder(nnx.Module):
    """CRATE-MAE or ViT-MAE (see the module docstring). `reconstruct(images, mask, visible)`
    predicts every patch's pixels (B, N, P²·C); `__call__(images)` is the backbone's pooled
    features, so the model is also an image encoder (probes, analysis)."""

    def __init__(self, cfg: MAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        enc, dec = cfg.encoder, cfg.decoder
        pdt = enc.storage_dtype
        self.backbone = VisionTransformer(enc, rngs=rngs)
        width = enc.width if cfg.mask_in_encoder else dec.width
        self.mask_token = param(rngs, normal(0.02), (1, 1, width), (None, None, "embed"), pdt)
        self.decoder_embed = (Dense(enc.width, dec.width, axes=("embed", "mlp"),
                                    kernel_init=xavier_uniform(), dtype=dec.compute_dtype,
                                    param_dtype=pdt, rngs=rngs) if cfg.decoder_embed else None)
        if not cfg.mask_in_encoder:  # the decoder needs positions again (fixed, as MAE)
            table = jnp.concatenate([jnp.zeros((1, dec.width)),
                                     jnp.asarray(sincos_2d(*enc.grid, dec.width))])
            self.decoder_posemb = nnx.Variable(table[None])
        self.decoder = (CrateDecoder(dec, rngs=rngs) if enc.block == "crate"
                        else Encoder(dec, rngs=rngs))
        self.decoder_norm = LayerNorm(dec.width, eps=dec.eps, dtype=jnp.float32,
                                      param_dtype=pdt, rngs=rngs)
        self.pred = Dense(dec.width, cfg.patch_dim, axes=("embed", None),
                          kernel_init=xavier_uniform(), dtype=jnp.float32, param_dtype=pdt,
                          rngs=rngs)

    def __call__(self, images: jax.Array, *, collect: bool = False):
        return self.backbone(images, collect=collect)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """L2-normalised pooled backbone features of whole images (the probes' input)."""
        features = self.backbone(images).astype(jnp.float32)
        return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-6)

    def _encode(self, images: jax.Array, mask: jax.Array, visible: jax.Array) -> jax.Array:
        backbone = self.backbone
        if self.cfg.mask_in_encoder:
            token = self.mask_token[...].astype(backbone.cfg.compute_dtype)
            z, _ = backbone.encode(images, patch_fill=(mask, token))
        else:
            z, _ = backbone.encode(images, patch_keep=visible)
        return backbone.norm(z)

    def _unshuffle(self, h: jax.Array, mask: jax.Array, visible: jax.Array) -> jax.Array:
        """[cls; visible tokens] → [cls; N tokens], hidden positions the mask token."""
        batch, n = mask.shape
        token = self.mask_token[...].astype(h.dtype)
        full = jnp.broadcast_to(token, (batch, n, h.shape[-1]))
        full = full.at[jnp.arange(batch)[:, None], visible].set(h[:, 1:])
        full = jnp.concatenate([h[:, :1], full], axis=1)
        return full + self.decoder_posemb[...].astype(h.dtype)

    def _decoder_input(self, images: jax.Array, mask: jax.Array,
                       visible: jax.Array) -> jax.Array:
        h = self._encode(images, mask, visible)
        if self.decoder_embed is not None:
            h = self.decoder_embed(h)
        if not self.cfg.mask_in_encoder:
            h = self._unshuffle(h, mask, visible)
        return h

    def reconstruct(self, images: jax.Array, mask: jax.Array, visible: jax.Array) -> jax.Array:
        """Predicted pixels of every patch, (B, N, P²·C) float32 (normalised-image units, or
        per-patch normalised units when the loss uses normalised targets)."""
        h = self._decoder_input(images, mask, visible)
        if isinstance(self.decoder, CrateDecoder):
            h = self.decoder(h)
        else:
            h, _ = self.decoder(h)
        return self.pred(self.decoder_norm(h))[:, 1:].astype(jnp.float32)

    def decoder_points(self, images: jax.Array) -> list[jax.Array]:
        """The tokens entering each CRATE decoder layer and leaving the last, nothing masked
        (L + 1 sets of (B, 1 + N, d)): where the white-box tools measure the decoder."""
        if not isinstance(self.decoder, CrateDecoder):
            raise ValueError("the decoder of a ViT-MAE has no MSSA subspaces to measure")
        batch, n = images.shape[0], self.cfg.encoder.num_patches
        mask = jnp.zeros((batch, n), bool)
        visible = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
        h = self._decoder_input(images, mask, visible)
        _, outs = self.decoder(h, collect=True)
        return [h, *[outs[i] for i in range(outs.shape[0])]]
