"""Masked autoencoders: CRATE-MAE (the CRATE encoder, then its transpose, the CRATE decoder)
and a ViT-MAE baseline with the same interface (docs/design.md §1, "CRATE autoencoder blocks").

    E  = Conv_P(x)                                    (B, N, d) patch embeddings, no LayerNorm
    m  ∈ {0, 1}^{B×N}                                 1 = hidden: N − int(N·(1 − r)) patches
  mask tokens in the encoder (CRATE-MAE, the official crate_ae):
    Z⁰ = [cls; m ⊙ t_mask + (1 − m) ⊙ E] + P          P MAE's fixed 2-D sin-cos, every patch
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

What docs/design.md leaves open follows the official crate_ae (model/crate_ae of the CRATE repo):
the decoder runs its layers in the forward order of its own stack (decoder_blocks.0 first);
it takes the encoder's normalised output as it is (no decoder_embed, no second position
table: the official `decoder_embed` is built but never called, and the one table it adds,
`decoder_pos_embed`, goes in at the encoder's input), cls token included, which is dropped
after the pixel head; the block LayerNorms are torch's default (eps 1e-5), the two final
ones eps 1e-6; λ = 0.5 in the encoder's ISTA (the decoder has no threshold); the mask is
MAE's (`mask_from_noise`); the initialisation is `_init_as_reference`.
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
from crate_jax.models.layers import (
    POSEMB_TABLES,
    Dense,
    LayerNorm,
    normal,
    param,
    sincos_2d,
    torch_default_bias,
    xavier_uniform,
    zeros,
)
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
    """N − int(N·(1 − r)), the patches a mask hides: MAE's random_masking (and so the official
    crate_ae) keeps len_keep = int(N·(1 − r)), e.g. N = 64, r = 0.6 keeps 25 and hides 39.
    ValueError naming mask_ratio unless it hides at least one patch and leaves at least one."""
    hidden = num_patches - int(num_patches * (1 - ratio))
    if not 0 < hidden < num_patches:
        raise ValueError(f"mask_ratio={ratio} hides {hidden} of {num_patches} patches; it must "
                         "hide at least one and leave at least one")
    return hidden


def mask_from_noise(noise: jax.Array, ratio: float) -> tuple[jax.Array, jax.Array]:
    """The mask that per-patch noise (B, N) makes, as MAE's random_masking makes it: the
    patches in ascending order of their noise, the first int(N·(1 − r)) kept, the others
    hidden. The same noise given to another implementation gives it the same mask.

    Returns (mask (B, N) bool, True = hidden; visible (B, M) int32 patch indices, ascending)."""
    batch, num_patches = noise.shape
    hidden = hidden_count(ratio, num_patches)
    order = jnp.argsort(noise, axis=1)
    visible = jnp.sort(order[:, : num_patches - hidden], axis=1).astype(jnp.int32)
    mask = jnp.ones((batch, num_patches), bool)
    mask = mask.at[jnp.arange(batch)[:, None], visible].set(False)
    return mask, visible


def random_mask(rng: jax.Array, batch: int, num_patches: int, ratio: float
                ) -> tuple[jax.Array, jax.Array]:
    """`mask_from_noise` of uniform noise drawn from `rng`: every example hides the same
    number of patches (`hidden_count`), chosen uniformly."""
    return mask_from_noise(jax.random.uniform(rng, (batch, num_patches)), ratio)


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
            table_of = POSEMB_TABLES.get(enc.posemb, sincos_2d)  # the encoder's kind of table
            table = jnp.concatenate([jnp.zeros((1, dec.width)),
                                     jnp.asarray(table_of(*enc.grid, dec.width))])
            self.decoder_posemb = nnx.Variable(table[None])
        self.decoder = (CrateDecoder(dec, rngs=rngs) if enc.block == "crate"
                        else Encoder(dec, rngs=rngs))
        # the encoder's final norm and this one are the size presets' norm_layer (eps 1e-6
        # in every official preset), unlike the blocks' pre-norms
        self.decoder_norm = LayerNorm(dec.width, eps=enc.final_eps, dtype=jnp.float32,
                                      param_dtype=pdt, rngs=rngs)
        self.pred = Dense(dec.width, cfg.patch_dim, axes=("embed", None),
                          kernel_init=xavier_uniform(), dtype=jnp.float32, param_dtype=pdt,
                          rngs=rngs)
        if enc.block == "crate":
            self._init_as_reference(rngs)

    def _init_as_reference(self, rngs: nnx.Rngs) -> None:
        """The official crate_ae's initialisation where it differs from the CRATE
        classifier's: every nn.Linear xavier-uniform with a zero bias (the MSSA projections U
        and U_out of encoder and decoder; the pixel head already is), the stem convolution
        xavier-uniform over its (d, P²·C) view with torch's default conv bias U(±1/√(P²·C)),
        the cls token N(0, 0.02). The ISTA and decoder dictionaries stay kaiming-uniform and
        the mask token N(0, 0.02), as there."""
        enc, stem = self.cfg.encoder, self.backbone.stem
        xavier = jax.nn.initializers.xavier_uniform
        draws = [(self.backbone.cls, normal(0.02))]
        if enc.patch_stem == "conv":
            draws.append((stem.kernel, xavier(in_axis=(0, 1, 2), out_axis=3)))
            if stem.bias is not None:
                draws.append((stem.bias, torch_default_bias(enc.patch_size ** 2 * enc.channels)))
        for attn in (self.backbone.encoder.layers.attn, self.decoder.layers.attn):
            draws += [(attn.proj, xavier(in_axis=1, out_axis=(2, 3), batch_axis=0)),
                      (attn.out, xavier(in_axis=(1, 2), out_axis=3, batch_axis=0)),
                      (attn.out_bias, zeros)]
        for var, init in draws:
            var[...] = init(rngs.params(), var[...].shape, var[...].dtype)

    def __call__(self, images: jax.Array, *, collect: bool = False):
        return self.backbone(images, collect=collect)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """L2-normalised pooled backbone features of whole images (the probes' input)."""
        features = self.backbone(images).astype(jnp.float32)
        return features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-6)

    def encode_masked(self, images: jax.Array, mask: jax.Array,
                      visible: jax.Array) -> jax.Array:
        """H, the encoder's normalised output for masked images: (B, 1 + N, d) with the mask
        tokens inside the encoder (the official forward_encoder's latent), (B, 1 + M, d) of
        the visible patches otherwise."""
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
        h = self.encode_masked(images, mask, visible)
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
