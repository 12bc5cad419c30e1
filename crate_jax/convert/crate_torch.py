"""The two PyTorch layouts of the released CRATE and CRATE-α classifiers → our parameter tree
(docs/design.md §3):

    'crate-torch'        CRATE PyTorch state_dict (T/S/B/L), linear stem, Linear weights (out, in)
    'crate-alpha-torch'  CRATE-α PyTorch port: conv1 (d, C, P, P), head LN with eps 1e-5

Both store the head as mlp_head.{0: LayerNorm, 1: Linear} and every layer as
transformer.layers.{i}.{0: MSSA, 1: ISTA}, each a PreNorm (`.norm`, `.fn`); the MSSA projection
qkv (d, d) → ours (d, K, p), to_out → (K, p, d). Heads are not stored: see
convert/crate_family.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from crate_jax.convert.crate_family import (
    CrateSource,
    alpha_overrides,
    dictionary_ratio,
    finish,
    resolve_heads,
)
from crate_jax.convert.primitives import (
    TORCH_HEAD_EPS,
    ConversionError,
    Entry,
    Imported,
    grid_side,
    layer_count,
)

__all__ = ["import_crate_alpha_torch", "import_crate_torch"]

LAYERS = r"transformer\.layers\.(\d+)\."


def _t(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).T


def _torch_head(src: CrateSource) -> tuple[bool, int]:
    """Whether a PyTorch layout has a classifier head, and its class count."""
    has_head = "mlp_head.1.weight" in src.flat or "mlp_head.1.bias" in src.flat
    classes = (src.vote([("mlp_head.1.weight", lambda s: s[0]),
                         ("mlp_head.1.bias", lambda s: s[0])], "class count")
               if has_head else 0)
    if not has_head:
        src.notes.append("no mlp_head.1: imported without a classifier head (num_classes=0)")
    return has_head, classes


def _torch_head_and_mssa(d: int, k: int, p: int, depth: int, classes: int) -> dict:
    """What the CRATE and CRATE-α PyTorch layouts share: the head LayerNorm and Linear, and
    every layer's two LayerNorms and MSSA projections (qkv (d, d) → (d, K, p), to_out →
    (K, p, d))."""
    spec = {"mlp_head.0.weight": Entry("norm/scale", (d,)),
            "mlp_head.0.bias": Entry("norm/bias", (d,))}
    if classes:
        spec["mlp_head.1.weight"] = Entry("head/kernel", (classes, d), _t)
        spec["mlp_head.1.bias"] = Entry("head/bias", (classes,))
    for i in range(depth):
        t, o = f"transformer.layers.{i}", f"encoder/layers/{i}"
        spec |= {
            f"{t}.0.norm.weight": Entry(f"{o}/attn/norm/scale", (d,)),
            f"{t}.0.norm.bias": Entry(f"{o}/attn/norm/bias", (d,)),
            f"{t}.0.fn.qkv.weight": Entry(f"{o}/attn/proj", (d, d),
                                          lambda w, k=k, p=p: w.T.reshape(-1, k, p)),
            f"{t}.0.fn.to_out.0.weight": Entry(f"{o}/attn/out", (d, d),
                                               lambda w, k=k, p=p: w.T.reshape(k, p, -1)),
            f"{t}.1.norm.weight": Entry(f"{o}/sparse/norm/scale", (d,)),
            f"{t}.1.norm.bias": Entry(f"{o}/sparse/norm/bias", (d,)),
        }
    return spec


# --- 'crate-torch' ---------------------------------------------------------------------------

def _crate_spec(d: int, k: int, depth: int, rows: int, patch_dim: int,
                classes: int) -> dict[str, Entry]:
    """The CRATE layout: the linear stem (LayerNorm, Linear, LayerNorm over P·P·C values), the
    learned position table, the head and MSSA, MSSA's output bias and ISTA's W (d, d)."""
    spec = {
        "cls_token": Entry("cls", (1, 1, d)),
        "pos_embedding": Entry("posemb/embedding", (1, rows, d)),
        "to_patch_embedding.1.weight": Entry("stem/norm_in/scale", (patch_dim,)),
        "to_patch_embedding.1.bias": Entry("stem/norm_in/bias", (patch_dim,)),
        "to_patch_embedding.2.weight": Entry("stem/proj/kernel", (d, patch_dim), _t),
        "to_patch_embedding.2.bias": Entry("stem/proj/bias", (d,)),
        "to_patch_embedding.3.weight": Entry("stem/norm_out/scale", (d,)),
        "to_patch_embedding.3.bias": Entry("stem/norm_out/bias", (d,)),
    }
    spec |= _torch_head_and_mssa(d, k, d // k, depth, classes)
    for i in range(depth):
        t, o = f"transformer.layers.{i}", f"encoder/layers/{i}"
        spec |= {
            f"{t}.0.fn.to_out.0.bias": Entry(f"{o}/attn/out_bias", (d,)),
            f"{t}.1.fn.weight": Entry(f"{o}/sparse/weight", (d, d)),
        }
    return spec


def import_crate_torch(source: Mapping[str, Any], *, heads: int | None = None,
                       name: str | None = None, image_size: int | None = None,
                       patch_size: int | None = None, channels: int = 3,
                       allow_extra: Mapping[str, str] | None = None,
                       metadata: Mapping[str, str] | None = None,
                       **config_overrides: Any) -> Imported:
    """A CRATE PyTorch state_dict (docs/design.md §3) → our CRATE.

    The patch size comes from the stem's LayerNorm over P·P·C values with C = `channels` (3);
    image_size (when it differs from the table's) resizes the position table; the patch size
    of a CRATE cannot change. `config_overrides` set non-shape fields (pool='mean', eta, ...);
    the LayerNorm eps stays CRATE's 1e-5, as in the reference."""
    layout, block = "crate-torch", "crate"
    src = CrateSource.read(source, ".", name, layout=layout, block=block)
    flat, notes = src.flat, src.notes
    ln = "transformer.layers.0.0.norm.weight"
    width = src.vote([("cls_token", lambda s: s[-1]), ("pos_embedding", lambda s: s[-1]),
                      ("to_patch_embedding.2.weight", lambda s: s[0]),
                      ("to_patch_embedding.3.weight", lambda s: s[0]),
                      (ln, lambda s: s[0]), ("mlp_head.0.weight", lambda s: s[0])], "width")
    patch_dim = src.vote([("to_patch_embedding.1.weight", lambda s: s[0]),
                          ("to_patch_embedding.2.weight", lambda s: s[1])], "patch dimension")
    patch = math.isqrt(patch_dim // channels)
    if patch * patch * channels != patch_dim:
        raise ConversionError(f"{layout}: the stem's patch dimension {patch_dim} is not "
                              f"P*P*{channels} for any patch size P (channels={channels})")
    rows = src.vote([("pos_embedding", lambda s: s[1])], "position table")
    side = grid_side(rows - 1, f"{layout} pos_embedding")
    depth = layer_count(flat, LAYERS, layout)
    k = resolve_heads(block, width, heads, src.size_hint, (metadata or {}).get("heads"), notes,
                      layout)
    has_head, classes = _torch_head(src)
    spec = _crate_spec(width, k, depth, rows, patch_dim, classes if has_head else 0)
    dims = dict(width=width, depth=depth, heads=k, patch=patch, image=side * patch,
                classes=classes)
    overrides = dict(num_classes=classes, image_size=side * patch)
    if channels != 3:
        overrides["channels"] = channels
    return finish(src, spec, dims, overrides=overrides, config_overrides=config_overrides,
                  allow_extra=allow_extra, image_size=image_size, patch_size=patch_size)


# --- 'crate-alpha-torch' ---------------------------------------------------------------------

def _alpha_spec(d: int, k: int, depth: int, rows: int, patch: int, chans: int, ratio: int,
                stem_bias: bool, classes: int) -> dict[str, Entry]:
    """The CRATE-α port's layout: the conv stem (OIHW → HWIO), cls token, learned position
    table, the head and MSSA, and the ISTA dictionaries D, D1 (d, C·d)."""
    spec = {
        "conv1.weight": Entry("stem/kernel", (d, chans, patch, patch),
                              lambda w: w.transpose(2, 3, 1, 0)),
        "cls_token": Entry("cls", (1, 1, d)),
        "pos_embedding": Entry("posemb/embedding", (1, rows, d)),
    }
    if stem_bias:
        spec["conv1.bias"] = Entry("stem/bias", (d,))
    spec |= _torch_head_and_mssa(d, k, d // k, depth, classes)
    for i in range(depth):
        t, o = f"transformer.layers.{i}", f"encoder/layers/{i}"
        spec |= {
            f"{t}.1.fn.D": Entry(f"{o}/sparse/D", (d, ratio * d)),
            f"{t}.1.fn.D1": Entry(f"{o}/sparse/D1", (d, ratio * d)),
        }
    return spec


def import_crate_alpha_torch(source: Mapping[str, Any], *, heads: int | None = None,
                             name: str | None = None, image_size: int | None = None,
                             patch_size: int | None = None,
                             allow_extra: Mapping[str, str] | None = None,
                             metadata: Mapping[str, str] | None = None,
                             **config_overrides: Any) -> Imported:
    """A CRATE-α PyTorch-port state_dict (docs/design.md §3) → our CRATE-α.

    The port pools the cls token, then LayerNorm (eps 1e-5, unlike the blocks' 1e-6), then
    Linear. Ours normalises all tokens with the final norm and then takes the cls token, which
    is the same for cls pooling: the import sets head_norm_eps=1e-5 and pool='cls'."""
    layout, block = "crate-alpha-torch", "crate_alpha"
    src = CrateSource.read(source, ".", name, layout=layout, block=block)
    flat, notes = src.flat, src.notes
    width = src.vote([("cls_token", lambda s: s[-1]), ("pos_embedding", lambda s: s[-1]),
                      ("conv1.weight", lambda s: s[0]), ("conv1.bias", lambda s: s[0]),
                      ("transformer.layers.0.0.norm.weight", lambda s: s[0]),
                      ("mlp_head.0.weight", lambda s: s[0])], "width")
    patch = src.vote([("conv1.weight", lambda s: s[-1])], "patch size")
    chans = src.vote([("conv1.weight", lambda s: s[1])], "input channels")
    rows = src.vote([("pos_embedding", lambda s: s[1])], "position table")
    side = grid_side(rows - 1, f"{layout} pos_embedding")
    depth = layer_count(flat, LAYERS, layout)
    ratio = dictionary_ratio(flat, layout, width, depth, "transformer.layers.{i}.1.fn.D")
    k = resolve_heads(block, width, heads, src.size_hint, (metadata or {}).get("heads"), notes,
                      layout)
    stem_bias = "conv1.bias" in flat
    has_head, classes = _torch_head(src)
    spec = _alpha_spec(width, k, depth, rows, patch, chans, ratio, stem_bias,
                       classes if has_head else 0)
    dims = dict(width=width, depth=depth, heads=k, patch=patch, image=side * patch,
                classes=classes)
    overrides: dict[str, Any] = dict(num_classes=classes, image_size=side * patch,
                                     head_norm_eps=TORCH_HEAD_EPS, pool="cls")
    overrides |= alpha_overrides(stem_bias=stem_bias, ratio=ratio, chans=chans)
    notes.append(f"head LayerNorm eps {TORCH_HEAD_EPS} (the port's mlp_head.0), cls pooling")
    return finish(src, spec, dims, overrides=overrides, config_overrides=config_overrides,
                  allow_extra=allow_extra, image_size=image_size, patch_size=patch_size)
