"""Model names → configurations → modules.

Names: "crate-b/16", "crate-alpha-l/14", "vit-b/16" (family-size/patch), and for text towers
"text-b", "crate-alpha-text-b" (CLIP-style: causal, pooled at the end-of-text token) and
"clipa-text-b/l/h" (the CRATE-α-CLIPA text towers: bidirectional, no padding mask, pooled at the
last position, GELU-tanh MLP, 32 tokens of a 32,000-row table), and ToST "tost-{t,s}-12/16",
"tost-{t,s,m,l}-24/16" (models/tost.py; "tost-gpt-*" are language models). Sizes are
case-insensitive except where two differ only by case (CRATE-α and ViT "g" and "G").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from crate_jax.models import layer_stack
from crate_jax.models.autoencoder import MAEConfig, MaskedAutoencoder
from crate_jax.models.config import TextConfig, VisionConfig
from crate_jax.models.language import create_lm
from crate_jax.models.lm_config import available_lm
from crate_jax.models.text import TextTransformer
from crate_jax.models.tost import (
    ToSTConfig,
    ToSTVision,
    available_tost,
    is_tost_name,
    tost_config_for,
)
from crate_jax.models.vision import VisionTransformer

# size: (width, depth, heads[, mlp_dim])
VISION_SIZES = {
    "crate": {"T": (384, 12, 6), "S": (576, 12, 12), "B": (768, 12, 12), "L": (1024, 24, 16)},
    "crate_alpha": {
        "Ti": (192, 12, 3), "S": (576, 12, 12), "B": (768, 12, 12), "L": (1024, 24, 16),
        "H": (1280, 32, 16), "g": (1408, 40, 16), "G": (1664, 48, 16), "e": (1792, 56, 16),
    },
    "vit": {
        "Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072),
        "L": (1024, 24, 16, 4096), "H": (1280, 32, 16, 5120), "g": (1408, 40, 16, 6144),
        "G": (1664, 48, 16, 8192),
    },
}
# CLIP-style text widths per size.
TEXT_SIZES = {"Ti": (192, 12, 3), "S": (384, 12, 6), "B": (512, 12, 8), "L": (768, 12, 12),
              "H": (1024, 24, 16)}
# The CLIPA text towers (CRATE-α's torch_inference/model/clipa_model.py, big_vision's text
# transformer): B 512 × 12 (8 heads), L 768 × 12 (12), H 1024 × 24 (16).
CLIPA_TEXT_SIZES = {"B": (512, 12, 8), "L": (768, 12, 12), "H": (1024, 24, 16)}
FAMILIES = {"crate": "crate", "crate-alpha": "crate_alpha", "vit": "vit",
            "text": "vit", "crate-alpha-text": "crate_alpha", "clipa-text": "vit"}
# Settings a family starts from (overrides still win).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "clipa-text": dict(causal=False, mask_padding=False, pool="last",
                       mlp_activation="gelu_tanh", context_length=32, vocab_size=32_000,
                       pad_id=0),
}

_NAME = re.compile(r"^(?P<family>clipa-text|crate-alpha-text|crate-alpha|crate|vit|text)-"
                   r"(?P<size>[A-Za-z]+)(?:/(?P<patch>\d+))?$", re.IGNORECASE)


# Masked autoencoders (autoencoder.py): 'crate-mae-b/16' is the official crate_ae model
# (docs/design.md §1): the decoder mirrors the encoder, conv stem without LayerNorm, MAE's sin-cos
# table, ISTA λ = 0.5, block LayerNorms eps 1e-5 (torch's default) and the two final ones
# 1e-6. 'vit-mae-b/16': MAE's light decoder, 512 wide, 8 deep, 16 heads, big_vision's sin-cos
# table. Both pool the mean for their features.
_MAE_NAME = re.compile(r"^(?P<family>crate|vit)-mae-(?P<size>[A-Za-z]+)/(?P<patch>\d+)$",
                       re.IGNORECASE)
MAE_DECODER_FIELDS = ("decoder_width", "decoder_depth", "decoder_heads", "mask_in_encoder")
MAE_DEFAULTS: dict[str, dict[str, Any]] = {
    "crate": dict(lam=0.5, head_norm_eps=1e-6, stem="conv", posemb="sincos2d_mae",
                  mask_in_encoder=True),
    "vit": dict(posemb="sincos2d", decoder_width=512, decoder_depth=8, decoder_heads=16,
                mask_in_encoder=False),
}


def available() -> list[str]:
    """Every family-size, for error messages and discovery (any patch size is accepted)."""
    names = [f"{fam}-{size}/P" for fam, block in FAMILIES.items() if "text" not in fam
             for size in VISION_SIZES[block]]
    names += [f"{fam}-mae-{size}/P" for fam in MAE_DEFAULTS for size in VISION_SIZES[fam]]
    names += [f"{fam}-{size}" for fam in FAMILIES if "text" in fam
              for size in _text_sizes(fam)]
    return names + available_tost() + available_lm()


def is_language_model(name: str) -> bool:
    """A causal or masked language model's name ('crate-gpt-small', 'bert-base', ...)."""
    return name.strip().lower() in {n.lower() for n in available_lm()}


def is_autoencoder(name: str) -> bool:
    return bool(_MAE_NAME.match(name.strip()))


def mae_config_for(name: str, **overrides) -> MAEConfig:
    """The masked-autoencoder configuration for 'crate-mae-b/16' or 'vit-mae-b/16'; overrides
    are encoder fields, or decoder_width/depth/heads and mask_in_encoder."""
    match = _MAE_NAME.match(name.strip())
    if not match:
        raise ValueError(f"unknown masked-autoencoder name {name!r}; known models: "
                         f"{', '.join(available())}")
    family = match["family"].lower()
    fields = {**MAE_DEFAULTS[family], **overrides}
    decoder = {k: fields.pop(k) for k in MAE_DECODER_FIELDS if k in fields}
    encoder = config_for(f"{family}-{match['size']}/{match['patch']}",
                         **{"num_classes": 0, "pool": "gap", **fields})
    for key, value in (("width", encoder.width), ("depth", encoder.depth),
                       ("heads", encoder.heads)):  # CRATE-MAE: the decoder mirrors the encoder
        decoder.setdefault(f"decoder_{key}", value)
    return MAEConfig(encoder=encoder, **decoder)


def _text_sizes(family: str) -> dict[str, tuple]:
    return CLIPA_TEXT_SIZES if family == "clipa-text" else TEXT_SIZES


def _size(table: dict, size: str, name: str) -> tuple:
    if size in table:
        return table[size]
    matches = [k for k in table if k.lower() == size.lower()]
    if len(matches) == 1:
        return table[matches[0]]
    raise ValueError(f"unknown model name {name!r}: size {size!r} not in {sorted(table)}; "
                     f"known models: {', '.join(available())}")


def config_for(name: str, **overrides) -> VisionConfig | TextConfig:
    """The validated configuration for a registry name, with field overrides applied."""
    if is_tost_name(name):
        return tost_config_for(name, **overrides)
    match = _NAME.match(name.strip())
    if not match:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(available())}")
    family, patch = match["family"].lower(), match["patch"]
    block = FAMILIES[family]
    is_text = "text" in family
    if is_text == (patch is not None):
        hint = "text towers take no patch size" if is_text else "add the patch size, e.g. /16"
        raise ValueError(f"unknown model name {name!r}: {hint}")
    table = _text_sizes(family) if is_text else VISION_SIZES[block]
    dims = _size(table, match["size"], name)
    fields = dict(block=block, width=dims[0], depth=dims[1], heads=dims[2],
                  **FAMILY_DEFAULTS.get(family, {}))
    if len(dims) > 3:
        fields["mlp_dim"] = dims[3]
    cls = TextConfig if is_text else VisionConfig
    if not is_text:
        fields["patch_size"] = int(patch)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model setting(s) {unknown} for {name!r}; "
                         f"settings are {sorted(known)}")
    return cls(**{**fields, **overrides})


def preset_fields(name: str) -> dict[str, Any]:
    """The fields a registry name sets before any override: its size and its family's
    defaults (e.g. clipa-text-h: width 1024, ..., pool 'last', vocab_size 32000)."""
    if is_tost_name(name):
        cfg = tost_config_for(name)
        return dict(width=cfg.width, depth=cfg.depth, heads=cfg.heads,
                    layer_scale_init=cfg.layer_scale_init)
    match = _NAME.match(name.strip())
    if not match:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(available())}")
    family = match["family"].lower()
    table = _text_sizes(family) if "text" in family else VISION_SIZES[FAMILIES[family]]
    dims = _size(table, match["size"], name)
    return dict(width=dims[0], depth=dims[1], heads=dims[2], **FAMILY_DEFAULTS.get(family, {}))


def build(cfg: VisionConfig | TextConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The module for a configuration."""
    if isinstance(cfg, TextConfig):
        return TextTransformer(cfg, rngs=rngs)
    if isinstance(cfg, ToSTConfig):
        return ToSTVision(cfg, rngs=rngs)
    return VisionTransformer(cfg, rngs=rngs)


def create(name: str, *, seed: int = 0, rngs: nnx.Rngs | None = None,
           **overrides) -> nnx.Module:
    """Build a model by name, e.g. create("crate-alpha-l/14", num_classes=0, dtype="bfloat16").

    To get the shapes without allocating anything: nnx.eval_shape(lambda: create(name)).
    """
    rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed + 1)
    if is_autoencoder(name):
        return MaskedAutoencoder(mae_config_for(name, **overrides), rngs=rngs)
    if is_language_model(name):
        return create_lm(name, rngs=rngs, **overrides)
    return build(config_for(name, **overrides), rngs=rngs)


def flat_params(tree: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """A nested parameter dict as {'encoder/layers/attn/proj': leaf} ('/'-joined paths)."""
    return layer_stack.flatten(tree, prefix)


def count_params(model: nnx.Module) -> int:
    """The number of trainable parameters (nnx.Param leaves); works on abstract models too."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(math.prod(leaf.shape) for leaf in leaves)
