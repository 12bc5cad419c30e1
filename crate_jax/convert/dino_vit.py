"""The DINO-style ViT checkpoints of SimDINO and SimDINOv2 (RobinWu218/SimDINO; docs/design.md §1,
"SimDINO as the official code runs it") ↔ our ViT ('vit-b/16', 'vit-l/16', ...).

The files read (`import_dino_vit_torch`: DINO's and DINOv2's training checkpoints, the backbone
of one `branch`, or a bare backbone state dict): convert/dino_checkpoint.py. The backbone
(timm names, LayerNorm eps 1e-6, exact GELU, qkv bias, feature = cls token after the norm):

    cls_token (1, 1, d)                    cls
    pos_embed (1, 1 + N, d)                posemb/embedding
    register_tokens (1, R, d)   [v2]       registers            (config registers=R)
    mask_token (1, d)           [v2]       skipped: iBOT's mask token, used in training only
    patch_embed.proj.weight (d, C, P, P)   stem/kernel (P, P, C, d);  .bias → stem/bias
    blocks.{i}.norm1, .norm2               encoder/layers/{i}/attn/norm, .../sparse/norm
    blocks.{i}.attn.qkv.weight (3d, d)     .../attn/{query,key,value} (d, K, p), rows q | k | v
    blocks.{i}.attn.qkv.bias (3d)          .../attn/{query,key,value}_bias (K, p)
    blocks.{i}.attn.proj.weight (d, d)     .../attn/out (K, p, d);  .bias → .../attn/out_bias
    blocks.{i}.ls1.gamma, .ls2.gamma [v2]  .../scale_attn/gamma, .../scale_sparse/gamma
    blocks.{i}.mlp.fc1, .mlp.fc2           .../sparse/fc1, .../sparse/fc2 (kernel = weightᵀ)
    norm.weight, norm.bias                 norm/scale, norm/bias

Heads come from `heads`, a name hint ('vit-l'), a file's metadata, or the ViT size table by
width (384→6, 768→12, 1024→16). Missing keys, keys of no known role and shape mismatches are
reported at once (ConversionError); `allow_extra` drops keys by regex.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from crate_jax import models
from crate_jax.convert.dino_checkpoint import LAYOUT, backbone_keys, load_checkpoint, select_branch
from crate_jax.convert.files import save_weights
from crate_jax.convert.primitives import (
    ConversionError,
    Imported,
    allowed_reason,
    check_against_model,
    closest_size,
    in_proj_part,
    per_layer_flat,
    resize_imported,
    size_label,
)
from crate_jax.models import layer_stack
from crate_jax.models.config import VisionConfig
from crate_jax.models.registry import VISION_SIZES

__all__ = ["LAYOUT", "export_dino_vit_torch", "import_dino_vit_torch", "to_dino_vit_torch"]

DINO_EPS = 1e-6


def _spec(d: int, k: int, depth: int, rows: int, patch: int, chans: int, hidden: int,
          registers: int, scaled: bool) -> dict[str, tuple[str, tuple, Any]]:
    """{source key: (our path, source shape, conversion)}."""
    p = d // k
    spec: dict[str, tuple[str, tuple, Any]] = {
        "cls_token": ("cls", (1, 1, d), None),
        "pos_embed": ("posemb/embedding", (1, rows, d), None),
        "patch_embed.proj.weight": ("stem/kernel", (d, chans, patch, patch),
                                    lambda w: w.transpose(2, 3, 1, 0)),
        "patch_embed.proj.bias": ("stem/bias", (d,), None),
        "norm.weight": ("norm/scale", (d,), None), "norm.bias": ("norm/bias", (d,), None)}
    if registers:
        spec["register_tokens"] = ("registers", (1, registers, d), None)
    for i in range(depth):
        t, o = f"blocks.{i}", f"encoder/layers/{i}"
        for src, ours, shape, conv in (
                ("norm1.weight", "attn/norm/scale", (d,), None),
                ("norm1.bias", "attn/norm/bias", (d,), None),
                ("attn.proj.weight", "attn/out", (d, d), lambda w: w.T.reshape(k, p, d)),
                ("attn.proj.bias", "attn/out_bias", (d,), None),
                ("norm2.weight", "sparse/norm/scale", (d,), None),
                ("norm2.bias", "sparse/norm/bias", (d,), None),
                ("mlp.fc1.weight", "sparse/fc1/kernel", (hidden, d), np.transpose),
                ("mlp.fc1.bias", "sparse/fc1/bias", (hidden,), None),
                ("mlp.fc2.weight", "sparse/fc2/kernel", (d, hidden), np.transpose),
                ("mlp.fc2.bias", "sparse/fc2/bias", (d,), None)):
            spec[f"{t}.{src}"] = (f"{o}/{ours}", shape, conv)
        for j, name in enumerate(("query", "key", "value")):  # one key, three of ours
            spec[f"{t}.attn.qkv.weight#{name}"] = (f"{o}/attn/{name}", (3 * d, d),
                                                   lambda w, j=j: in_proj_part(w, j, k, p))
            spec[f"{t}.attn.qkv.bias#{name}"] = (f"{o}/attn/{name}_bias", (3 * d,),
                                                 lambda w, j=j: in_proj_part(w, j, k, p))
        if scaled:
            spec[f"{t}.ls1.gamma"] = (f"{o}/scale_attn/gamma", (d,), None)
            spec[f"{t}.ls2.gamma"] = (f"{o}/scale_sparse/gamma", (d,), None)
    return spec


def _shape(flat: Mapping[str, np.ndarray], key: str, axis: int, what: str) -> int:
    if key not in flat or np.ndim(flat[key]) <= abs(axis) - (axis < 0):
        raise ConversionError(f"cannot read the {what} of a {LAYOUT} checkpoint: {key} is "
                              f"missing or malformed (keys: {', '.join(sorted(flat)[:12])} ...)")
    return int(np.shape(flat[key])[axis])


def _heads(width: int, heads: int | None, name: str | None,
           metadata: Mapping[str, str] | None, notes: list[str]) -> tuple[int, str | None]:
    """(heads, size key of a name hint or None)."""
    size = None
    if name is not None:
        match = re.match(r"^vit-([A-Za-z]+)(?:/\d+)?$", name.strip())
        sizes = [match[1]] if match and match[1] in VISION_SIZES["vit"] else [
            s for s in VISION_SIZES["vit"] if match and s.lower() == match[1].lower()]
        if len(sizes) != 1:
            raise ConversionError(f"name {name!r} is not a ViT name such as 'vit-b' or "
                                  f"'vit-l/16' (sizes {sorted(VISION_SIZES['vit'])})")
        size = sizes[0]
    by_width = sorted({v[2] for v in VISION_SIZES["vit"].values() if v[0] == width})
    for value, source in ((heads, "the heads argument"),
                          (VISION_SIZES["vit"][size][2] if size else None, f"the name {name!r}"),
                          ((metadata or {}).get("heads"), "the file's metadata"),
                          (by_width[0] if len(by_width) == 1 else None,
                           f"the ViT size table for width {width}")):
        if value is not None:
            value = int(value)
            if value <= 0 or width % value:
                raise ConversionError(f"heads={value} (from {source}) does not divide the "
                                      f"width {width}")
            notes.append(f"heads={value} from {source}")
            return value, size
    raise ConversionError(f"width {width} is not a standard ViT width and the {LAYOUT} layout "
                          "does not record the heads; pass heads=K (CLI: --heads K)")


def _name(d: int, depth: int, k: int, hidden: int, patch: int,
          size: str | None) -> tuple[str, dict[str, Any]]:
    table = VISION_SIZES["vit"]
    size, overrides = closest_size(table, dict(width=d, depth=depth, heads=k, mlp_dim=hidden),
                                   size, default="B")
    return f"vit-{size_label(table, size)}/{patch}", overrides


def _check(flat: Mapping[str, np.ndarray], spec: Mapping[str, tuple],
           allow_extra: Mapping[str, str], notes: list[str]) -> None:
    wanted = {k.split("#")[0]: v[1] for k, v in spec.items()}
    missing = [k for k in wanted if k not in flat]
    mismatched = [f"{k}: {tuple(np.shape(flat[k]))}, expected {s}" for k, s in wanted.items()
                  if k in flat and tuple(np.shape(flat[k])) != s]
    unexpected = []
    for key in sorted(set(flat) - set(wanted)):
        reason = allowed_reason(key, allow_extra)
        if reason is None:
            unexpected.append(key)
        else:
            notes.append(f"ignored {key}: {reason}")
    problems = [f"{what} ({len(keys)}): {', '.join(keys)}" for what, keys in (
        ("missing keys", missing), ("shape mismatches", mismatched),
        ("unexpected keys", unexpected)) if keys]
    if problems:
        raise ConversionError(f"cannot import the checkpoint as {LAYOUT}:\n  "
                              + "\n  ".join(problems) + ("\n  (drop a key that is safe to "
                              "drop with allow_extra={REGEX: REASON}; CLI --allow-extra)"
                              if unexpected else ""))


def _dims(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The model's size, read off the tensor shapes."""
    rows = _shape(flat, "pos_embed", 1, "position table")
    side = math.isqrt(rows - 1)
    if side * side != rows - 1:
        raise ConversionError(f"{LAYOUT} pos_embed: {rows - 1} patch rows are not a square grid")
    depth = 1 + max((int(m[1]) for k in flat if (m := re.match(r"blocks\.(\d+)\.", k))),
                    default=-1)
    if depth == 0:
        raise ConversionError(f"no blocks.{{i}}.* keys in the {LAYOUT} checkpoint")
    return dict(d=_shape(flat, "cls_token", -1, "width"), depth=depth, rows=rows, side=side,
                patch=_shape(flat, "patch_embed.proj.weight", -1, "patch size"),
                chans=_shape(flat, "patch_embed.proj.weight", 1, "input channels"),
                hidden=_shape(flat, "blocks.0.mlp.fc1.weight", 0, "MLP width"),
                registers=(_shape(flat, "register_tokens", 1, "registers")
                           if "register_tokens" in flat else 0),
                scaled="blocks.0.ls1.gamma" in flat)


def import_dino_vit_torch(source: Any, *, branch: str | None = None, heads: int | None = None,
                          name: str | None = None, image_size: int | None = None,
                          patch_size: int | None = None,
                          allow_extra: Mapping[str, str] | None = None,
                          metadata: Mapping[str, str] | None = None,
                          **config_overrides: Any) -> Imported:
    """A DINO / SimDINO / SimDINOv2 ViT checkpoint (a path or the loaded mapping; the module
    docstring) → an image backbone (num_classes=0, cls pooling) of our ViT."""
    notes: list[str] = []
    if not isinstance(source, Mapping):
        source, file_metadata = load_checkpoint(source)
        metadata = metadata if metadata is not None else file_metadata
    flat = backbone_keys(select_branch(source, branch, notes), notes)
    dims = _dims(flat)
    d, patch, scaled, registers = dims["d"], dims["patch"], dims["scaled"], dims["registers"]
    k, size = _heads(d, heads, name, metadata, notes)
    spec = _spec(d, k, dims["depth"], dims["rows"], patch, dims["chans"], dims["hidden"],
                 registers, scaled)
    _check(flat, spec, {"mask_token": "DINOv2's iBOT mask token (training only; features "
                                      "never use it)", **dict(allow_extra or {})}, notes)
    model_name, overrides = _name(d, dims["depth"], k, dims["hidden"], patch, size)
    overrides.update(num_classes=0, image_size=dims["side"] * patch, pool="cls")
    if dims["chans"] != 3:
        overrides["channels"] = dims["chans"]
    if registers:
        overrides["registers"] = registers
    if scaled:  # the value only seeds a re-initialisation; the gammas are imported
        overrides["layer_scale_init"] = 0.1  # simdinov2's simdino_config.yaml
        notes.append("LayerScale ls1/ls2 imported (layer_scale_init=0.1 only for a re-init)")
    overrides.update(config_overrides)
    try:
        dtype = np.dtype(models.config_for(model_name, **overrides).storage_dtype)
    except ValueError as err:
        raise ConversionError(f"the {LAYOUT} checkpoint (width {d}, depth {dims['depth']}, "
                              f"heads {k}, patch {patch}) does not make a valid model: {err}") \
            from err
    sources = sorted({flat[key.split("#")[0]].dtype.name for key in spec})
    if sources != [dtype.name]:
        notes.append(f"tensors cast {sources} -> {dtype.name}")
    params = {ours: np.array(conv(flat[key.split("#")[0]]) if conv else flat[key], dtype=dtype)
              for key, (ours, _, conv) in spec.items()}
    imported = Imported(model_name, overrides,
                        layer_stack.stack_layers(layer_stack.nest(params)), tuple(notes))
    check_against_model(imported)
    imported = resize_imported(imported, image_size=image_size, patch_size=patch_size)
    hinted = re.search(r"/(\d+)$", (name or "").strip())
    if hinted and int(hinted[1]) != imported.config().patch_size:
        raise ConversionError(f"the name {name!r} says patch {hinted[1]}, but the model has "
                              f"patch {imported.config().patch_size} (the checkpoint's is "
                              f"{patch}; pass patch_size to resize the stem)")
    return imported


# --- export ---------------------------------------------------------------------------------

def _backbone_params(params: Mapping[Any, Any], notes: list[str]) -> dict[str, np.ndarray]:
    """Per-layer flat parameters of the image backbone: the run's own, or a SimDINO run's
    teacher backbone (the network DINO evaluates; its projection head is not exported)."""
    if "teacher" in params and "student" in params:
        notes.append("a SimDINO run: exported the teacher's backbone (not its projection head)")
        params = params["teacher"]["backbone"]
    return per_layer_flat(params)


def compatibility_notes(cfg: VisionConfig | None) -> list[str]:
    """What DINO's ViT computes differently from the model `cfg`; raises ConversionError for
    a model it cannot hold at all."""
    if cfg is None:
        return ["no model config: exported by parameter names alone (nothing checked)"]
    if not isinstance(cfg, VisionConfig):
        raise ConversionError(f"a {type(cfg).__name__} run cannot be exported as {LAYOUT} "
                              "(an image backbone layout)")
    if cfg.block != "vit":
        raise ConversionError(f"a {cfg.block} model cannot be exported as {LAYOUT} (a ViT "
                              "layout)")
    if cfg.posemb != "learn":
        raise ConversionError(f"posemb={cfg.posemb!r}: DINO's ViT learns its position table; "
                              "a fixed table is not a parameter of this model")
    notes = []
    if cfg.pool != "cls":
        notes.append(f"pool={cfg.pool!r}: DINO's ViT returns the cls token after the norm")
    if cfg.eps != DINO_EPS or cfg.final_eps != DINO_EPS:
        notes.append(f"DINO's LayerNorms use eps {DINO_EPS}; this model uses {cfg.eps} "
                     f"(final norm {cfg.final_eps})")
    if cfg.mlp_activation != "gelu":
        notes.append(f"DINO's MLP uses the exact GELU; this model uses {cfg.mlp_activation}")
    return notes


def to_dino_vit_torch(params: Mapping[Any, Any], cfg: VisionConfig | None = None,
                      notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Our ViT parameters → the bare backbone state_dict of DINO's ViT (timm names, no
    prefix), with DINOv2's `mask_token` (zeros, its initial value) when the model has
    LayerScale or registers, so that a DINOv2 ViT loads it strictly. A model without a stem
    bias gets a zero `patch_embed.proj.bias` (DINO's patch embedding always has one).
    `notes` receives what DINO's ViT computes differently (`compatibility_notes(cfg)`)."""
    notes = [] if notes is None else notes
    notes.extend(compatibility_notes(cfg))
    flat = _backbone_params(params, notes)
    depth = 1 + max((int(k.split("/")[2]) for k in flat if k.startswith("encoder/layers/")),
                    default=-1)
    d = int(np.shape(flat.get("cls", np.zeros((1, 1, 0))))[-1])
    registers = int(np.shape(flat["registers"])[1]) if "registers" in flat else 0
    scaled = "encoder/layers/0/scale_attn/gamma" in flat
    spec = _spec(d, 1, depth, 0, 0, 0, 0, registers, scaled)  # the shapes are not used here
    if "stem/bias" not in flat and "stem/kernel" in flat:
        flat["stem/bias"] = np.zeros((d,), flat["stem/kernel"].dtype)
        notes.append("no stem bias: patch_embed.proj.bias written as zeros")
    missing = sorted({ours for ours, _, _ in spec.values()} - set(flat))
    extra = sorted(set(flat) - {ours for ours, _, _ in spec.values()})
    if missing or extra:
        raise ConversionError(f"cannot export to {LAYOUT}: " + "; ".join(
            f"{what}: {', '.join(keys)}" for what, keys in (
                ("missing parameters", missing), ("parameters it has no place for", extra))
            if keys))
    sd = {}
    for key, (ours, _, _) in spec.items():
        base, _, part = key.partition("#")
        value = flat[ours]
        if base == "patch_embed.proj.weight":
            value = value.transpose(3, 2, 0, 1)
        elif base.endswith("attn.proj.weight"):
            value = value.reshape(-1, d).T
        elif base.endswith(("mlp.fc1.weight", "mlp.fc2.weight")):
            value = value.T
        elif part:  # the query, key and value blocks of qkv, in that order
            value = value.reshape(d, -1).T if base.endswith("weight") else value.reshape(-1)
            value = np.concatenate([sd[base], value]) if base in sd else value
        sd[base] = value
    if registers or scaled:
        sd["mask_token"] = np.zeros((1, d), flat["cls"].dtype)
        notes.append("DINOv2 layout: mask_token written as zeros (its initial value; unused "
                     "by the features)")
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def export_dino_vit_torch(params: Mapping[Any, Any], path: str | os.PathLike,
                          cfg: VisionConfig | None = None, *,
                          name: str | None = None) -> list[str]:
    """Write `params` (our ViT, or a SimDINO run's) as DINO's bare backbone state_dict to
    `path` (.pth with torch; .safetensors / .npz without). Returns the notes."""
    notes: list[str] = []
    state_dict = to_dino_vit_torch(params, cfg, notes)
    metadata = {"format": "pt", "layout": LAYOUT, "producer": "crate_jax.convert"}
    if cfg is not None:  # the import reads the heads back from a .safetensors file
        metadata["heads"] = str(cfg.heads)
    if name is not None:
        metadata["model"] = name
    if cfg is not None:
        metadata["config"] = json.dumps(dict(vars(cfg)), sort_keys=True)
    save_weights(state_dict, path, metadata)
    return notes
