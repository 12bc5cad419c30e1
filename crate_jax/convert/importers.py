"""Importers: released CRATE / CRATE-α checkpoints → our parameter tree (docs/design.md §3).

Three source layouts:

    'crate-torch'        CRATE PyTorch state_dict (T/S/B/L), linear stem, Linear weights (out, in)
    'crate-alpha-torch'  CRATE-α PyTorch port: conv1 (d, C, P, P), head LN with eps 1e-5
    'crate-alpha-npz'    CRATE-α big_vision .npz, '/'-joined keys, proj (d, K, p), out (K, p, d)

(the two-tower 'crate-alpha-clipa-torch' and the masked autoencoder 'crate-mae-torch' have
their own modules, convert/clipa.py and convert/crate_mae.py; `convert.layouts.import_weights`
reads every layout).

Each importer reads the model size off the tensor shapes — width (a vote over the tensors that
carry it, so that one wrong tensor is reported rather than believed), depth (the layer indices),
patch size and channels (the stem), image size (the position-table rows, a square grid), number
of classes (the head; no head at all gives num_classes=0), the overcomplete ratio (D's columns) —
and returns `Imported(name, overrides, params, notes)`, which unpacks as
`name, overrides, params = ...` with `models.create(name, **overrides)` the model these params
belong to.

Heads. The big_vision layout stores them ((d, K, p) projection). The PyTorch layouts do not (qkv
is (d, d)), so heads come from, in this order: the `heads` argument (CLI --heads); the size of a
registry `name` given as a hint (e.g. 'crate-b'); a file's safetensors metadata 'heads' (written
by our exporter); the standard size table of the family by width (CRATE 384→6, 576→12, 768→12,
1024→16; CRATE-α 192→3, 576→12, 768→12, 1024→16, 1280/1408/1664/1792→16). A width outside the
table without any of these is an error that says to pass heads.

Nothing is dropped silently: every source key must be consumed, be absent-but-optional in a
recognised way (stem bias, head, learned position table), or be whitelisted by a regular
expression with a reason (`allow_extra={'.*num_batches_tracked': 'BatchNorm counters'}`);
otherwise the error lists every missing key, unexpected key and shape mismatch at once.
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
from crate_jax.models.registry import VISION_SIZES
from crate_jax.models.resize import resize_patch_kernel, resize_posemb

__all__ = [
    "FORMATS", "ConversionError", "Entry", "Imported", "apply_spec", "check_against_model",
    "flatten_source",
    "import_crate_alpha_npz", "import_crate_alpha_torch", "import_crate_torch",
    "resize_imported",
]

FORMATS = ("crate-torch", "crate-alpha-torch", "crate-alpha-npz", "crate-alpha-clipa-torch",
           "crate-mae-torch", "dino-vit-torch", "tost-torch", "tost-gpt-torch")
FAMILY_OF = {"crate": "crate", "crate_alpha": "crate-alpha"}
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


_Entry = Entry  # the name this module and convert/clipa.py use


def _allowed(key: str, allow_extra: Mapping[str, str]) -> str | None:
    for pattern, reason in allow_extra.items():
        if re.fullmatch(pattern, key):
            return reason
    return None


def _nest(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{'encoder/layers/0/attn/proj': x, ...} (the converters' per-layer name maps) → the
    model's nested, stacked layout {'encoder': {'layers': {'attn': {'proj': (L, ...)}}}}."""
    return layer_stack.stack_layers(layer_stack.nest(flat))


def _describe(dims: Mapping[str, Any]) -> str:
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
        reason = _allowed(key, allow_extra)
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
        raise ConversionError(f"cannot import the checkpoint as {layout} ({_describe(dims)}):"
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


def _vote(flat: Mapping[str, np.ndarray], probes: list[tuple[str, Callable[[tuple], Any]]],
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


_apply = apply_spec  # the name this module and convert/clipa.py use


def _layer_count(flat: Mapping[str, np.ndarray], pattern: str, layout: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in flat if (m := rx.match(k))}
    if not found:
        raise ConversionError(f"no layers found in the {layout} checkpoint (no key matches "
                              f"{pattern!r})")
    return max(found) + 1


def _grid_side(rows: int, what: str) -> int:
    side = math.isqrt(rows)
    if side * side != rows:
        raise ConversionError(f"{what}: {rows} patch rows are not a square grid")
    return side


def _size_label(block: str, size: str) -> str:
    table = VISION_SIZES[block]
    lower = [k for k in table if k.lower() == size.lower()]
    return size.lower() if len(lower) == 1 else size


def _parse_name_hint(name: str | None, block: str) -> tuple[str | None, int | None]:
    """(size key, patch or None) of a registry name hint like 'crate-b' or 'crate-alpha-l/14'."""
    if name is None:
        return None, None
    match = re.match(r"^(crate-alpha|crate)-([A-Za-z]+)(?:/(\d+))?$", name.strip(), re.I)
    if not match or match[1].lower() != FAMILY_OF[block]:
        raise ConversionError(f"name {name!r} is not a {FAMILY_OF[block]} model name "
                              f"(e.g. '{FAMILY_OF[block]}-b/16')")
    table = VISION_SIZES[block]
    size = match[2]
    if size not in table:
        lower = [k for k in table if k.lower() == size.lower()]
        if len(lower) != 1:
            raise ConversionError(f"name {name!r}: size {size!r} not in {sorted(table)}")
        size = lower[0]
    return size, int(match[3]) if match[3] else None


def _heads(block: str, width: int, heads: int | None, size_hint: str | None,
           metadata_heads: str | None, notes: list[str], layout: str) -> int:
    """The number of heads of a layout that does not store it (see the module docstring)."""
    table = VISION_SIZES[block]
    if heads is not None:
        source = "the heads argument"
    elif size_hint is not None:
        heads, source = table[size_hint][2], f"the name's size {size_hint!r}"
    elif metadata_heads is not None:
        try:
            heads = int(metadata_heads)
        except ValueError as err:
            raise ConversionError(f"file metadata heads={metadata_heads!r} is not an "
                                  "integer") from err
        source = "the file's metadata"
    else:
        by_width = sorted({dims[2] for dims in table.values() if dims[0] == width})
        if len(by_width) != 1:
            standard = ", ".join(f"{d[0]}→{d[2]}" for d in table.values())
            raise ConversionError(
                f"the {layout} layout does not record the number of attention heads and width "
                f"{width} is not a standard {FAMILY_OF[block]} width ({standard}); pass "
                "heads=K (CLI: --heads K)")
        heads, source = by_width[0], f"the standard {FAMILY_OF[block]} size table for width " \
                                     f"{width}"
    if heads <= 0 or width % heads:
        raise ConversionError(f"heads={heads} (from {source}) does not divide width {width}")
    notes.append(f"heads={heads} from {source}")
    return heads


def _name_and_overrides(block: str, width: int, depth: int, heads: int, patch: int,
                        size_hint: str | None) -> tuple[str, dict[str, Any]]:
    """The registry name closest to the checkpoint's size, and the overrides that make it
    exact: the size whose (width, depth, heads) all match, else the one of that width, else the
    smallest of the family with width/depth/heads overridden."""
    table = VISION_SIZES[block]
    size = size_hint
    if size is None:
        exact = [k for k, d in table.items() if d[:3] == (width, depth, heads)]
        same_width = [k for k, d in table.items() if d[0] == width]
        size = (exact or same_width or list(table))[0]
    base = table[size]
    overrides = {k: v for k, v, b in zip(("width", "depth", "heads"), (width, depth, heads),
                                         base[:3], strict=True) if v != b}
    return f"{FAMILY_OF[block]}-{_size_label(block, size)}/{patch}", overrides


def _finish(block: str, layout: str, flat: Mapping[str, np.ndarray], spec: Mapping[str, _Entry],
            dims: dict[str, Any], *, size_hint: str | None, name_patch: int | None,
            overrides: dict[str, Any],
            config_overrides: Mapping[str, Any], allow_extra: Mapping[str, str] | None,
            notes: list[str], image_size: int | None, patch_size: int | None) -> Imported:
    name, size_overrides = _name_and_overrides(block, dims["width"], dims["depth"],
                                               dims["heads"], dims["patch"], size_hint)
    all_overrides = {**size_overrides, **overrides, **dict(config_overrides)}
    try:
        cfg = models.config_for(name, **all_overrides)
    except ValueError as err:
        raise ConversionError(f"the {layout} checkpoint ({_describe(dims)}) does not make a "
                              f"valid model config: {err}") from err
    params = _apply(flat, spec, layout=layout, dims=dims, allow_extra=allow_extra or {},
                    dtype=cfg.storage_dtype, notes=notes)
    imported = Imported(name, all_overrides, _nest(params), tuple(notes))
    check_against_model(imported)
    imported = resize_imported(imported, image_size=image_size, patch_size=patch_size)
    final_patch = imported.config().patch_size
    if name_patch is not None and name_patch != final_patch:
        raise ConversionError(f"the name hint says patch {name_patch} but the model has patch "
                              f"{final_patch} (checkpoint patch {dims['patch']}; pass "
                              "patch_size to resize the stem)")
    return imported


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


# --- the three layouts -----------------------------------------------------------------------

def _t(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).T


def _prepare(source: Mapping[str, Any], sep: str, name: str | None,
             block: str) -> tuple[dict[str, np.ndarray], list[str], tuple[str | None, int | None]]:
    flat, notes = flatten_source(source, sep)
    return flat, notes, _parse_name_hint(name, block)


def _torch_head(flat: dict, layout: str, notes: list[str]) -> tuple[bool, int]:
    """Whether a PyTorch layout has a classifier head, and its class count."""
    has_head = "mlp_head.1.weight" in flat or "mlp_head.1.bias" in flat
    classes = (_vote(flat, [("mlp_head.1.weight", lambda s: s[0]),
                            ("mlp_head.1.bias", lambda s: s[0])], "class count", layout)
               if has_head else 0)
    if not has_head:
        notes.append("no mlp_head.1: imported without a classifier head (num_classes=0)")
    return has_head, classes


def _torch_head_and_mssa(d: int, k: int, p: int, depth: int, classes: int) -> dict:
    """What the CRATE and CRATE-α PyTorch layouts share: the head LayerNorm and Linear, and
    every layer's two LayerNorms and MSSA projections (qkv (d, d) → (d, K, p), to_out →
    (K, p, d))."""
    spec = {"mlp_head.0.weight": _Entry("norm/scale", (d,)),
            "mlp_head.0.bias": _Entry("norm/bias", (d,))}
    if classes:
        spec["mlp_head.1.weight"] = _Entry("head/kernel", (classes, d), _t)
        spec["mlp_head.1.bias"] = _Entry("head/bias", (classes,))
    for i in range(depth):
        t, o = f"transformer.layers.{i}", f"encoder/layers/{i}"
        spec |= {
            f"{t}.0.norm.weight": _Entry(f"{o}/attn/norm/scale", (d,)),
            f"{t}.0.norm.bias": _Entry(f"{o}/attn/norm/bias", (d,)),
            f"{t}.0.fn.qkv.weight": _Entry(f"{o}/attn/proj", (d, d),
                                           lambda w, k=k, p=p: w.T.reshape(-1, k, p)),
            f"{t}.0.fn.to_out.0.weight": _Entry(f"{o}/attn/out", (d, d),
                                                lambda w, k=k, p=p: w.T.reshape(k, p, -1)),
            f"{t}.1.norm.weight": _Entry(f"{o}/sparse/norm/scale", (d,)),
            f"{t}.1.norm.bias": _Entry(f"{o}/sparse/norm/bias", (d,)),
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
    flat, notes, (size_hint, name_patch) = _prepare(source, ".", name, block)
    ln = "transformer.layers.0.0.norm.weight"
    width = _vote(flat, [("cls_token", lambda s: s[-1]), ("pos_embedding", lambda s: s[-1]),
                         ("to_patch_embedding.2.weight", lambda s: s[0]),
                         ("to_patch_embedding.3.weight", lambda s: s[0]),
                         (ln, lambda s: s[0]), ("mlp_head.0.weight", lambda s: s[0])],
                  "width", layout)
    patch_dim = _vote(flat, [("to_patch_embedding.1.weight", lambda s: s[0]),
                             ("to_patch_embedding.2.weight", lambda s: s[1])],
                      "patch dimension", layout)
    patch = math.isqrt(patch_dim // channels)
    if patch * patch * channels != patch_dim:
        raise ConversionError(f"{layout}: the stem's patch dimension {patch_dim} is not "
                              f"P*P*{channels} for any patch size P (channels={channels})")
    rows = _vote(flat, [("pos_embedding", lambda s: s[1])], "position table", layout)
    side = _grid_side(rows - 1, f"{layout} pos_embedding")
    depth = _layer_count(flat, r"transformer\.layers\.(\d+)\.", layout)
    k = _heads(block, width, heads, size_hint, (metadata or {}).get("heads"), notes, layout)
    has_head, classes = _torch_head(flat, layout, notes)
    d, p = width, width // k
    spec = {
        "cls_token": _Entry("cls", (1, 1, d)),
        "pos_embedding": _Entry("posemb/embedding", (1, rows, d)),
        "to_patch_embedding.1.weight": _Entry("stem/norm_in/scale", (patch_dim,)),
        "to_patch_embedding.1.bias": _Entry("stem/norm_in/bias", (patch_dim,)),
        "to_patch_embedding.2.weight": _Entry("stem/proj/kernel", (d, patch_dim), _t),
        "to_patch_embedding.2.bias": _Entry("stem/proj/bias", (d,)),
        "to_patch_embedding.3.weight": _Entry("stem/norm_out/scale", (d,)),
        "to_patch_embedding.3.bias": _Entry("stem/norm_out/bias", (d,)),
    }
    spec |= _torch_head_and_mssa(d, k, p, depth, classes if has_head else 0)
    for i in range(depth):
        t, o = f"transformer.layers.{i}", f"encoder/layers/{i}"
        spec |= {
            f"{t}.0.fn.to_out.0.bias": _Entry(f"{o}/attn/out_bias", (d,)),
            f"{t}.1.fn.weight": _Entry(f"{o}/sparse/weight", (d, d)),
        }
    dims = dict(width=d, depth=depth, heads=k, patch=patch, image=side * patch,
                classes=classes)
    overrides = dict(num_classes=classes, image_size=side * patch)
    if channels != 3:
        overrides["channels"] = channels
    return _finish(block, layout, flat, spec, dims, size_hint=size_hint, name_patch=name_patch,
                   overrides=overrides,
                   config_overrides=config_overrides, allow_extra=allow_extra, notes=notes,
                   image_size=image_size, patch_size=patch_size)


def _ratio(flat: Mapping[str, np.ndarray], layout: str, d: int, depth: int, dkey: str) -> int:
    """The overcomplete ratio C of the (d, C·d) dictionaries."""
    ratio_cols = _vote(flat, [(dkey.format(i=i) + suffix, lambda s: s[1])
                              for i in range(depth) for suffix in ("", "1")],
                       "dictionary size", layout)
    if ratio_cols % d:
        raise ConversionError(f"{layout}: dictionary D has {ratio_cols} columns, not a multiple "
                              f"of the width {d}")
    return ratio_cols // d


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
    flat, notes, (size_hint, name_patch) = _prepare(source, ".", name, block)
    width = _vote(flat, [("cls_token", lambda s: s[-1]), ("pos_embedding", lambda s: s[-1]),
                         ("conv1.weight", lambda s: s[0]), ("conv1.bias", lambda s: s[0]),
                         ("transformer.layers.0.0.norm.weight", lambda s: s[0]),
                         ("mlp_head.0.weight", lambda s: s[0])], "width", layout)
    patch = _vote(flat, [("conv1.weight", lambda s: s[-1])], "patch size", layout)
    chans = _vote(flat, [("conv1.weight", lambda s: s[1])], "input channels", layout)
    rows = _vote(flat, [("pos_embedding", lambda s: s[1])], "position table", layout)
    side = _grid_side(rows - 1, f"{layout} pos_embedding")
    depth = _layer_count(flat, r"transformer\.layers\.(\d+)\.", layout)
    ratio = _ratio(flat, layout, width, depth, "transformer.layers.{i}.1.fn.D")
    k = _heads(block, width, heads, size_hint, (metadata or {}).get("heads"), notes, layout)
    stem_bias = "conv1.bias" in flat
    has_head, classes = _torch_head(flat, layout, notes)
    d, p = width, width // k
    spec = {
        "conv1.weight": _Entry("stem/kernel", (d, chans, patch, patch),
                               lambda w: w.transpose(2, 3, 1, 0)),
        "cls_token": _Entry("cls", (1, 1, d)),
        "pos_embedding": _Entry("posemb/embedding", (1, rows, d)),
    }
    if stem_bias:
        spec["conv1.bias"] = _Entry("stem/bias", (d,))
    spec |= _torch_head_and_mssa(d, k, p, depth, classes if has_head else 0)
    for i in range(depth):
        t, o = f"transformer.layers.{i}", f"encoder/layers/{i}"
        spec |= {
            f"{t}.1.fn.D": _Entry(f"{o}/sparse/D", (d, ratio * d)),
            f"{t}.1.fn.D1": _Entry(f"{o}/sparse/D1", (d, ratio * d)),
        }
    dims = dict(width=d, depth=depth, heads=k, patch=patch, image=side * patch,
                classes=classes)
    overrides: dict[str, Any] = dict(num_classes=classes, image_size=side * patch,
                                     head_norm_eps=TORCH_HEAD_EPS, pool="cls")
    if not stem_bias:
        overrides["stem_bias"] = False
    if ratio != 4:
        overrides["overcomplete_ratio"] = ratio
    if chans != 3:
        overrides["channels"] = chans
    notes.append(f"head LayerNorm eps {TORCH_HEAD_EPS} (the port's mlp_head.0), cls pooling")
    return _finish(block, layout, flat, spec, dims, size_hint=size_hint, name_patch=name_patch,
                   overrides=overrides,
                   config_overrides=config_overrides, allow_extra=allow_extra, notes=notes,
                   image_size=image_size, patch_size=patch_size)


def import_crate_alpha_npz(source: Mapping[str, Any], *, heads: int | None = None,
                           name: str | None = None, image_size: int | None = None,
                           patch_size: int | None = None,
                           allow_extra: Mapping[str, str] | None = None,
                           metadata: Mapping[str, str] | None = None,
                           **config_overrides: Any) -> Imported:
    """A CRATE-α big_vision parameter set ('/'-joined keys, or the nested dict) → our CRATE-α.

    Heads come from the (d, K, p) projection (a `heads` argument must agree). Keys under a
    leading 'params/' are accepted. Without 'pos_embedding' the model uses the fixed 2-D sin-cos
    table (posemb='sincos2d') and `image_size` must be given."""
    del metadata  # the layout records its heads
    layout, block = "crate-alpha-npz", "crate_alpha"
    flat, notes, (size_hint, name_patch) = _prepare(source, "/", name, block)
    prefixed = [k for k in flat if k.startswith("params/")]
    if prefixed:
        for key in prefixed:
            stripped = key[len("params/"):]
            if stripped in flat:
                raise ConversionError(f"{key} and {stripped} both present")
            flat[stripped] = flat.pop(key)
        notes.append(f"stripped the 'params/' prefix from {len(prefixed)} key(s)")
    blk = "Transformer/encoderblock_{i}"
    att = blk + "/MultiHeadDotProductSubspaceAttention_0"
    width = _vote(flat, [("cls", lambda s: s[-1]), ("pos_embedding", lambda s: s[-1]),
                         ("embedding/kernel", lambda s: s[-1]),
                         ("embedding/bias", lambda s: s[0]),
                         (att.format(i=0) + "/proj/kernel", lambda s: s[0]),
                         ("encoder_norm/scale", lambda s: s[0])], "width", layout)
    patch = _vote(flat, [("embedding/kernel", lambda s: s[0])], "patch size", layout)
    chans = _vote(flat, [("embedding/kernel", lambda s: s[2])], "input channels", layout)
    depth = _layer_count(flat, r"Transformer/encoderblock_(\d+)/", layout)
    k = _vote(flat, [(att.format(i=i) + "/proj/kernel", lambda s: s[1]) for i in range(depth)]
              + [(att.format(i=i) + "/out/kernel", lambda s: s[0]) for i in range(depth)],
              "number of heads", layout)
    if heads is not None and heads != k:
        raise ConversionError(f"heads={heads} was given but the checkpoint's projections have "
                              f"{k} heads")
    if k <= 0 or width % k:
        raise ConversionError(f"{layout}: {k} heads do not divide width {width}")
    notes.append(f"heads={k} from the projection kernels")
    ratio = _ratio(flat, layout, width, depth, blk + "/OvercompleteISTABlock_0/D")
    learned = "pos_embedding" in flat
    if learned:
        rows = _vote(flat, [("pos_embedding", lambda s: s[1])], "position table", layout)
        side = _grid_side(rows - 1, f"{layout} pos_embedding")
        image = side * patch
    else:
        if image_size is None:
            raise ConversionError(f"{layout}: the checkpoint has no pos_embedding (a fixed 2-D "
                                  "sin-cos table), so the image size is not recorded; pass "
                                  "image_size (CLI: --image-size)")
        image = image_size
        rows = (image // patch) ** 2 + 1
        notes.append("no pos_embedding: the fixed 2-D sin-cos table (posemb='sincos2d')")
    stem_bias = "embedding/bias" in flat
    has_head = "head/kernel" in flat or "head/bias" in flat
    classes = (_vote(flat, [("head/kernel", lambda s: s[1]), ("head/bias", lambda s: s[0])],
                     "class count", layout) if has_head else 0)
    if not has_head:
        notes.append("no head: imported as an encoder without a classifier (num_classes=0)")
    d, p = width, width // k
    spec = {
        "embedding/kernel": _Entry("stem/kernel", (patch, patch, chans, d)),
        "cls": _Entry("cls", (1, 1, d)),
        "encoder_norm/scale": _Entry("norm/scale", (d,)),
        "encoder_norm/bias": _Entry("norm/bias", (d,)),
    }
    if learned:
        spec["pos_embedding"] = _Entry("posemb/embedding", (1, rows, d))
    if stem_bias:
        spec["embedding/bias"] = _Entry("stem/bias", (d,))
    if has_head:
        spec["head/kernel"] = _Entry("head/kernel", (d, classes))
        spec["head/bias"] = _Entry("head/bias", (classes,))
    for i in range(depth):
        t, a, o = blk.format(i=i), att.format(i=i), f"encoder/layers/{i}"
        spec |= {
            f"{t}/LayerNorm_0/scale": _Entry(f"{o}/attn/norm/scale", (d,)),
            f"{t}/LayerNorm_0/bias": _Entry(f"{o}/attn/norm/bias", (d,)),
            f"{a}/proj/kernel": _Entry(f"{o}/attn/proj", (d, k, p)),
            f"{a}/out/kernel": _Entry(f"{o}/attn/out", (k, p, d)),
            f"{t}/LayerNorm_1/scale": _Entry(f"{o}/sparse/norm/scale", (d,)),
            f"{t}/LayerNorm_1/bias": _Entry(f"{o}/sparse/norm/bias", (d,)),
            f"{t}/OvercompleteISTABlock_0/D": _Entry(f"{o}/sparse/D", (d, ratio * d)),
            f"{t}/OvercompleteISTABlock_0/D1": _Entry(f"{o}/sparse/D1", (d, ratio * d)),
        }
    dims = dict(width=d, depth=depth, heads=k, patch=patch, image=image, classes=classes)
    overrides: dict[str, Any] = dict(num_classes=classes, image_size=image)
    if not learned:
        overrides["posemb"] = "sincos2d"
    if not stem_bias:
        overrides["stem_bias"] = False
    if ratio != 4:
        overrides["overcomplete_ratio"] = ratio
    if chans != 3:
        overrides["channels"] = chans
    return _finish(block, layout, flat, spec, dims, size_hint=size_hint, name_patch=name_patch,
                   overrides=overrides,
                   config_overrides=config_overrides, allow_extra=allow_extra, notes=notes,
                   image_size=image_size if learned else None, patch_size=patch_size)


IMPORTERS: dict[str, Callable[..., Imported]] = {
    "crate-torch": import_crate_torch,
    "crate-alpha-torch": import_crate_alpha_torch,
    "crate-alpha-npz": import_crate_alpha_npz,
}
