"""Two-tower image-text model (CLIP / CLIPA) with a CRATE-α, CRATE or ViT image tower.

    u = normalize(f_img(x) · W_img)        f_img: any registry image model, num_classes=0
    v = normalize(f_txt(t) · W_txt)        f_txt: a registry text tower
    logits = exp(s) · u vᵀ (+ b)       s learnable (log-parametrised); b: SigLIP

InfoNCE (CLIP): s starts at log(1/0.07) and the train step keeps it in [0, log 100] after every
update (ContrastiveTask.param_bounds: a bound on the parameter, not a clip in the forward pass,
so its gradient survives at the bound). Sigmoid (SigLIP): s starts at log 10 and b at −10, with
no bound on s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models import registry
from crate_jax.models.layers import Dense, param


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipConfig:
    image: str = "crate-alpha-l/14"
    image_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    text: str = "text-b"
    text_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    embed_dim: int = 768
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float | None = math.log(100.0)  # None: no bound (SigLIP)
    logit_bias_init: float = 0.0  # SigLIP starts at −10

    def __post_init__(self):
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim: must be positive, got {self.embed_dim}")
        if self.logit_scale_max is not None and self.logit_scale_init > self.logit_scale_max:
            raise ValueError(f"logit_scale_init={self.logit_scale_init} exceeds "
                             f"logit_scale_max={self.logit_scale_max}")


def _normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class CLIP(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.image = registry.create(cfg.image, rngs=rngs,
                                     **{**dict(cfg.image_overrides), "num_classes": 0})
        self.text = registry.create(cfg.text, rngs=rngs, **dict(cfg.text_overrides))
        d_img, d_txt = self.image.cfg.width, self.text.cfg.width
        self.image_proj = Dense(d_img, cfg.embed_dim, axes=("embed", "mlp"), use_bias=False,
                                kernel_init=jax.nn.initializers.normal(d_img ** -0.5),
                                rngs=rngs)
        self.text_proj = Dense(d_txt, cfg.embed_dim, axes=("embed", "mlp"), use_bias=False,
                               kernel_init=jax.nn.initializers.normal(d_txt ** -0.5),
                               rngs=rngs)
        self.logit_scale = param(rngs, jax.nn.initializers.constant(cfg.logit_scale_init), (),
                                 (), jnp.float32)
        self.logit_bias = param(rngs, jax.nn.initializers.constant(cfg.logit_bias_init), (),
                                (), jnp.float32)

    def encode_image(self, images: jax.Array, patch_keep: jax.Array | None = None) -> jax.Array:
        return _normalize(self.image_proj(self.image(images, patch_keep=patch_keep)))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        return _normalize(self.text_proj(self.text(tokens)))

    def scale(self) -> jax.Array:
        """t = exp(s); the train step keeps s within its bound (see the module docstring)."""
        return jnp.exp(self.logit_scale[...])

    def __call__(self, images: jax.Array, tokens: jax.Array,
                 patch_keep: jax.Array | None = None):
        """(image embeddings, text embeddings, scale t, bias b)."""
        return (self.encode_image(images, patch_keep), self.encode_text(tokens), self.scale(),
                self.logit_bias[...])
