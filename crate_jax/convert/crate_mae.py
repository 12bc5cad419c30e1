"""The released CRATE-MAE PyTorch layout (the official CRATE repo's model/crate_ae/crate_ae.py,
`mae_crate_base`; docs/design.md §1 "Released") ↔ our CRATE-MAE (`crate-mae-<size>/<patch>`).

    patch_embed.proj.{weight (d, C, P, P), bias}    backbone/stem/{kernel (P, P, C, d), bias}
    cls_token, mask_token (1, 1, d)                 backbone/cls, mask_token
    pos_embed, decoder_pos_embed (1, 1 + N, d)      no parameters of ours: MAE's fixed sin-cos
                                                    table, checked equal to the one ours adds
                                                    (once, at the encoder input, where the
                                                    official forward adds decoder_pos_embed)
    blocks.{i}.layers.0.0.norm.*                    backbone/encoder/layers/{i}/attn/norm
        .layers.0.0.fn.qkv.weight (d, d)            .../attn/proj (d, K, p)
        .layers.0.0.fn.to_out.0.{weight, bias}      .../attn/out (K, p, d), .../attn/out_bias
        .layers.0.1.norm.*, .layers.0.1.fn.weight   .../sparse/norm, .../sparse/weight (ISTA)
    norm.*                                          backbone/norm
    decoder_blocks.{i}.layers.0.0.norm.*            decoder/layers/{i}/norm
        .layers.0.0.fn.weight (d, d)                decoder/layers/{i}/weight (used as x·Wᵀ)
        .layers.0.1.norm.*, .layers.0.1.fn.qkv.*,   decoder/layers/{i}/attn/{norm, proj, out,
        .layers.0.1.fn.to_out.0.*                   out_bias}
    decoder_norm.*, decoder_pred.{weight, bias}     decoder_norm, pred/{kernel (d, P²·C), bias}
    decoder_embed.{weight, bias}                    ignored with a note: built by the official
                                                    model, never called by its forward pass
                                                    (written as zeros on export)

Heads are not stored (qkv is (d, d)): the `heads` argument (CLI --heads), a name hint's size
('crate-mae-b'), the file's metadata (written by our export) or the CRATE size table by width
(384→6, 576→12, 768→12, 1024→16), in that order; the decoder's are the encoder's unless
`decoder_heads` says otherwise. Encoder and decoder widths must be equal: the official forward
feeds the encoder's output straight into the decoder. The import writes a 'mae' run directory
that `python -m crate_jax.analyze --workdir` reads and a classifier finetunes from
(`init_from`, `init_prefix='backbone'`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from crate_jax import models
from crate_jax.convert.files import save_weights
from crate_jax.convert.primitives import (
    ConversionError,
    Entry,
    Imported,
    apply_spec,
    check_params_fit,
    closest_size,
    flatten_source,
    per_layer_flat,
)
from crate_jax.models import layer_stack
from crate_jax.models.autoencoder import MAEConfig
from crate_jax.models.layers import mae_sincos_2d
from crate_jax.models.registry import VISION_SIZES, mae_config_for

__all__ = ["LAYOUT", "ImportedMAE", "compatibility_notes", "export_crate_mae_torch",
           "import_crate_mae_torch", "to_crate_mae_torch"]

LAYOUT = "crate-mae-torch"
TABLES = ("pos_embed", "decoder_pos_embed")
TABLE_ATOL = 1e-5  # a table saved on another machine may differ from ours in the last bits
UNUSED = {r"decoder_embed\.(weight|bias)": "built by the official model, never called by its "
                                            "forward pass"}
SIZES = VISION_SIZES["crate"]  # CRATE-MAE-{T,S,B,L} have the CRATE classifier's sizes


@dataclasses.dataclass(frozen=True)
class ImportedMAE(Imported):
    """An imported CRATE-MAE: `models.create(name, **overrides)` builds the masked autoencoder
    whose parameters are `params`; `notes` says what was inferred or left aside. Unpacks and
    builds as `Imported` does; its config is the autoencoder's."""

    def config(self) -> MAEConfig:
        return mae_config_for(self.name, **self.overrides)

    def run_config(self, source: dict[str, Any] | None = None) -> dict[str, Any]:
        """config.json of the run directory: a 'mae' run, as the trainer writes one."""
        return {"trainer": "mae",
                "model": {"name": self.name,
                          "overrides": {k: v for k, v in self.overrides.items()
                                        if k != "image_size"}},
                "data": {"image_size": self.config().encoder.image_size},
                "converted_from": {**(source or {}), "notes": list(self.notes)}}


# --- the layout, one row per tensor: (torch key, our path, torch shape, conversion) ----------

def _prenorm(torch_key: str, ours: str, d: int) -> list[tuple]:
    return [(f"{torch_key}.norm.weight", f"{ours}/scale", (d,), "same"),
            (f"{torch_key}.norm.bias", f"{ours}/bias", (d,), "same")]


def _mssa(torch_key: str, ours: str, d: int) -> list[tuple]:
    return [(f"{torch_key}.qkv.weight", f"{ours}/proj", (d, d), "qkv"),
            (f"{torch_key}.to_out.0.weight", f"{ours}/out", (d, d), "out"),
            (f"{torch_key}.to_out.0.bias", f"{ours}/out_bias", (d,), "same")]


def _rows(d: int, depth: int, decoder_depth: int, patch: int, chans: int) -> list[tuple]:
    pixels = patch * patch * chans
    rows = [("cls_token", "backbone/cls", (1, 1, d), "same"),
            ("mask_token", "mask_token", (1, 1, d), "same"),
            ("patch_embed.proj.weight", "backbone/stem/kernel", (d, chans, patch, patch),
             "conv"),
            ("patch_embed.proj.bias", "backbone/stem/bias", (d,), "same"),
            ("norm.weight", "backbone/norm/scale", (d,), "same"),
            ("norm.bias", "backbone/norm/bias", (d,), "same"),
            ("decoder_norm.weight", "decoder_norm/scale", (d,), "same"),
            ("decoder_norm.bias", "decoder_norm/bias", (d,), "same"),
            ("decoder_pred.weight", "pred/kernel", (pixels, d), "t"),
            ("decoder_pred.bias", "pred/bias", (pixels,), "same")]
    for i in range(depth):
        t, o = f"blocks.{i}.layers.0", f"backbone/encoder/layers/{i}"
        rows += _prenorm(f"{t}.0", f"{o}/attn/norm", d) + _mssa(f"{t}.0.fn", f"{o}/attn", d)
        rows += _prenorm(f"{t}.1", f"{o}/sparse/norm", d)
        rows.append((f"{t}.1.fn.weight", f"{o}/sparse/weight", (d, d), "same"))
    for i in range(decoder_depth):
        t, o = f"decoder_blocks.{i}.layers.0", f"decoder/layers/{i}"
        rows += _prenorm(f"{t}.0", f"{o}/norm", d)
        rows.append((f"{t}.0.fn.weight", f"{o}/weight", (d, d), "same"))
        rows += _prenorm(f"{t}.1", f"{o}/attn/norm", d) + _mssa(f"{t}.1.fn", f"{o}/attn", d)
    return rows


def _to_ours(kind: str, heads: int):
    """torch tensor → our array: Linear weights (out, in) transposed, qkv split into heads."""
    return {"same": np.asarray, "t": lambda w: w.T,
            "conv": lambda w: w.transpose(2, 3, 1, 0),
            "qkv": lambda w: w.T.reshape(w.shape[1], heads, -1),
            "out": lambda w: w.T.reshape(heads, -1, w.shape[0])}[kind]


def _to_torch(kind: str, x: np.ndarray) -> np.ndarray:
    """The inverse of `_to_ours`."""
    if kind == "t":
        return x.T
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    if kind == "qkv":
        return x.reshape(x.shape[0], -1).T
    if kind == "out":
        return x.reshape(-1, x.shape[-1]).T
    return x


def fixed_table(cfg: MAEConfig) -> np.ndarray:
    """(1, 1 + N, d): MAE's sin-cos table with the cls row zero, as the layout stores it."""
    enc = cfg.encoder
    return np.concatenate([np.zeros((1, enc.width), np.float32),
                           mae_sincos_2d(*enc.grid, enc.width)])[None]


# --- import ----------------------------------------------------------------------------------

def _first_shape(flat: Mapping[str, np.ndarray], keys: tuple[str, ...], what: str) -> tuple:
    for key in keys:
        if key in flat:
            return tuple(flat[key].shape)
    raise ConversionError(f"cannot read the {what} of a {LAYOUT} checkpoint: none of "
                          f"{', '.join(keys)} is present")


def _depth(flat: Mapping[str, np.ndarray], prefix: str) -> int:
    found = {int(m[1]) for k in flat if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    if not found:
        raise ConversionError(f"no {prefix}.* layers found in the {LAYOUT} checkpoint")
    return max(found) + 1


def _size_hint(name: str | None) -> str | None:
    if name is None:
        return None
    match = re.fullmatch(r"crate-mae-([A-Za-z]+)(?:/\d+)?", name.strip(), re.I)
    sizes = {k.lower(): k for k in SIZES}
    if not match or match[1].lower() not in sizes:
        raise ConversionError(f"name {name!r} is not a CRATE-MAE name (crate-mae-{{"
                              f"{','.join(k.lower() for k in SIZES)}}}[/P])")
    return sizes[match[1].lower()]


def _heads(width: int, given: int | None, size: str | None, stored: str | None,
           notes: list[str], what: str) -> int:
    """The heads of a tower whose qkv (d, d) does not record them (module docstring)."""
    if given is not None:
        heads, source = given, f"the {what} argument"
    elif size is not None:
        heads, source = SIZES[size][2], f"the name's size {size!r}"
    elif stored is not None and stored.isdigit():
        heads, source = int(stored), "the file's metadata"
    else:
        by_width = sorted({dims[2] for dims in SIZES.values() if dims[0] == width})
        if len(by_width) != 1:
            raise ConversionError(f"the {LAYOUT} layout does not record the number of "
                                  f"attention heads and width {width} is not a standard "
                                  f"CRATE-MAE width (384, 576, 768, 1024); pass heads=K "
                                  "(CLI: --heads K)")
        heads, source = by_width[0], f"the CRATE size table for width {width}"
    if heads <= 0 or width % heads:
        raise ConversionError(f"{what}={heads} (from {source}) does not divide width {width}")
    notes.append(f"{what}={heads} from {source}")
    return heads


def _name_and_overrides(d: int, depth: int, heads: int, decoder_depth: int,
                        decoder_heads: int, patch: int, size: str | None
                        ) -> tuple[str, dict[str, Any]]:
    """The registry name nearest the checkpoint's size and the overrides that make it exact."""
    size, overrides = closest_size(SIZES, dict(width=d, depth=depth, heads=heads), size)
    if decoder_depth != depth:
        overrides["decoder_depth"] = decoder_depth
    if decoder_heads != heads:
        overrides["decoder_heads"] = decoder_heads
    return f"crate-mae-{size.lower()}/{patch}", overrides


def _unwrap(source: Mapping[str, Any], notes: list[str]) -> Mapping[str, Any]:
    """MAE's training code saves {'model': state_dict, 'optimizer': ..., 'epoch': ...}."""
    inner = source.get("model") if isinstance(source, Mapping) else None
    if isinstance(inner, Mapping) and "cls_token" not in source:
        others = sorted(str(k) for k in source if k != "model")
        notes.append("opened the {'model': ...} wrapper" +
                     (f"; its other entries are not weights and were left aside: {others}"
                      if others else ""))
        return inner
    return source


def _check_tables(tables: Mapping[str, np.ndarray], cfg: MAEConfig) -> None:
    want = fixed_table(cfg)
    for key, table in tables.items():
        diff = float(np.max(np.abs(np.asarray(table, np.float64) - want)))
        if diff > TABLE_ATOL:
            raise ConversionError(
                f"cannot import the checkpoint as {LAYOUT}: {key} is not MAE's fixed 2-D "
                f"sin-cos table for a {cfg.encoder.grid[0]}x{cfg.encoder.grid[1]} grid of "
                f"width {cfg.encoder.width} (largest difference {diff:.3g}); the official "
                "model never trains it, and ours computes it")


def _sizes(flat: Mapping[str, np.ndarray]) -> tuple[int, int, int, int, int, int]:
    """(width, channels, patch, table rows, depth, decoder depth) from the shapes."""
    d, chans, patch, patch_w = _first_shape(flat, ("patch_embed.proj.weight",),
                                            "patch size and width")
    if patch != patch_w:
        raise ConversionError(f"patch_embed.proj.weight: a {patch}x{patch_w} kernel is not a "
                              "square patch")
    rows = _first_shape(flat, TABLES, "position table")[1]
    if math.isqrt(rows - 1) ** 2 != rows - 1:
        raise ConversionError(f"{LAYOUT}: {rows - 1} position-table rows are not a square grid")
    decoder_width = _first_shape(flat, ("decoder_blocks.0.layers.0.0.fn.weight",),
                                 "decoder width")[0]
    if decoder_width != d:
        raise ConversionError(f"{LAYOUT}: decoder width {decoder_width} differs from the "
                              f"encoder width {d}; the official forward feeds the encoder's "
                              "output straight into the decoder, so they must be equal")
    return d, chans, patch, rows, _depth(flat, "blocks"), _depth(flat, "decoder_blocks")


def import_crate_mae_torch(source: Mapping[str, Any], *, heads: int | None = None,
                           decoder_heads: int | None = None, name: str | None = None,
                           image_size: int | None = None, patch_size: int | None = None,
                           allow_extra: Mapping[str, str] | None = None,
                           metadata: Mapping[str, str] | None = None,
                           **config_overrides: Any) -> ImportedMAE:
    """A CRATE-MAE PyTorch state_dict (the module docstring's layout) → our CRATE-MAE.

    Sizes come from the shapes; `image_size` builds the model for another image size (its
    fixed table computed for the new grid); `config_overrides` set other model fields."""
    notes: list[str] = []
    flat, more = flatten_source(_unwrap(source, notes), ".")
    notes += more
    size = _size_hint(name)
    d, chans, patch, rows, depth, decoder_depth = _sizes(flat)
    side = math.isqrt(rows - 1)
    if patch_size is not None and patch_size != patch:
        raise ConversionError(f"patch_size={patch_size}: the {LAYOUT} pixel head predicts "
                              f"{patch}x{patch} patches, so the patch size cannot change")
    stored = metadata or {}
    k = _heads(d, heads, size, stored.get("heads"), notes, "heads")
    kd = k if decoder_heads is None and "decoder_heads" not in stored else _heads(
        d, decoder_heads, None, stored.get("decoder_heads"), notes, "decoder_heads")
    name, overrides = _name_and_overrides(d, depth, k, decoder_depth, kd, patch, size)
    overrides["image_size"] = side * patch
    if chans != 3:
        overrides["channels"] = chans
    overrides |= config_overrides
    try:
        cfg = mae_config_for(name, **overrides)
    except ValueError as err:
        raise ConversionError(f"the {LAYOUT} checkpoint (width {d}, depth {depth}/"
                              f"{decoder_depth}, patch {patch}) does not make a valid model "
                              f"config: {err}") from err
    spec = {key: Entry(ours, shape, _to_ours(kind, kd if ours.startswith("decoder") else k))
            for key, ours, shape, kind in _rows(d, depth, decoder_depth, patch, chans)}
    spec |= {key: Entry(f"tables/{key}", (1, rows, d)) for key in TABLES}
    params = apply_spec(flat, spec, layout=LAYOUT, allow_extra={**UNUSED, **(allow_extra or {})},
                        dims=dict(width=d, depth=depth, decoder_depth=decoder_depth, heads=k,
                                  patch=patch, image=side * patch),
                        dtype=cfg.encoder.storage_dtype, notes=notes)
    _check_tables({key: params.pop(f"tables/{key}") for key in TABLES}, cfg)
    notes.append("pos_embed and decoder_pos_embed are MAE's fixed sin-cos table (checked); "
                 "the model adds it once, at the encoder input, as the official forward does")
    imported = ImportedMAE(name, overrides, layer_stack.stack_layers(layer_stack.nest(params)),
                           tuple(notes))
    check_params_fit(lambda: models.create(name, **overrides), imported.params,
                     f"{name} {overrides}")
    if image_size is not None and image_size != cfg.encoder.image_size:
        imported = dataclasses.replace(
            imported, overrides={**overrides, "image_size": int(image_size)},
            notes=(*imported.notes, f"image size {cfg.encoder.image_size} -> {image_size}: "
                                    "the fixed table is computed for the new grid"))
        imported.config()  # a size the patch does not divide is refused here
    return imported


# --- export ----------------------------------------------------------------------------------

def compatibility_notes(cfg: MAEConfig) -> list[str]:
    """What the official crate_ae computes differently from the model `cfg` (notes); raises
    ConversionError for a model it cannot represent at all."""
    if not isinstance(cfg, MAEConfig):
        raise ConversionError(f"{LAYOUT} export needs a masked autoencoder's config (a run "
                              f"whose config.json has trainer 'mae'), got "
                              f"{type(cfg).__name__}")
    enc = cfg.encoder
    refusals = [(enc.block != "crate", f"block {enc.block!r} (the layout holds CRATE blocks)"),
                (not cfg.mask_in_encoder, "mask_in_encoder=False (the official encoder sees "
                                          "every position)"),
                (cfg.decoder_width != enc.width, f"decoder_width {cfg.decoder_width} != width "
                                                 f"{enc.width}"),
                (enc.patch_stem != "conv" or not enc.stem_bias,
                 "a stem other than the conv stem with bias"),
                (enc.posemb != "sincos2d_mae", f"posemb={enc.posemb!r} (the official model "
                                               "adds MAE's fixed table, 'sincos2d_mae')")]
    problems = [why for bad, why in refusals if bad]
    if problems:
        raise ConversionError(f"the official crate_ae has no equivalent of this model: "
                              f"{'; '.join(problems)}")
    notes = []
    for field, value, want in (("layer_norm eps", enc.eps, 1e-5),
                               ("final norm eps", enc.final_eps, 1e-6), ("eta", enc.eta, 0.1)):
        if value != want:
            notes.append(f"the official model fixes {field}={want}; this model has {value}")
    if enc.lam != 0.5:
        notes.append(f"λ={enc.lam}: build the official model with lambd={enc.lam} (default 0.5)")
    if enc.drop_path_rate or enc.layer_scale_init is not None:
        notes.append("drop_path / LayerScale settings are not part of the layout")
    return notes


def to_crate_mae_torch(params: Mapping[Any, Any], cfg: MAEConfig) -> dict[str, np.ndarray]:
    """Our CRATE-MAE parameters → the official state_dict (NumPy arrays), every key of it:
    the fixed table as pos_embed and decoder_pos_embed, decoder_embed as zeros."""
    compatibility_notes(cfg)
    enc = cfg.encoder
    flat = per_layer_flat(params)
    rows = _rows(enc.width, enc.depth, cfg.decoder_depth, enc.patch_size, enc.channels)
    missing = [ours for _, ours, _, _ in rows if ours not in flat]
    extra = sorted(set(flat) - {ours for _, ours, _, _ in rows})
    if missing or extra:
        raise ConversionError(f"cannot export to {LAYOUT}: " + "; ".join(
            part for part in (f"missing parameters: {', '.join(missing)}" if missing else "",
                              f"parameters the layout has no place for: {', '.join(extra)}"
                              if extra else "") if part))
    sd = {key: np.ascontiguousarray(_to_torch(kind, flat[ours]))
          for key, ours, _, kind in rows}
    dtype = flat["backbone/cls"].dtype
    table = fixed_table(cfg).astype(dtype)
    sd |= {"pos_embed": table, "decoder_pos_embed": table.copy(),
           "decoder_embed.weight": np.zeros((cfg.decoder_width, enc.width), dtype),
           "decoder_embed.bias": np.zeros((cfg.decoder_width,), dtype)}
    return sd


def export_crate_mae_torch(params: Mapping[Any, Any], path: str | os.PathLike, cfg: Any, *,
                           name: str | None = None) -> list[str]:
    """Write `params` in the official layout to `path` (.safetensors, .npz, or .pth with
    torch), heads and config in a .safetensors file's metadata. Returns the notes."""
    notes = compatibility_notes(cfg)
    state_dict = to_crate_mae_torch(params, cfg)
    notes.append("decoder_embed.* written as zeros: the official model builds it but its "
                 "forward pass never calls it")
    metadata = {"format": "pt", "layout": LAYOUT, "producer": "crate_jax.convert",
                "heads": str(cfg.encoder.heads), "decoder_heads": str(cfg.decoder_heads),
                "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True)}
    if name is not None:
        metadata["model"] = name
    save_weights(state_dict, path, metadata)
    return notes
