"""What every checkpoint layout's converter shares: the error, the imported result, reading a
source state dict, checking it against a layout's table and against the model.

Nothing is dropped silently: every source key must be consumed, be absent-but-optional in a
recognised way (stem bias, head, learned position table), or be whitelisted by a regular
expression with a reason (`allow_extra={'.*num_batches_tracked': 'BatchNorm counters'}`);
otherwise the error lists every missing key, unexpected key and shape mismatch at once
(`apply_spec`).

An import returns `Imported(name, overrides, params, notes)`, which unpacks as
`name, overrides, params = ...` with `models.create(name, **overrides)` the model these params
belong to.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax import models
from crate_jax.convert.files import to_numpy
from crate_jax.models import layer_stack
from crate_jax.models.config import VisionConfig
from crate_jax.models.resize import resize_patch_kernel, resize_posemb

__all__ = [
    "TORCH_HEAD_EPS", "ConversionError", "Entry", "Imported", "allowed_reason", "apply_spec",
    "build_loaded", "check_against_model", "check_params_fit", "closest_size", "describe",
    "flatten_source", "grid_side", "in_proj_part", "layer_count", "nest", "per_layer_flat",
    "resize_imported", "size_label", "vote",
]

TORCH_HEAD_EPS = 1e-5  # the CRATE-α PyTorch port's mlp_head.0 LayerNorm


class ConversionError(ValueError):
    """A checkpoint that does not match the layout it was read as; the message names every
    problem (missing keys, unexpected keys, shape mismatches)."""


@dataclasses.dataclass(frozen=True)
class Imported:
    """An imported checkpoint: `models.create(name, **overrides)` builds the model whose
    parameters are `params` (a pure dict shaped like `nnx.to_pure_dict(nnx.state(model,
    nnx.Param))`, NumPy leaves, integer layer keys). `notes` says what was inferred or changed.
    Unpacks as (name, overrides, params)."""

    name: str
    overrides: dict[str, Any]
    params: dict[str, Any]
    notes: tuple[str, ...] = ()

    def __iter__(self):
        return iter((self.name, self.overrides, self.params))

    def config(self) -> VisionConfig:
        """The model configuration."""
        return models.config_for(self.name, **self.overrides)

    def build(self, *, seed: int = 0) -> nnx.Module:
        """The model with the imported parameters loaded (nothing randomly initialised)."""
        return build_loaded(lambda: models.create(self.name, seed=seed, **self.overrides),
                            self.params)


def build_loaded(make: Callable[[], nnx.Module], params: Mapping[str, Any]) -> nnx.Module:
    """`make()`'s module with `params` (a pure dict) loaded. Nothing is randomly initialised:
    the structure comes from an abstract model, the non-parameter state (a fixed sin-cos table,
    random streams) from a jitted construction whose unused parameter init XLA drops."""
    graphdef, abstract, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[2])()
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, abstract, rest)


def per_layer_flat(params: Mapping[Any, Any]) -> dict[str, np.ndarray]:
    """{'encoder/layers/0/attn/proj': array, ...}: per layer, whichever layout `params` has."""
    return {k: np.asarray(v) for k, v in
            layer_stack.unstack_flat(models.flat_params(params)).items()}


def nest(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{'encoder/layers/0/attn/proj': x, ...} (the converters' per-layer name maps) → the
    model's nested, stacked layout {'encoder': {'layers': {'attn': {'proj': (L, ...)}}}}."""
    return layer_stack.stack_layers(layer_stack.nest(flat))


# --- the source mapping --------------------------------------------------------------------

def flatten_source(source: Mapping[str, Any], sep: str) -> tuple[dict[str, np.ndarray],
                                                                 list[str]]:
    """A flat {key: ndarray} from a state dict: a {'state_dict': ...} wrapper is opened (its
    other entries, e.g. 'epoch' or 'optimizer', are left aside with a note), 'module.' prefixes
    (DataParallel / DDP) are stripped, nested mappings are joined with `sep`."""
    notes: list[str] = []
    if not isinstance(source, Mapping):
        raise ConversionError(f"expected a mapping of names to arrays, got "
                              f"{type(source).__name__}")
    if "state_dict" in source and isinstance(source["state_dict"], Mapping):
        others = sorted(str(k) for k in source if k != "state_dict")
        notes.append("opened the {'state_dict': ...} wrapper" +
                     (f"; its other entries are not weights and were left aside: {others}"
                      if others else ""))
        source = source["state_dict"]
    flat: dict[str, np.ndarray] = {}
    stripped = 0

    def visit(tree: Mapping[str, Any], prefix: str) -> None:
        nonlocal stripped
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                visit(value, name + sep)
                continue
            while name.startswith("module."):
                name = name[len("module."):]
                stripped += 1
            if name in flat:
                raise ConversionError(f"key {name!r} occurs twice (with and without a "
                                      "'module.' prefix)")
            flat[name] = to_numpy(value)

    visit(source, "")
    if stripped:
        notes.append(f"stripped the 'module.' prefix from {stripped} key(s)")
    return flat, notes


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one source tensor goes: our path, the shape it must have, how it converts."""

    ours: str  # our '/'-joined parameter path
    shape: tuple[int, ...]  # the source tensor's expected shape
    convert: Callable[[np.ndarray], np.ndarray] = np.asarray


def allowed_reason(key: str, allow_extra: Mapping[str, str]) -> str | None:
    """The reason of the first `allow_extra` pattern that matches all of `key`, or None."""
    for pattern, reason in allow_extra.items():
        if re.fullmatch(pattern, key):
            return reason
    return None


def describe(dims: Mapping[str, Any]) -> str:
    """'width 768, depth 12, ...': the sizes read off a checkpoint, for messages."""
    return ", ".join(f"{k} {v}" for k, v in dims.items() if v is not None)


def apply_spec(flat: Mapping[str, np.ndarray], spec: Mapping[str, Entry], *, layout: str,
               dims: Mapping[str, Any], allow_extra: Mapping[str, str], dtype: np.dtype,
               notes: list[str]) -> dict[str, np.ndarray]:
    """Check `flat` against `spec` exactly and map it onto our paths, cast to `dtype`: every
    missing key, unexpected key (not whitelisted in `allow_extra`), shape mismatch and
    non-floating tensor is reported in one ConversionError; the whitelisted keys are noted."""
    missing = [k for k in spec if k not in flat]
    unexpected, ignored = [], []
    for key in flat:
        if key in spec:
            continue
        reason = allowed_reason(key, allow_extra)
        (ignored if reason else unexpected).append((key, reason))
    mismatched = [f"{k}: {tuple(flat[k].shape)}, expected {spec[k].shape}"
                  for k in spec if k in flat and tuple(flat[k].shape) != spec[k].shape]
    not_float = [f"{k}: {flat[k].dtype}" for k in spec
                 if k in flat and not np.issubdtype(flat[k].dtype, np.floating)
                 and flat[k].dtype.name != "bfloat16"]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): " + ", ".join(k for k, _ in unexpected)
            + " — not part of this layout; if they are safe to drop, whitelist them with a "
            "reason (allow_extra={REGEX: REASON}; CLI --allow-extra REGEX=REASON)")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
    if not_float:
        problems.append("non-floating tensors: " + "; ".join(not_float))
    if problems:
        raise ConversionError(f"cannot import the checkpoint as {layout} ({describe(dims)}):"
                              "\n  " + "\n  ".join(problems))
    for key, reason in ignored:
        notes.append(f"ignored {key}: {reason}")
    casts: collections.Counter[str] = collections.Counter()
    out = {}
    for key, entry in spec.items():
        value = entry.convert(flat[key])
        if value.dtype != dtype:
            casts[str(value.dtype)] += 1
        out[entry.ours] = np.array(value, dtype=dtype, order="C")  # keeps 0-d arrays 0-d
    for source_dtype, count in sorted(casts.items()):
        notes.append(f"{count} tensor(s) cast {source_dtype} -> {np.dtype(dtype).name}")
    return out


def in_proj_part(w: np.ndarray, index: int, k: int, p: int) -> np.ndarray:
    """Block `index` (q, k, v) of a torch in_proj / qkv weight (3w, w) or bias (3w,), in our
    layout: (w, K, p) or (K, p), w = K·p."""
    width = k * p
    block = w[index * width:(index + 1) * width]
    return block.T.reshape(width, k, p) if block.ndim == 2 else block.reshape(k, p)


# --- sizes read off the shapes -------------------------------------------------------------

def vote(flat: Mapping[str, np.ndarray], probes: list[tuple[str, Callable[[tuple], Any]]],
         what: str, layout: str) -> Any:
    """The most common value `probe(shape)` over the probe keys present (ties: the first)."""
    values = []
    for key, probe in probes:
        if key in flat:
            try:
                value = probe(tuple(flat[key].shape))
            except (IndexError, ValueError):
                continue
            if value is not None:
                values.append(value)
    if not values:
        keys = ", ".join(k for k, _ in probes)
        sample = ", ".join(sorted(flat)[:12]) + (" ..." if len(flat) > 12 else "")
        raise ConversionError(f"cannot read the {what} of a {layout} checkpoint: none of "
                              f"{keys} is present with a usable shape (the checkpoint has "
                              f"{len(flat)} keys: {sample})")
    counts = collections.Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def closest_size(table: Mapping[str, tuple], values: Mapping[str, int], size: str | None = None,
                 *, default: str | None = None) -> tuple[str, dict[str, int]]:
    """(size key of a registry size `table`, overrides) for a checkpoint of these `values`
    (field → value, in the order of the table's tuples, width first): `size` when a name hint
    gives it, else the size that all values match, else the first of that width, else
    `default` (the table's first size); the overrides are the values that differ from it."""
    want = tuple(values.values())
    if size is None:
        exact = [k for k, dims in table.items() if dims[:len(want)] == want]
        same_width = [k for k, dims in table.items() if dims[0] == want[0]]
        size = (exact or same_width or [default or next(iter(table))])[0]
    overrides = {field: v for (field, v), base in zip(values.items(), table[size][:len(want)],
                                                      strict=True) if v != base}
    return size, overrides


def size_label(table: Mapping[str, tuple], size: str) -> str:
    """The size key as a registry name spells it: lower case unless another key differs from
    it only by case."""
    lower = [k for k in table if k.lower() == size.lower()]
    return size.lower() if len(lower) == 1 else size


def layer_count(flat: Mapping[str, np.ndarray], pattern: str, layout: str) -> int:
    """1 + the largest layer index that `pattern`'s first group captures at a key's start."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in flat if (m := rx.match(k))}
    if not found:
        raise ConversionError(f"no layers found in the {layout} checkpoint (no key matches "
                              f"{pattern!r})")
    return max(found) + 1


def grid_side(rows: int, what: str) -> int:
    """The side of a square grid of `rows` patches."""
    side = math.isqrt(rows)
    if side * side != rows:
        raise ConversionError(f"{what}: {rows} patch rows are not a square grid")
    return side


# --- checks against the model ----------------------------------------------------------------

def check_against_model(imported: Imported) -> None:
    """Raise ConversionError unless `imported.params` has exactly the model's paths and shapes."""
    check_params_fit(lambda: models.create(imported.name, **imported.overrides),
                     imported.params, f"{imported.name} {imported.overrides}")


def check_params_fit(make: Callable[[], nnx.Module], params: Mapping[str, Any],
                     what: str) -> None:
    """Raise ConversionError unless `params` has exactly the paths and shapes of `make()`'s."""
    abstract = nnx.eval_shape(make)
    # compared layer by layer, so that a message names 'encoder/layers/3/sparse/D'
    want = {k: tuple(v.shape) for k, v in layer_stack.unstack_flat(
        models.flat_params(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))).items()}
    have = {k: tuple(np.shape(v)) for k, v in
            layer_stack.unstack_flat(models.flat_params(params)).items()}
    problems = [f"{k}: missing" for k in want if k not in have]
    problems += [f"{k}: not a model parameter" for k in have if k not in want]
    problems += [f"{k}: {have[k]} vs model {want[k]}" for k in want
                 if k in have and have[k] != want[k]]
    if problems:
        raise ConversionError(f"the converted parameters do not fit {what}: "
                              + "; ".join(problems))


def resize_imported(imported: Imported, *, image_size: int | None = None,
                    patch_size: int | None = None) -> Imported:
    """Carry an import to another image size (the learned position table resized in 2-D, the
    cls row kept apart) and/or patch size (the conv stem kernel PI-resized, FlexiViT); see
    `crate_jax.models.resize`. The CRATE linear stem cannot change its patch size."""
    cfg = imported.config()
    new_patch = cfg.patch_size if patch_size is None else int(patch_size)
    new_image = cfg.image_size if image_size is None else int(image_size)
    if (new_patch, new_image) == (cfg.patch_size, cfg.image_size):
        return imported
    if new_patch <= 0 or new_image <= 0 or new_image % new_patch:
        raise ConversionError(f"image size {new_image} is not a positive multiple of the patch "
                              f"size {new_patch}")
    notes = list(imported.notes)
    params = jax.tree.map(lambda x: x, imported.params)  # a copy of the containers
    if new_patch != cfg.patch_size:
        if cfg.patch_stem == "linear":
            raise ConversionError(
                f"cannot change the patch size of a CRATE checkpoint ({cfg.patch_size} -> "
                f"{new_patch}): its linear stem normalises the flattened P*P*C patch vector, "
                "which has no resized equivalent")
        kernel = params["stem"]["kernel"]
        params["stem"]["kernel"] = np.asarray(resize_patch_kernel(kernel, new_patch))
        notes.append(f"stem/kernel resized {cfg.patch_size}x{cfg.patch_size} -> "
                     f"{new_patch}x{new_patch} (FlexiViT pseudo-inverse)")
    old_grid, new_grid = cfg.grid, (new_image // new_patch,) * 2
    if new_grid != old_grid and cfg.posemb == "learn":
        table = params["posemb"]["embedding"]
        params["posemb"]["embedding"] = np.asarray(resize_posemb(table, new_grid,
                                                                 old_grid=old_grid))
        notes.append(f"posemb/embedding resized {old_grid[0]}x{old_grid[1]} -> "
                     f"{new_grid[0]}x{new_grid[1]} (bilinear, 2-D, cls row kept)")
    name = f"{imported.name.rsplit('/', 1)[0]}/{new_patch}"
    overrides = {**imported.overrides, "image_size": new_image}
    resized = Imported(name, overrides, params, tuple(notes))
    check_against_model(resized)
    return resized
