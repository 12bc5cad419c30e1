"""The CRATE-α-CLIPA two-tower PyTorch release (`crate_alpha_CLIPA_L14.pth`, `..._H14.pth`;
docs/design.md §3) ↔ our CLIP with a CRATE-α image tower and the CLIPA text tower.

    visual.conv1.weight (d, 3, P, P), no bias        image/stem/kernel (P, P, 3, d)
    visual.class_embedding (d,)                      image/cls (1, 1, d)
    visual.positional_embedding (N+1, d)             image/posemb/embedding (1, N+1, d)
    visual.transformer.resblocks.{i}.
        ln_1, ln_2                                   image/encoder/layers/{i}/{attn,sparse}/norm
        attn.in_proj_weight (3d, d) = [Uᵀ; Uᵀ; Uᵀ]   .../attn/proj  U (d, K, p)
        attn.out_proj.weight (d, d), no bias         .../attn/out   (K, p, d)
        mlp.c_fc, mlp.c_proj (d, 4d)                 .../sparse/D, .../sparse/D1
    visual.ln_post, visual.proj (d, e)               image/norm, image_proj/kernel (d, e)
    token_embedding.weight (V, w)                    text/token_embedding (V, w)
    positional_embedding (T, w)                      text/pos_embedding (1, T, w)
    transformer.resblocks.{i}.
        ln_1, ln_2                                   text/encoder/layers/{i}/{attn,sparse}/norm
        attn.in_proj_{weight (3w, w), bias (3w)}     .../attn/{query,key,value}[_bias]
        attn.out_proj.{weight, bias}                 .../attn/out, .../attn/out_bias
        mlp.c_fc.{weight (4w, w), bias}              .../sparse/fc1   (GELU, tanh form)
        mlp.c_proj.{weight (w, 4w), bias}            .../sparse/fc2
    ln_final, text_projection                        text/norm, text_proj/kernel (w, e)
    logit_scale ()                                   logit_scale   (log of the multiplier)

MSSA stored as a torch MultiheadAttention: query = key = value = U, so the three (d, d) blocks
of `in_proj_weight` must be the same matrix; a checkpoint where they differ is refused, naming
the layer (it is not an MSSA). The text tower's feature is `pooled · text_projectionᵀ`: the
release's matrix is square (1024 × 1024), and a non-square one is read as (embed, width), the
shape that product needs. Heads are not stored: the image tower's come from the CRATE-α size
table by width (or `heads`), the text tower's are width / 64 as in the port (or `text_heads`).
The release has no SigLIP bias; ours (unused by InfoNCE) is set to 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from crate_jax import models
from crate_jax.convert.crate_family import alpha_overrides, name_and_overrides, resolve_heads
from crate_jax.convert.files import save_weights
from crate_jax.convert.primitives import (
    ConversionError,
    Entry,
    apply_spec,
    build_loaded,
    check_params_fit,
    closest_size,
    flatten_source,
    grid_side,
    in_proj_part,
    layer_count,
    nest,
    per_layer_flat,
    vote,
)
from crate_jax.models.clip import CLIP, ClipConfig
from crate_jax.models.registry import CLIPA_TEXT_SIZES

LAYOUT = "crate-alpha-clipa-torch"
VISUAL_BLOCK = "visual.transformer.resblocks.{i}"
TEXT_BLOCK = "transformer.resblocks.{i}"
PORT_EPS = 1e-6  # every LayerNorm of the port
PORT_TEXT_HEAD_WIDTH = 64  # the port builds its text tower with width // 64 heads
# The release's evaluation (torch_inference/eval_in1k.py): Resize(224) (bilinear, the short
# side), CenterCrop(224), ImageNet mean/std; run configs carry it so that crate_jax.load and
# crate_jax.evaluate preprocess as the release does without flags.
RELEASE_EVAL_PREPROCESSING = {"eval_crop_fraction": 1.0, "eval_interpolation": "bilinear",
                              "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
RELEASE_TOKENIZER = "builtin:bert_base_uncased"  # crate_jax/data/assets/bert_base_uncased.txt
BERT_VOCAB_SIZE = 30522


@dataclasses.dataclass(frozen=True)
class ImportedClip:
    """An imported two-tower checkpoint: `clip` holds the ClipConfig fields (image,
    image_overrides, text, text_overrides, embed_dim), `params` the pure parameter dict of
    `CLIP(ClipConfig(**clip))`, `notes` what was inferred."""

    clip: dict[str, Any]
    params: dict[str, Any]
    notes: tuple[str, ...] = ()

    def config(self) -> ClipConfig:
        return ClipConfig(**self.clip)

    def build(self, *, seed: int = 0) -> nnx.Module:
        """The two-tower model with the imported parameters loaded."""
        cfg = self.config()
        return build_loaded(lambda: CLIP(cfg, rngs=nnx.Rngs(seed)), self.params)

    def run_config(self, source: dict[str, Any] | None = None) -> dict[str, Any]:
        """config.json of the run directory: a contrastive run the evaluators and
        `crate_jax.load` read, and that `init_towers` / `init_from` can start from."""
        image = dict(self.clip["image_overrides"])
        text = dict(self.clip["text_overrides"])
        return {
            "trainer": "contrastive",
            "loss": "infonce",
            "model": {"image": self.clip["image"], "text": self.clip["text"],
                      "embed_dim": self.clip["embed_dim"],
                      "image_overrides": {k: v for k, v in image.items() if k != "image_size"},
                      "text_overrides": {k: v for k, v in text.items()
                                         if k != "context_length"}},
            "data": {"image_size": image["image_size"],
                     "context_length": text["context_length"], **RELEASE_EVAL_PREPROCESSING,
                     **self._release_tokenizer()},
            "converted_from": {**(source or {}), "notes": list(self.notes)},
        }

    def _release_tokenizer(self) -> dict[str, str]:
        """data.tokenizer of the release: BERT-base uncased (shipped with the package), when
        the text tower's table can hold its 30,522 ids (the release's has 32,000 rows)."""
        rows = np.shape(self.params["text"]["token_embedding"])[0]
        return {"tokenizer": RELEASE_TOKENIZER} if rows >= BERT_VOCAB_SIZE else {}


def _check_mssa_in_proj(flat: Mapping[str, np.ndarray], depth: int, d: int) -> None:
    """MSSA's query = key = value: the three blocks of every in_proj_weight are one matrix."""
    bad = []
    for i in range(depth):
        key = VISUAL_BLOCK.format(i=i) + ".attn.in_proj_weight"
        w = flat.get(key)
        if w is None or tuple(w.shape) != (3 * d, d):
            continue  # reported by the layout check
        q, k, v = np.asarray(w[:d]), np.asarray(w[d:2 * d]), np.asarray(w[2 * d:])
        if not (np.array_equal(q, k) and np.array_equal(q, v)):
            diff = max(float(np.max(np.abs(q - k))), float(np.max(np.abs(q - v))))
            bad.append(f"{key} (largest difference between its blocks {diff:.3g})")
    if bad:
        raise ConversionError(
            f"cannot import the checkpoint as {LAYOUT}: the query, key and value blocks of "
            f"in_proj_weight differ in {len(bad)} layer(s): {'; '.join(bad)}. MSSA has one "
            "projection U (query = key = value), so these layers are not MSSA layers")


def _vision_spec(d: int, k: int, depth: int, rows: int, patch: int, chans: int, embed: int,
                 stem_bias: bool) -> dict[str, Entry]:
    p = d // k
    spec = {
        "visual.conv1.weight": Entry("image/stem/kernel", (d, chans, patch, patch),
                                     lambda w: w.transpose(2, 3, 1, 0)),
        "visual.class_embedding": Entry("image/cls", (d,), lambda w: w.reshape(1, 1, -1)),
        "visual.positional_embedding": Entry("image/posemb/embedding", (rows, d),
                                             lambda w: w[None]),
        "visual.ln_post.weight": Entry("image/norm/scale", (d,)),
        "visual.ln_post.bias": Entry("image/norm/bias", (d,)),
        "visual.proj": Entry("image_proj/kernel", (d, embed)),
    }
    if stem_bias:
        spec["visual.conv1.bias"] = Entry("image/stem/bias", (d,))
    for i in range(depth):
        t, o = VISUAL_BLOCK.format(i=i), f"image/encoder/layers/{i}"
        spec |= {
            f"{t}.ln_1.weight": Entry(f"{o}/attn/norm/scale", (d,)),
            f"{t}.ln_1.bias": Entry(f"{o}/attn/norm/bias", (d,)),
            f"{t}.attn.in_proj_weight": Entry(f"{o}/attn/proj", (3 * d, d),
                                              lambda w, d=d, k=k, p=p: w[:d].T.reshape(d, k, p)),
            f"{t}.attn.out_proj.weight": Entry(f"{o}/attn/out", (d, d),
                                               lambda w, k=k, p=p: w.T.reshape(k, p, -1)),
            f"{t}.ln_2.weight": Entry(f"{o}/sparse/norm/scale", (d,)),
            f"{t}.ln_2.bias": Entry(f"{o}/sparse/norm/bias", (d,)),
            f"{t}.mlp.c_fc": Entry(f"{o}/sparse/D", (d, 4 * d)),
            f"{t}.mlp.c_proj": Entry(f"{o}/sparse/D1", (d, 4 * d)),
        }
    return spec


def _text_spec(w: int, k: int, depth: int, vocab: int, context: int,
               embed: int) -> dict[str, Entry]:
    p = w // k
    spec = {
        "token_embedding.weight": Entry("text/token_embedding", (vocab, w)),
        "positional_embedding": Entry("text/pos_embedding", (context, w), lambda x: x[None]),
        "ln_final.weight": Entry("text/norm/scale", (w,)),
        "ln_final.bias": Entry("text/norm/bias", (w,)),
        "text_projection": Entry("text_proj/kernel", (embed, w), lambda x: x.T),
        "logit_scale": Entry("logit_scale", (), np.asarray),
    }
    for i in range(depth):
        t, o = TEXT_BLOCK.format(i=i), f"text/encoder/layers/{i}"
        spec |= {
            f"{t}.ln_1.weight": Entry(f"{o}/attn/norm/scale", (w,)),
            f"{t}.ln_1.bias": Entry(f"{o}/attn/norm/bias", (w,)),
            f"{t}.attn.out_proj.weight": Entry(f"{o}/attn/out", (w, w),
                                               lambda x, k=k, p=p: x.T.reshape(k, p, -1)),
            f"{t}.attn.out_proj.bias": Entry(f"{o}/attn/out_bias", (w,)),
            f"{t}.ln_2.weight": Entry(f"{o}/sparse/norm/scale", (w,)),
            f"{t}.ln_2.bias": Entry(f"{o}/sparse/norm/bias", (w,)),
            f"{t}.mlp.c_fc.weight": Entry(f"{o}/sparse/fc1/kernel", (4 * w, w), lambda x: x.T),
            f"{t}.mlp.c_fc.bias": Entry(f"{o}/sparse/fc1/bias", (4 * w,)),
            f"{t}.mlp.c_proj.weight": Entry(f"{o}/sparse/fc2/kernel", (w, 4 * w),
                                            lambda x: x.T),
            f"{t}.mlp.c_proj.bias": Entry(f"{o}/sparse/fc2/bias", (w,)),
        }
    for i in range(depth):  # in_proj's query block; its key and value: _text_key_value
        t, o = TEXT_BLOCK.format(i=i), f"text/encoder/layers/{i}"
        spec[f"{t}.attn.in_proj_weight"] = Entry(
            f"{o}/attn/query", (3 * w, w), lambda x, k=k, p=p: in_proj_part(x, 0, k, p))
        spec[f"{t}.attn.in_proj_bias"] = Entry(
            f"{o}/attn/query_bias", (3 * w,), lambda x, k=k, p=p: in_proj_part(x, 0, k, p))
    return spec


def _image_sizes(flat: Mapping[str, np.ndarray], heads: int | None, meta: Mapping[str, str],
                 notes: list[str]) -> tuple[int, int, int, int, int, int, int]:
    """(width d, patch, chans, table rows, grid side, depth, heads k) of the image tower."""
    vis = "visual.transformer.resblocks.0"
    d = vote(flat, [("visual.class_embedding", lambda s: s[0]),
                    ("visual.conv1.weight", lambda s: s[0]),
                    (vis + ".ln_1.weight", lambda s: s[0]), ("visual.proj", lambda s: s[0]),
                    ("visual.ln_post.weight", lambda s: s[0])], "image width", LAYOUT)
    patch = vote(flat, [("visual.conv1.weight", lambda s: s[-1])], "patch size", LAYOUT)
    chans = vote(flat, [("visual.conv1.weight", lambda s: s[1])], "input channels", LAYOUT)
    rows = vote(flat, [("visual.positional_embedding", lambda s: s[0])], "position table",
                LAYOUT)
    side = grid_side(rows - 1, f"{LAYOUT} visual.positional_embedding")
    depth = layer_count(flat, r"visual\.transformer\.resblocks\.(\d+)\.", LAYOUT)
    k = resolve_heads("crate_alpha", d, heads, None, meta.get("heads"), notes, LAYOUT)
    return d, patch, chans, rows, side, depth, k


def _text_sizes(flat: Mapping[str, np.ndarray], text_heads: int | None,
                meta: Mapping[str, str], notes: list[str]) -> tuple[int, int, int, int, int]:
    """(width w, vocab, context, depth, heads kt) of the text tower; the heads are
    `text_heads`, the file's metadata, else width / 64 as the port builds them."""
    w = vote(flat, [("token_embedding.weight", lambda s: s[1]),
                    ("positional_embedding", lambda s: s[1]), ("ln_final.weight", lambda s: s[0]),
                    ("text_projection", lambda s: s[1])], "text width", LAYOUT)
    vocab = vote(flat, [("token_embedding.weight", lambda s: s[0])], "vocabulary", LAYOUT)
    context = vote(flat, [("positional_embedding", lambda s: s[0])], "context length", LAYOUT)
    depth = layer_count(flat, r"transformer\.resblocks\.(\d+)\.", LAYOUT)
    kt = text_heads or int(meta.get("text_heads", 0)) or max(w // PORT_TEXT_HEAD_WIDTH, 1)
    if w % kt:
        raise ConversionError(f"{LAYOUT}: {kt} text heads do not divide the text width {w}; "
                              "pass text_heads (CLI --text-heads)")
    notes.append(f"text heads={kt}" + ("" if text_heads or meta.get("text_heads") else
                                       f" (width / {PORT_TEXT_HEAD_WIDTH}, as the port)"))
    return w, vocab, context, depth, kt


def _text_key_value(flat: Mapping[str, np.ndarray], params: dict[str, np.ndarray], w: int,
                    kt: int, depth: int, dtype: Any) -> None:
    """The key and value blocks of the text in_proj tensors into `params`, cast to `dtype`."""
    for i in range(depth):
        t, o = TEXT_BLOCK.format(i=i), f"text/encoder/layers/{i}"
        for j, name in ((1, "key"), (2, "value")):
            for suffix, ours in (("weight", name), ("bias", f"{name}_bias")):
                part = in_proj_part(np.asarray(flat[f"{t}.attn.in_proj_{suffix}"]), j, kt,
                                    w // kt)
                params[f"{o}/attn/{ours}"] = np.array(part, dtype, order="C")


def import_crate_alpha_clipa_torch(source: Mapping[str, Any], *, heads: int | None = None,
                                   text_heads: int | None = None,
                                   allow_extra: Mapping[str, str] | None = None,
                                   metadata: Mapping[str, str] | None = None,
                                   **unused: Any) -> ImportedClip:
    """The CRATE-α-CLIPA PyTorch state dict (module docstring) → ImportedClip."""
    for key, value in unused.items():
        if value is not None:
            raise ConversionError(f"{LAYOUT}: the option {key}={value!r} does not apply to the "
                                  "two-tower import")
    flat, notes = flatten_source(source, ".")
    meta = dict(metadata or {})
    d, patch, chans, rows, side, depth, k = _image_sizes(flat, heads, meta, notes)
    embed = vote(flat, [("visual.proj", lambda s: s[1]), ("text_projection", lambda s: s[0])],
                 "embedding width", LAYOUT)
    w, vocab, context, text_depth, kt = _text_sizes(flat, text_heads, meta, notes)
    _check_mssa_in_proj(flat, depth, d)
    stem_bias = "visual.conv1.bias" in flat
    spec = _vision_spec(d, k, depth, rows, patch, chans, embed, stem_bias)
    spec |= _text_spec(w, kt, text_depth, vocab, context, embed)
    dims = dict(width=d, depth=depth, heads=k, patch=patch, image=side * patch,
                text_width=w, text_depth=text_depth, text_heads=kt, embed=embed)
    image_name, image_size_overrides = name_and_overrides("crate_alpha", d, depth, k, patch,
                                                           None)
    image_overrides: dict[str, Any] = {**image_size_overrides, "image_size": side * patch,
                                       "pool": "cls"}
    image_overrides |= alpha_overrides(stem_bias=stem_bias, ratio=4, chans=chans)
    # the clipa-text size of this width (else 'B' with width/depth/heads overridden)
    text_size, text_overrides = closest_size(
        CLIPA_TEXT_SIZES, dict(width=w, depth=text_depth, heads=kt), default="B")
    text_name = f"clipa-text-{text_size.lower()}"
    text_overrides |= dict(vocab_size=vocab, context_length=context, eot_id=None, pad_id=0)
    dtype = models.config_for(image_name, **image_overrides).storage_dtype
    params = apply_spec(flat, spec, layout=LAYOUT, dims=dims, allow_extra=allow_extra or {},
                        dtype=dtype, notes=notes)
    _text_key_value(flat, params, w, kt, text_depth, dtype)
    params["logit_bias"] = np.zeros((), dtype)
    notes.append("logit_bias set to 0 (the release has none; InfoNCE does not use it)")
    scale = float(params["logit_scale"])
    notes.append(f"logit_scale {scale:.4f} (temperature scale {math.exp(scale):.2f})")
    clip = dict(image=image_name, image_overrides=image_overrides, text=text_name,
                text_overrides=text_overrides, embed_dim=embed)
    imported = ImportedClip(clip, nest(params), tuple(notes))
    cfg = imported.config()
    check_params_fit(lambda: CLIP(cfg, rngs=nnx.Rngs(0)), imported.params,
                     f"the two-tower model {image_name} + {text_name}")
    return imported


def _export_problems(cfg: ClipConfig) -> list[str]:
    """What the port cannot compute of this two-tower model (nothing: it exports)."""
    image = models.config_for(cfg.image, **{**dict(cfg.image_overrides), "num_classes": 0})
    text = models.config_for(cfg.text, **dict(cfg.text_overrides))
    problems = []
    need_image = dict(block="crate_alpha", pool="cls", posemb="learn", eps=PORT_EPS, eta=0.1,
                      lam=0.1, ista_steps=2, overcomplete_ratio=4, layer_scale_init=None)
    need_text = dict(block="vit", causal=False, mask_padding=False, pool="last",
                     mlp_activation="gelu_tanh", eps=PORT_EPS, hidden_dim=4 * text.width,
                     layer_scale_init=None)
    for tower, tower_cfg, need in (("image", image, need_image), ("text", text, need_text)):
        for field, value in need.items():
            if getattr(tower_cfg, field) != value:
                problems.append(f"{tower} {field}={getattr(tower_cfg, field)!r} (the port has "
                                f"{value!r})")
    return problems


def to_crate_alpha_clipa_torch(params: Mapping[Any, Any],
                               cfg: ClipConfig) -> dict[str, np.ndarray]:
    """Our two-tower parameters → the release's state dict (the inverse of the import)."""
    problems = _export_problems(cfg)
    if problems:
        raise ConversionError(f"cannot export to {LAYOUT}: " + "; ".join(problems))
    flat = per_layer_flat(params)
    image = models.config_for(cfg.image, **{**dict(cfg.image_overrides), "num_classes": 0})
    text = models.config_for(cfg.text, **dict(cfg.text_overrides))
    spec = _vision_spec(image.width, image.heads, image.depth, image.num_patches + 1,
                        image.patch_size, image.channels, cfg.embed_dim, image.stem_bias)
    spec |= _text_spec(text.width, text.heads, text.depth, text.vocab_size, text.context_length,
                       cfg.embed_dim)
    inverse = {
        "image/stem/kernel": lambda x: x.transpose(3, 2, 0, 1),
        "image/cls": lambda x: x.reshape(-1),
        "image/posemb/embedding": lambda x: x[0],
        "text/pos_embedding": lambda x: x[0],
        "text_proj/kernel": lambda x: x.T,
    }
    out: dict[str, np.ndarray] = {}
    used = set()
    for key, entry in spec.items():
        if key.endswith(("in_proj_weight", "in_proj_bias")) or entry.ours.endswith(
                ("/attn/out", "/sparse/fc1/kernel", "/sparse/fc2/kernel")):
            continue  # below: blocks to split or join
        out[key] = inverse.get(entry.ours, np.asarray)(flat[entry.ours])
        used.add(entry.ours)
    for tower, tcfg, block in (("image", image, VISUAL_BLOCK), ("text", text, TEXT_BLOCK)):
        for i in range(tcfg.depth):
            t, o = block.format(i=i), f"{tower}/encoder/layers/{i}"
            out[f"{t}.attn.out_proj.weight"] = flat[f"{o}/attn/out"].reshape(-1, tcfg.width).T
            used.add(f"{o}/attn/out")
            if tower == "image":
                u = flat[f"{o}/attn/proj"].reshape(tcfg.width, -1).T
                out[f"{t}.attn.in_proj_weight"] = np.concatenate([u, u, u])
                used.add(f"{o}/attn/proj")
                continue
            names = ("query", "key", "value")
            out[f"{t}.attn.in_proj_weight"] = np.concatenate(
                [flat[f"{o}/attn/{n}"].reshape(tcfg.width, -1).T for n in names])
            out[f"{t}.attn.in_proj_bias"] = np.concatenate(
                [flat[f"{o}/attn/{n}_bias"].reshape(-1) for n in names])
            used |= {f"{o}/attn/{n}" for n in names} | {f"{o}/attn/{n}_bias" for n in names}
            for ours, theirs in (("fc1", "c_fc"), ("fc2", "c_proj")):
                out[f"{t}.mlp.{theirs}.weight"] = flat[f"{o}/sparse/{ours}/kernel"].T
                used.add(f"{o}/sparse/{ours}/kernel")
    if float(flat.get("logit_bias", 0.0)) != 0.0:
        raise ConversionError(f"cannot export to {LAYOUT}: logit_bias is "
                              f"{float(flat['logit_bias']):.4g} (a SigLIP bias); the release "
                              "has no bias (InfoNCE)")
    leftover = sorted(set(flat) - used - {"logit_bias"})
    if leftover:
        raise ConversionError(f"cannot export to {LAYOUT}: parameters the layout has no place "
                              f"for: {', '.join(leftover)}")
    return {k: np.array(v, order="C") for k, v in out.items()}  # 0-d stays 0-d


def export_crate_alpha_clipa_torch(params: Mapping[Any, Any], path: Any,
                                   cfg: ClipConfig) -> list[str]:
    """Write a two-tower run's `params` in the release layout to `path`; the metadata records
    both towers' heads (the import reads them back). No compatibility notes: the layout holds
    everything the towers compute."""
    image = models.config_for(cfg.image, **dict(cfg.image_overrides))
    text = models.config_for(cfg.text, **dict(cfg.text_overrides))
    save_weights(to_crate_alpha_clipa_torch(params, cfg), path,
                 {"format": "pt", "layout": LAYOUT, "producer": "crate_jax.convert",
                  "heads": str(image.heads), "text_heads": str(text.heads)})
    return []
