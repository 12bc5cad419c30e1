"""ToST checkpoints in the official PyTorch layouts (RobinWu218/ToST), both ways.

    'tost-torch'      tost_vision/tost.py VisionTransformer: patch_embed.proj.{0,2,4,6}.{0,1}
                      (3×3 convolutions + BatchNorm with running statistics), pos_embeder.
                      token_projection, cls_token, blocks.{i}.{norm1, attn.{qkv, temp, to_out.0},
                      norm2, mlp.{fc1, fc2}, gamma1, gamma2}, cls_attn_blocks.{j}.{norm1,
                      attn.{qkv, proj}, norm2, mlp.{fc1, fc2}, gamma1, gamma2}, norm, head
    'tost-gpt-torch'  tost_lang/model_TSSA.py GPT(TSSA=True): transformer.{wte, wpe, ln_f},
                      transformer.h.{i}.{ln_1, attn.{c_attn, temp, denom_bias, c_proj}, ln_2,
                      mlp.{c_fc, c_proj}, gamma1, gamma2}, lm_head (tied to wte)

PyTorch Linear weights are (out, in), ours (in, out) with the heads split out; convolutions
OIHW ↔ HWIO. The BatchNorm running statistics travel as the run's 'batch_stats' (nnx.BatchStat
state), not as parameters; `num_batches_tracked` is written as the checkpoint's step (PyTorch
reads it only when momentum is None, which the reference never sets).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from crate_jax import models
from crate_jax.convert.files import load_weights, save_weights
from crate_jax.convert.primitives import ConversionError, check_params_fit, flatten_source
from crate_jax.convert.runs import read_checkpoint, write_run_directory
from crate_jax.models import layer_stack
from crate_jax.models.lm_config import LM_SIZES
from crate_jax.models.tost import TOST_SIZES

VISION, LANGUAGE = "tost-torch", "tost-gpt-torch"
LAYOUTS = (VISION, LANGUAGE)

# (ours relative to a layer, torch relative to blocks.{i}., to torch, from torch)
Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray], Callable[..., np.ndarray]]


def _same(x: np.ndarray, *_: Any) -> np.ndarray:
    return np.asarray(x)


def _linear_out(x: np.ndarray, *_: Any) -> np.ndarray:  # ours (d, ...) → torch (out, d)
    return np.asarray(x).reshape(x.shape[0], -1).T


def _heads_in(shape: tuple[int, ...]) -> Callable[..., np.ndarray]:
    return lambda t, *_: np.asarray(t).T.reshape(shape)


def _tssa_rules(d: int, k: int, attn: str, out: str, norm1: str, norm2: str, fc1: str,
                fc2: str, temp_shape: tuple[int, ...]) -> list[Rule]:
    p = d // k
    rules: list[Rule] = [
        ("attn/norm/scale", f"{norm1}.weight", _same, _same),
        ("attn/norm/bias", f"{norm1}.bias", _same, _same),
        ("attn/proj", f"{attn}.weight", _linear_out, _heads_in((d, k, p))),
        ("attn/proj_bias", f"{attn}.bias", lambda x: np.asarray(x).reshape(-1),
         lambda t, *_: np.asarray(t).reshape(k, p)),
        ("attn/temperature", "attn.temp", lambda x: np.asarray(x).reshape(temp_shape),
         lambda t, *_: np.asarray(t).reshape(k)),
        ("attn/out", f"{out}.weight", lambda x: np.asarray(x).reshape(d, d).T,
         lambda t, *_: np.asarray(t).T.reshape(k, p, d)),
        ("attn/out_bias", f"{out}.bias", _same, _same),
        ("sparse/norm/scale", f"{norm2}.weight", _same, _same),
        ("sparse/norm/bias", f"{norm2}.bias", _same, _same),
        ("scale_attn/gamma", "gamma1", _same, _same),
        ("scale_sparse/gamma", "gamma2", _same, _same),
    ]
    for ours, theirs in (("sparse/fc1", fc1), ("sparse/fc2", fc2)):
        rules += [(f"{ours}/kernel", f"{theirs}.weight", lambda x: np.asarray(x).T,
                   lambda t, *_: np.asarray(t).T),
                  (f"{ours}/bias", f"{theirs}.bias", _same, _same)]
    return rules


def _vision_rules(d: int, k: int, depth: int, steps: int, cab: int) -> list[tuple[str, str,
                                                                                   Any, Any]]:
    """(our '/'-path, torch key, to torch, from torch) for every parameter."""
    t = lambda x: np.asarray(x).T
    conv_to = lambda x: np.asarray(x).transpose(3, 2, 0, 1)  # HWIO → OIHW
    conv_from = lambda x: np.asarray(x).transpose(2, 3, 1, 0)
    rules = [("cls", "cls_token", _same, _same),
             ("pos_proj/kernel", "pos_embeder.token_projection.weight",
              lambda x: np.asarray(x).T[..., None, None], lambda x: np.asarray(x)[:, :, 0, 0].T),
             ("pos_proj/bias", "pos_embeder.token_projection.bias", _same, _same),
             ("norm/scale", "norm.weight", _same, _same), ("norm/bias", "norm.bias", _same, _same),
             ("head/kernel", "head.weight", t, t), ("head/bias", "head.bias", _same, _same)]
    for j in range(steps):
        rules += [(f"stem/conv_{j}", f"patch_embed.proj.{2 * j}.0.weight", conv_to, conv_from),
                  (f"stem/norm_{j}/scale", f"patch_embed.proj.{2 * j}.1.weight", _same, _same),
                  (f"stem/norm_{j}/bias", f"patch_embed.proj.{2 * j}.1.bias", _same, _same)]
    layer = _tssa_rules(d, k, "attn.qkv", "attn.to_out.0", "norm1", "norm2", "mlp.fc1",
                        "mlp.fc2", (k, 1))
    rules += [(f"encoder/layers/{i}/{o}", f"blocks.{i}.{th}", a, b)
              for i in range(depth) for o, th, a, b in layer]
    p = d // k
    for j in range(cab):
        ours, theirs = f"class_block_{j}", f"cls_attn_blocks.{j}"
        rules += [(f"{ours}/qkv", f"{theirs}.attn.qkv.weight", _linear_out,
                   _heads_in((d, 3, k, p))),
                  (f"{ours}/qkv_bias", f"{theirs}.attn.qkv.bias",
                   lambda x: np.asarray(x).reshape(-1),
                   lambda x, k=k, p=p: np.asarray(x).reshape(3, k, p)),
                  (f"{ours}/out/kernel", f"{theirs}.attn.proj.weight", t, t),
                  (f"{ours}/out/bias", f"{theirs}.attn.proj.bias", _same, _same)]
        for a, b in (("norm1", "norm1"), ("norm2", "norm2")):
            rules += [(f"{ours}/{a}/scale", f"{theirs}.{b}.weight", _same, _same),
                      (f"{ours}/{a}/bias", f"{theirs}.{b}.bias", _same, _same)]
        for a in ("fc1", "fc2"):
            rules += [(f"{ours}/{a}/kernel", f"{theirs}.mlp.{a}.weight", t, t),
                      (f"{ours}/{a}/bias", f"{theirs}.mlp.{a}.bias", _same, _same)]
        rules += [(f"{ours}/gamma{g}", f"{theirs}.gamma{g}", _same, _same) for g in (1, 2)]
    return rules


def _lm_rules(d: int, k: int, depth: int, context: int) -> list[tuple[str, str, Any, Any]]:
    rules = [("embeddings/token", "transformer.wte.weight", _same, _same),
             ("embeddings/position", "transformer.wpe.weight", _same, _same),
             ("norm/scale", "transformer.ln_f.weight", _same, _same),
             ("norm/bias", "transformer.ln_f.bias", _same, _same)]
    layer = _tssa_rules(d, k, "attn.c_attn", "attn.c_proj", "ln_1", "ln_2", "mlp.c_fc",
                        "mlp.c_proj", (k, 1))
    layer.append(("attn/denom_bias", "attn.denom_bias",
                  lambda x: np.asarray(x)[..., None], lambda x, *_: np.asarray(x)[..., 0]))
    rules += [(f"encoder/layers/{i}/{o}", f"transformer.h.{i}.{th}", a, b)
              for i in range(depth) for o, th, a, b in layer]
    return rules


# --- export ----------------------------------------------------------------------------------

def _dims(flat: Mapping[str, np.ndarray]) -> tuple[int, int, int]:
    """(width, heads, depth) from the parameter shapes."""
    temp = flat.get("encoder/layers/0/attn/temperature")
    if temp is None:
        raise ConversionError("these parameters hold no TSSA layers (encoder/layers/0/attn/"
                              "temperature): not a ToST model")
    depth = 1 + max(int(k.split("/")[2]) for k in flat if k.startswith("encoder/layers/"))
    return int(flat["encoder/layers/0/attn/proj"].shape[0]), int(temp.shape[0]), depth


def to_tost_torch(params: Mapping[Any, Any], batch_stats: Mapping[Any, Any], *,
                  step: int = 0) -> dict[str, np.ndarray]:
    """Our ToST image model's parameters and BatchNorm statistics → the official state_dict."""
    flat = layer_stack.unstack_flat(models.flat_params(params))
    stats = models.flat_params(dict(batch_stats))
    d, k, depth = _dims(flat)
    steps = sum(1 for key in flat if re.fullmatch(r"stem/conv_\d+", key))
    cab = len({key.split("/")[0] for key in flat if key.startswith("class_block_")})
    if "head/kernel" not in flat:
        raise ConversionError("tost-torch: the model has no head (num_classes=0); the "
                              "official layout always has one")
    out = _apply_out(flat, _vision_rules(d, k, depth, steps, cab), VISION)
    for j in range(steps):
        prefix = f"patch_embed.proj.{2 * j}.1."
        for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
            key = f"stem/norm_{j}/{ours}"
            if key not in stats:
                raise ConversionError(f"tost-torch: BatchNorm statistics {key} missing from "
                                      "the run's batch_stats")
            out[prefix + theirs] = np.asarray(stats[key], np.float32)
        out[prefix + "num_batches_tracked"] = np.asarray(step, np.int64)
    return out


def to_tost_gpt_torch(params: Mapping[Any, Any]) -> dict[str, np.ndarray]:
    """Our ToST language model's parameters → the official (nanoGPT) state_dict."""
    flat = layer_stack.unstack_flat(models.flat_params(params))
    d, k, depth = _dims(flat)
    if "lm_head" in flat:
        raise ConversionError("tost-gpt-torch: the official model ties lm_head to wte; this "
                              "model has an untied head (tie_embeddings=False)")
    context = int(flat["embeddings/position"].shape[0])
    out = _apply_out(flat, _lm_rules(d, k, depth, context), LANGUAGE)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _apply_out(flat: Mapping[str, np.ndarray], rules, layout: str) -> dict[str, np.ndarray]:
    missing = [ours for ours, *_ in rules if ours not in flat]
    extra = sorted(set(flat) - {ours for ours, *_ in rules})
    if missing or extra:
        raise ConversionError(f"{layout}: the parameters do not fit the layout (missing "
                              f"{missing[:5]}, not in the layout {extra[:5]})")
    return {theirs: np.ascontiguousarray(to(flat[ours])) for ours, theirs, to, _ in rules}


# --- import ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImportedToST:
    """An imported ToST checkpoint: models.create(name, **overrides) fits `params`;
    `batch_stats` holds the BatchNorm running statistics (image models), `trainer` the task
    that trains it ('classification' or 'language')."""

    name: str
    overrides: dict[str, Any]
    params: dict[str, Any]
    batch_stats: dict[str, Any]
    trainer: str
    notes: tuple[str, ...] = ()

    def build(self):
        """The model with the weights (and running statistics) loaded, in eval mode."""
        model = models.create(self.name, **self.overrides)
        nnx.update(model, nnx.State(jax.tree.map(jnp.asarray, self.params)))
        if self.batch_stats:
            nnx.update(model, nnx.State(jax.tree.map(jnp.asarray, self.batch_stats)))
        model.eval()
        return model


def _take(flat: dict[str, np.ndarray], rules, layout: str) -> dict[str, np.ndarray]:
    problems = [f"{theirs}: missing" for _, theirs, *_ in rules if theirs not in flat]
    if problems:
        raise ConversionError(f"{layout}: " + "; ".join(problems[:8]))
    out = {}
    for ours, theirs, _, back in rules:
        out[ours] = np.asarray(back(flat.pop(theirs)), np.float32)
    return out


def _check_extra(flat: Mapping[str, np.ndarray], layout: str) -> None:
    if flat:
        raise ConversionError(f"{layout}: keys that are not part of the layout: "
                              f"{sorted(flat)[:8]}")


def _count(flat: Mapping[str, Any], pattern: str) -> int:
    found = {int(m[1]) for key in flat if (m := re.match(pattern, key))}
    return max(found) + 1 if found else 0


def _sized_name(table: Mapping[str, tuple], width: int, heads: int, template: str,
                default: str, overrides: dict[str, Any]) -> str:
    for size, dims in table.items():
        if dims[0] == width and dims[-1] == heads:
            return template.format(size=size)
    overrides.update(width=width, heads=heads)
    return template.format(size=default)


def import_tost_torch(source: Mapping[str, Any], *, image_size: int = 224
                      ) -> ImportedToST:
    """The official image state_dict → ImportedToST (sizes inferred from the shapes)."""
    flat, notes = flatten_source(source, ".")
    d, k = int(flat["cls_token"].shape[-1]), int(flat["blocks.0.attn.temp"].shape[0])
    depth, cab = _count(flat, r"blocks\.(\d+)\."), _count(flat, r"cls_attn_blocks\.(\d+)\.")
    steps = sum(1 for key in flat if re.fullmatch(r"patch_embed\.proj\.\d+\.0\.weight", key))
    overrides: dict[str, Any] = {"image_size": image_size,
                                 "num_classes": int(flat["head.weight"].shape[0])}
    table = {s: (w, h) for s, (w, h) in TOST_SIZES.items()}
    name = _sized_name(table, d, k, f"tost-{{size}}-{depth if depth in (12, 24) else 12}/"
                       f"{2 ** steps}", "t", overrides)
    if depth not in (12, 24) or (depth == 12 and name.split("-")[1] in ("m", "l")):
        name = f"tost-t-12/{2 ** steps}"
        overrides.update(width=d, heads=k, depth=depth)
    if cab != 2:
        overrides["class_attention_layers"] = cab
    params = _take(flat, _vision_rules(d, k, depth, steps, cab), VISION)
    stats: dict[str, np.ndarray] = {}
    for j in range(steps):
        prefix = f"patch_embed.proj.{2 * j}.1."
        stats[f"stem/norm_{j}/mean"] = np.asarray(flat.pop(prefix + "running_mean"), np.float32)
        stats[f"stem/norm_{j}/var"] = np.asarray(flat.pop(prefix + "running_var"), np.float32)
        flat.pop(prefix + "num_batches_tracked", None)  # unused with momentum 0.1
    _check_extra(flat, VISION)
    nested = layer_stack.stack_layers(layer_stack.nest(params))
    check_params_fit(lambda: models.create(name, **overrides), nested, f"{name} {overrides}")
    return ImportedToST(name, overrides, nested, layer_stack.nest(stats), "classification",
                        tuple(notes))


def import_tost_gpt_torch(source: Mapping[str, Any]) -> ImportedToST:
    """The official nanoGPT ToST state_dict → ImportedToST (sizes inferred from the shapes)."""
    flat, notes = flatten_source(source, ".")
    wte = flat["transformer.wte.weight"]
    head = flat.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(np.asarray(head), np.asarray(wte)):
        raise ConversionError(f"{LANGUAGE}: lm_head.weight differs from transformer.wte.weight;"
                              " the model ties them")
    vocab, d = (int(n) for n in wte.shape)
    context = int(flat["transformer.wpe.weight"].shape[0])
    k = int(flat["transformer.h.0.attn.temp"].shape[0])
    depth = _count(flat, r"transformer\.h\.(\d+)\.")
    overrides: dict[str, Any] = {}
    sizes = {s: (w, dep, h) for s, (w, dep, h) in LM_SIZES["tost-gpt"].items()}
    name = _sized_name(sizes, d, k, "tost-gpt-{size}", "base", overrides)
    if sizes[name.rsplit("-", 1)[1]][1] != depth:
        overrides["depth"] = depth
    if vocab != 50_304:
        overrides["vocab_size"] = vocab
    if context != 1024:
        overrides["context_length"] = context
    params = _take(flat, _lm_rules(d, k, depth, context), LANGUAGE)
    _check_extra(flat, LANGUAGE)
    nested = layer_stack.stack_layers(layer_stack.nest(params))
    check_params_fit(lambda: models.create(name, **overrides), nested, f"{name} {overrides}")
    return ImportedToST(name, overrides, nested, {}, "language", tuple(notes))


def import_tost(path: str | os.PathLike | Mapping[str, Any], layout: str, *,
                image_size: int | None = None) -> ImportedToST:
    """Read `path` (or a state_dict in memory) as `layout` ('tost-torch' or 'tost-gpt-torch')."""
    source = path if isinstance(path, Mapping) else load_weights(path)[0]
    if layout == VISION:
        return import_tost_torch(source, image_size=image_size or 224)
    if layout == LANGUAGE:
        if image_size is not None:
            raise ConversionError("--image-size applies to tost-torch only")
        return import_tost_gpt_torch(source)
    raise ValueError(f"unknown ToST layout {layout!r}; layouts are {list(LAYOUTS)}")


# --- run directories -------------------------------------------------------------------------

def write_tost_run(out: str | os.PathLike, imported: ImportedToST,
                   source: dict[str, Any] | None = None) -> Path:
    """Write `imported` as a run directory (checkpoints/0 with params and, for image models,
    batch_stats; config.json naming the model), as convert/runs.py does for the other
    layouts. `out` must not hold a run already."""
    state = {"step": jnp.zeros((), jnp.int32), "params": imported.params, "opt_state": {}}
    if imported.batch_stats:
        state["batch_stats"] = imported.batch_stats
    data = {k: imported.overrides[k] for k in ("num_classes", "image_size")
            if k in imported.overrides}
    overrides = {k: v for k, v in imported.overrides.items() if k not in data}
    config = {"trainer": imported.trainer, "model": {"name": imported.name,
                                                     "overrides": overrides},
              "converted_from": {**(source or {}), "notes": list(imported.notes)}}
    if data:
        config["data"] = data
    return write_run_directory(out, state, config)


def read_tost_run(path: str | os.PathLike, step: int | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(params, batch_stats, step) of a run directory or its checkpoints/ directory, NumPy."""
    path = epath.Path(path)  # a local folder or gs://...
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{path}: no run or checkpoint directory")
    return read_checkpoint(ckpt_dir, step, missing=f"{ckpt_dir}: no checkpoint")


def export_tost(source: str | os.PathLike, layout: str, output: str | os.PathLike,
                step: int | None = None) -> dict[str, np.ndarray]:
    """Write a ToST run's checkpoint in `layout` to `output` (.pth, .safetensors or .npz);
    returns the state_dict written."""
    params, stats, step = read_tost_run(source, step)
    if layout == VISION:
        if not stats:
            raise ConversionError(f"{source}: the checkpoint holds no batch_stats (BatchNorm "
                                  "running statistics); is it a ToST image model?")
        state_dict = to_tost_torch(params, stats, step=step)
    elif layout == LANGUAGE:
        state_dict = to_tost_gpt_torch(params)
    else:
        raise ValueError(f"unknown ToST layout {layout!r}; layouts are {list(LAYOUTS)}")
    save_weights(state_dict, output, {"format": "pt", "layout": layout,
                                      "producer": "crate_jax.convert"})
    return state_dict
