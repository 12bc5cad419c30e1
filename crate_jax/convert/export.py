"""Export our parameters to the released PyTorch layouts (docs/design.md §3), as NumPy state dicts.

    to_crate_alpha_torch(params, cfg)   our CRATE-α → the CRATE-α PyTorch port's state_dict
    to_crate_torch(params, cfg)         our CRATE   → the CRATE PyTorch state_dict
    export_crate(params, layout, path, cfg)     … written as .safetensors (NumPy only) or .pth

`params` is a pure parameter dict (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`, or what
`crate_jax.train.loop.final_params` returns: layer keys may be ints or strings). The mapping is
only transposes and reshapes, so export followed by import gives back the same bits.

`cfg` (the model's VisionConfig, optional) is checked against what the target code can compute:
`compatibility_notes` raises for what the target cannot represent (CRATE-α with mean pooling:
the port pools the cls token) and returns notes for what it computes differently (the port's
head LayerNorm uses eps 1e-5, its η, λ, ISTA steps are fixed). A fixed sin-cos position table
(not a parameter of ours) is written out as the port's learned `pos_embedding`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from crate_jax.convert.files import save_weights
from crate_jax.convert.primitives import TORCH_HEAD_EPS, ConversionError, per_layer_flat
from crate_jax.models.config import VisionConfig
from crate_jax.models.layers import sincos_2d

__all__ = ["EXPORT_FORMATS", "compatibility_notes", "export_crate", "to_crate_alpha_torch",
           "to_crate_torch"]

EXPORT_FORMATS = ("crate-alpha-torch", "crate-torch", "crate-alpha-clipa-torch",
                  "crate-mae-torch", "dino-vit-torch", "tost-torch", "tost-gpt-torch")


def _depth(flat: Mapping[str, np.ndarray]) -> int:
    layers = {int(k.split("/")[2]) for k in flat if k.startswith("encoder/layers/")}
    if not layers:
        raise ConversionError("the parameters have no encoder/layers/*")
    return max(layers) + 1


class _Reader:
    """Takes our parameters by path and reports every one missing or left over at the end."""

    def __init__(self, flat: dict[str, np.ndarray], layout: str):
        self.flat, self.layout, self.used, self.missing = flat, layout, set(), []

    def __call__(self, path: str) -> np.ndarray:
        if path not in self.flat:
            self.missing.append(path)
            return np.zeros(0, np.float32)
        self.used.add(path)
        return self.flat[path]

    def has(self, path: str) -> bool:
        return path in self.flat

    def finish(self) -> None:
        extra = sorted(set(self.flat) - self.used)
        problems = []
        if self.missing:
            problems.append(f"missing parameters: {', '.join(self.missing)}")
        if extra:
            problems.append(f"parameters the {self.layout} layout has no place for: "
                            f"{', '.join(extra)}")
        if problems:
            raise ConversionError(f"cannot export to {self.layout}: " + "; ".join(problems))


def _posemb(get: _Reader, cfg: VisionConfig | None) -> np.ndarray:
    if get.has("posemb/embedding"):
        return get("posemb/embedding")
    if cfg is not None and cfg.posemb == "sincos2d":
        table = np.concatenate([np.zeros((1, cfg.width), np.float32),
                                sincos_2d(*cfg.grid, cfg.width)])
        return table[None].astype(get("cls").dtype)
    return get("posemb/embedding")  # reported as missing


def _torch_layer(get: _Reader, i: int, d: int, *, out_bias: bool,
                 ista: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Layer `i` in the layout the CRATE and CRATE-α PyTorch code share, in its key order:
    transformer.layers.{i}.0 (PreNorm MSSA: norm, qkv (d, d), to_out.0 and, for CRATE, its
    bias) and .1 (PreNorm ISTA: norm and `ista`, CRATE's W 'weight' or CRATE-α's D, D1)."""
    o, t = f"encoder/layers/{i}", f"transformer.layers.{i}"
    sd = {
        f"{t}.0.norm.weight": get(f"{o}/attn/norm/scale"),
        f"{t}.0.norm.bias": get(f"{o}/attn/norm/bias"),
        f"{t}.0.fn.qkv.weight": get(f"{o}/attn/proj").reshape(d, -1).T,
        f"{t}.0.fn.to_out.0.weight": get(f"{o}/attn/out").reshape(-1, d).T,
    }
    if out_bias:
        sd[f"{t}.0.fn.to_out.0.bias"] = get(f"{o}/attn/out_bias")
    sd[f"{t}.1.norm.weight"] = get(f"{o}/sparse/norm/scale")
    sd[f"{t}.1.norm.bias"] = get(f"{o}/sparse/norm/bias")
    for name in ista:
        sd[f"{t}.1.fn.{name}"] = get(f"{o}/sparse/{name}")
    return sd


def compatibility_notes(cfg: VisionConfig | None, layout: str) -> list[str]:
    """What the `layout`'s reference code computes differently from the model `cfg`; raises
    ConversionError for a model it cannot represent at all."""
    if layout not in EXPORTERS:
        raise ValueError(f"unknown export layout {layout!r}; layouts are {list(EXPORT_FORMATS)}")
    if cfg is None:
        return ["no model config: exported by parameter names alone (nothing checked)"]
    want = "crate_alpha" if layout == "crate-alpha-torch" else "crate"
    if cfg.block != want:
        raise ConversionError(f"a {cfg.block} model cannot be exported as {layout}")
    notes = []
    if layout == "crate-alpha-torch":
        if cfg.pool != "cls":
            raise ConversionError(f"the CRATE-α PyTorch port pools the cls token; a model with "
                                  f"pool={cfg.pool!r} has no equivalent there")
        if cfg.final_eps != TORCH_HEAD_EPS:
            notes.append(f"the port's head LayerNorm uses eps {TORCH_HEAD_EPS}; this model's "
                         f"final norm uses {cfg.final_eps}")
        if cfg.eps != 1e-6:
            notes.append(f"the port's block LayerNorms use eps 1e-6; this model uses {cfg.eps}")
        fixed = dict(eta=0.1, lam=0.1, ista_steps=2, overcomplete_ratio=4)
        if cfg.posemb == "sincos2d":
            notes.append("the fixed 2-D sin-cos position table was written as pos_embedding")
        if cfg.num_classes == 0:
            notes.append("no head: mlp_head.1 is absent (the final norm is mlp_head.0)")
    else:
        if cfg.eps != 1e-5:
            notes.append(f"the CRATE reference LayerNorms use eps 1e-5; this model uses "
                         f"{cfg.eps}")
        if cfg.pool != "cls":
            notes.append("mean pooling: build the PyTorch CRATE with pool='mean'")
        fixed = dict(eta=0.1, lam=0.1)
    for field, value in fixed.items():
        if getattr(cfg, field) != value:
            notes.append(f"the reference fixes {field}={value}; this model has "
                         f"{field}={getattr(cfg, field)}")
    if cfg.drop_path_rate or cfg.layer_scale_init is not None:
        notes.append("drop_path / LayerScale settings are not part of the layout")
    return notes


def to_crate_alpha_torch(params: Mapping[Any, Any],
                         cfg: VisionConfig | None = None) -> dict[str, np.ndarray]:
    """Our CRATE-α parameters → the CRATE-α PyTorch port's state_dict (NumPy arrays):
    conv1 (d, C, P, P), qkv / to_out.0 (out, in) Linear weights, D and D1 (d, C·d) as they are,
    the final norm as mlp_head.0 and the head as mlp_head.1 (weight (classes, d))."""
    flat = per_layer_flat(params)
    get = _Reader(flat, "crate-alpha-torch")
    proj0 = get("encoder/layers/0/attn/proj")
    d = proj0.shape[0] if proj0.ndim == 3 else 0
    sd = {"conv1.weight": get("stem/kernel").transpose(3, 2, 0, 1),
          "cls_token": get("cls"), "pos_embedding": _posemb(get, cfg),
          "mlp_head.0.weight": get("norm/scale"), "mlp_head.0.bias": get("norm/bias")}
    if get.has("stem/bias"):
        sd["conv1.bias"] = get("stem/bias")
    if get.has("head/kernel") or get.has("head/bias"):
        sd["mlp_head.1.weight"] = get("head/kernel").T
        sd["mlp_head.1.bias"] = get("head/bias")
    for i in range(_depth(flat)):
        sd |= _torch_layer(get, i, d, out_bias=False, ista=("D", "D1"))
    get.finish()
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def to_crate_torch(params: Mapping[Any, Any],
                   cfg: VisionConfig | None = None) -> dict[str, np.ndarray]:
    """Our CRATE parameters → the CRATE PyTorch state_dict (NumPy arrays): the linear stem as
    to_patch_embedding.{1,2,3}, (out, in) Linear weights, the ISTA W as it is, the head
    LayerNorm and Linear as mlp_head.{0,1}."""
    del cfg  # CRATE's learned position table is always a parameter
    flat = per_layer_flat(params)
    get = _Reader(flat, "crate-torch")
    proj0 = get("encoder/layers/0/attn/proj")
    d = proj0.shape[0] if proj0.ndim == 3 else 0
    sd = {
        "cls_token": get("cls"), "pos_embedding": get("posemb/embedding"),
        "to_patch_embedding.1.weight": get("stem/norm_in/scale"),
        "to_patch_embedding.1.bias": get("stem/norm_in/bias"),
        "to_patch_embedding.2.weight": get("stem/proj/kernel").T,
        "to_patch_embedding.2.bias": get("stem/proj/bias"),
        "to_patch_embedding.3.weight": get("stem/norm_out/scale"),
        "to_patch_embedding.3.bias": get("stem/norm_out/bias"),
        "mlp_head.0.weight": get("norm/scale"), "mlp_head.0.bias": get("norm/bias"),
    }
    if get.has("head/kernel") or get.has("head/bias"):
        sd["mlp_head.1.weight"] = get("head/kernel").T
        sd["mlp_head.1.bias"] = get("head/bias")
    for i in range(_depth(flat)):
        sd |= _torch_layer(get, i, d, out_bias=True, ista=("weight",))
    get.finish()
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


EXPORTERS = {"crate-alpha-torch": to_crate_alpha_torch, "crate-torch": to_crate_torch}


def export_crate(params: Mapping[Any, Any], layout: str, path: str | os.PathLike,
                 cfg: Any = None, *, name: str | None = None) -> list[str]:
    """Write a CRATE / CRATE-α classifier's `params` in `layout` ('crate-torch' or
    'crate-alpha-torch') to `path`; the .safetensors metadata records the layout, the heads,
    the model `name` and `cfg`. Returns the compatibility notes."""
    notes = compatibility_notes(cfg, layout)
    state_dict = EXPORTERS[layout](params, cfg)
    metadata = {"format": "pt", "layout": layout, "producer": "crate_jax.convert"}
    proj = per_layer_flat(params).get("encoder/layers/0/attn/proj")
    if proj is not None and proj.ndim == 3:
        metadata["heads"] = str(proj.shape[1])
    if name is not None:
        metadata["model"] = name
    if cfg is not None:
        metadata["config"] = json.dumps({k: v for k, v in vars(cfg).items()}, sort_keys=True)
    save_weights(state_dict, path, metadata)
    return notes
