"""Carry a pretrained checkpoint to a new resolution or patch size (docs/design.md §4, §5).

Three pieces:

* `resize_posemb` — a learned position table (1, prefix + H·W, d). The prefix (cls) rows are
  kept apart, the H·W patch rows are laid back out as the (H, W, d) grid they index (row-major,
  as `patchify` orders the patches) and resized in 2-D. The reference code instead interpolated
  the flattened sequence, cls row included, in 1-D (docs/design.md §5); that mixes the cls row into
  the first patches and mixes the end of one grid row into the start of the next.

* `resize_patch_kernel` — the (P, P, C, d) convolution stem kernel, by FlexiViT's pseudo-inverse
  resize (Beyer et al. 2023, "FlexiViT: One Model for All Patch Sizes"). Let B ∈ R^{P'²×P²} be
  the matrix of bilinear resizing a P×P patch to P'×P' (vec(resize(x)) = B·vec(x), row-major
  vec). For every input channel c and output feature j the token component is the inner product
  e = ⟨x, w⟩. PI-resize picks

      ŵ = argmin_ŵ ‖Bᵀŵ − w‖₂ (minimum-norm solution)  =  pinv(Bᵀ)·w,

  so that ⟨resize(x), ŵ⟩ = xᵀBᵀŵ = xᵀw = ⟨x, w⟩ for every patch x whenever P' ≥ P (Bᵀ then has
  full row rank and the residual is zero): the upsampled model sees exactly the tokens the old
  one did. When P' < P it is the least-squares best match.

* `adapt_for_finetune` — apply both to a whole parameter dict, against the shapes of a freshly
  initialised target model, checking every other leaf and re-initialising the head.

Resampling conventions: `jax.image.resize`, half-pixel centres (x_old = (x_new + ½)·H/H' − ½,
no corner alignment), with samples outside the grid dropped and the weights renormalised, which
for bilinear is the same as clamping x_old to [0, H − 1].

Antialiasing (which only acts when shrinking): the position table is resized *with* it, so a
shrunk grid averages its neighbourhood instead of point-sampling it; the patch-kernel matrix B is
built *without* it, as FlexiViT does (TF `tf.image.resize(..., 'bilinear')`, antialias off), so
that B is the plain bilinear resize a data pipeline would apply to the patches.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.models import layer_stack

__all__ = ["adapt_for_finetune", "resize_patch_kernel", "resize_posemb"]

POSEMB_METHODS = ("bilinear", "bicubic")
KERNEL_METHODS = ("pi", "bilinear")


# --- position embeddings -------------------------------------------------------------------

def _grid_of(rows: int, grid: tuple[int, int] | None, what: str) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(rows)
        if side * side != rows:
            raise ValueError(f"{what}: {rows} patch rows are not a square grid; pass the grid "
                             f"explicitly")
        return side, side
    grid = (int(grid[0]), int(grid[1]))
    if grid[0] <= 0 or grid[1] <= 0:
        raise ValueError(f"{what}: grid sides must be positive, got {grid}")
    if grid[0] * grid[1] != rows:
        raise ValueError(f"{what}: grid {grid[0]}x{grid[1]} = {grid[0] * grid[1]} cells does not "
                         f"match the {rows} patch rows of the table")
    return grid


def resize_posemb(table: np.ndarray | jax.Array, new_grid: tuple[int, int], *,
                  old_grid: tuple[int, int] | None = None, num_prefix: int = 1,
                  method: str = "bilinear") -> jax.Array:
    """Resize a position table (1, num_prefix + H·W, d) to (1, num_prefix + H'·W', d).

    P = [P_prefix; P_grid]: P_prefix (the cls rows) is returned unchanged, P_grid is reshaped to
    (H, W, d) row-major, resized in 2-D, P'_grid = resize(P_grid, (H', W')), and flattened back.
    Sampling uses half-pixel centres, x_old = (x_new + ½)·H/H' − ½ (the same along W), with
    `method` 'bilinear' or 'bicubic' (Keys, a = −½). Antialiasing is on; it only acts when
    shrinking (it then averages neighbouring cells instead of point-sampling them).

    old_grid defaults to the square grid √(H·W) × √(H·W). A table already at `new_grid` is
    returned unchanged (its exact values). The resize runs in float32 and the result has the
    table's dtype.
    """
    if method not in POSEMB_METHODS:
        raise ValueError(f"method must be one of {list(POSEMB_METHODS)}, got {method!r}")
    table = jnp.asarray(table)
    if table.ndim != 3:
        raise ValueError(f"position table must be (1, prefix + H*W, d), got shape {table.shape}")
    if not 0 <= num_prefix <= table.shape[1]:
        raise ValueError(f"num_prefix={num_prefix} is out of range for {table.shape[1]} rows")
    rows = table.shape[1] - num_prefix
    old = _grid_of(rows, old_grid, "resize_posemb old_grid")
    new = (int(new_grid[0]), int(new_grid[1]))
    if new[0] <= 0 or new[1] <= 0:
        raise ValueError(f"new_grid sides must be positive, got {new_grid}")
    if new == old:
        return table
    return _resize_table(table, old, new, num_prefix, method)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _resize_table(table: jax.Array, old: tuple[int, int], new: tuple[int, int],
                  num_prefix: int, method: str) -> jax.Array:
    batch, _, dim = table.shape
    prefix, cells = table[:, :num_prefix], table[:, num_prefix:]
    grid = cells.reshape(batch, *old, dim).astype(jnp.float32)
    grid = jax.image.resize(grid, (batch, *new, dim), method=method, antialias=True)
    cells = grid.reshape(batch, new[0] * new[1], dim).astype(table.dtype)
    return jnp.concatenate([prefix, cells], axis=1)


# --- patch-embedding kernels -----------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _bilinear_matrix(old: int, new: int) -> np.ndarray:
    """B ∈ R^{new²×old²} with vec(resize(x)) = B·vec(x) for an old×old patch x (row-major vec),
    built column by column by resizing each basis patch with jax.image.resize (no antialias)."""
    resize = jax.jit(lambda basis: jax.image.resize(basis, (old * old, new, new),
                                                    method="bilinear", antialias=False))
    basis = np.eye(old * old, dtype=np.float32).reshape(old * old, old, old)
    # Run the compiled executable directly: concrete even when called under an outer jit.
    resized = resize.lower(basis).compile()(basis)
    mat = np.asarray(resized, dtype=np.float64).reshape(old * old, new * new).T
    mat.setflags(write=False)
    return mat


@functools.lru_cache(maxsize=64)
def _kernel_map(old: int, new: int, method: str) -> np.ndarray:
    """The (new², old²) matrix M with vec(ŵ) = M·vec(w) per (channel, feature)."""
    b = _bilinear_matrix(old, new)
    mat = np.linalg.pinv(b.T) if method == "pi" else b
    mat = mat.astype(np.float32)
    mat.setflags(write=False)
    return mat


def resize_patch_kernel(kernel: np.ndarray | jax.Array, new_patch: int, *,
                        method: str = "pi") -> jax.Array:
    """Resize an HWIO patch kernel (P, P, C, d) to (P', P', C, d), P' = new_patch.

    'pi' (FlexiViT pseudo-inverse resize): with B ∈ R^{P'²×P²} the bilinear resize of a P×P
    patch, ŵ = pinv(Bᵀ)·w per (c, j), i.e. the minimum-norm least-squares solution of Bᵀŵ = w.
    For P' ≥ P this makes ⟨resize(x), ŵ⟩ = ⟨x, w⟩ for every patch x, so the patch embedding of a
    resized image equals the old embedding of the original image; for P' < P it is the closest
    match in the least-squares sense.

    'bilinear': ŵ = B·w, the kernel itself resized like an image (no rescaling), for
    comparison; it changes the embedding's scale by about (P'/P)².

    The same size returns the kernel unchanged. B is built in float64 from the bilinear weights
    and applied in float32; the result has the kernel's dtype. Works under jit (B only depends on
    the static sizes).
    """
    if method not in KERNEL_METHODS:
        raise ValueError(f"method must be one of {list(KERNEL_METHODS)}, got {method!r}")
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"patch kernel must be (P, P, C, d) with a square patch, got shape "
                         f"{kernel.shape}")
    new_patch = int(new_patch)
    if new_patch <= 0:
        raise ValueError(f"new_patch must be positive, got {new_patch}")
    old = kernel.shape[0]
    if new_patch == old:
        return kernel
    return _apply_kernel_map(_kernel_map(old, new_patch, method), kernel)


@jax.jit
def _apply_kernel_map(mat: np.ndarray, kernel: jax.Array) -> jax.Array:
    """vec(ŵ) = M·vec(w) for every (c, j), in float32."""
    side = math.isqrt(mat.shape[0])
    flat = kernel.reshape(kernel.shape[0] * kernel.shape[1], -1).astype(jnp.float32)
    out = jnp.matmul(mat, flat, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(side, side, *kernel.shape[2:]).astype(kernel.dtype)


# --- whole parameter trees ---------------------------------------------------------------------

Path = tuple[Any, ...]


def _join(path: Path) -> str:
    return "/".join(str(k) for k in path)


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _rebuild(tree: Mapping, values: dict[str, Any], prefix: Path = ()) -> dict:
    return {key: (_rebuild(value, values, (*prefix, key)) if isinstance(value, Mapping)
                  else values[_join((*prefix, key))])
            for key, value in tree.items()}


def _is_head(path: str) -> bool:
    return path == "head" or path.startswith("head/")


def _is_posemb(path: str) -> bool:
    return path.endswith("posemb/embedding") or path.split("/")[-1] == "pos_embedding"


def _is_conv_stem(path: str) -> bool:
    return path == "stem/kernel" or path.endswith("/stem/kernel")


def _is_linear_stem(path: str) -> bool:
    parts = path.split("/")
    return any(a == "stem" and b in ("proj", "norm_in") for a, b in itertools.pairwise(parts))


def adapt_for_finetune(source: Mapping, target: Mapping, *, num_prefix: int = 1,
                       reinit_head: bool = True, resize_stem: bool = True,
                       stem_method: str = "pi",
                       posemb_method: str = "bilinear") -> tuple[dict, list[str]]:
    """Fit pretrained parameters `source` to the model whose fresh parameters are `target`.

    Both are pure parameter dicts (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`); leaves
    are matched by their '/'-joined path ('encoder/layers/3/sparse/D'), so `source` may also be
    a flat dict keyed by such paths. `target`'s shapes and dtypes are the truth; its leaves may
    be abstract (jax.ShapeDtypeStruct) except the head's when that is kept. Rules, per leaf:

    * same shape: the source value (cast to the target's dtype if that differs);
    * 'head/*': the target's fresh initialisation when `reinit_head`, or when its shape differs
      from the source's; source head leaves the target lacks are dropped;
    * position tables ('…posemb/embedding' or '…pos_embedding', (1, prefix + N, d)) whose row
      count differs: `resize_posemb` from the source's square grid to the target's, in 2-D;
    * the convolutional stem kernel 'stem/kernel' (P, P, C, d) whose patch differs:
      `resize_patch_kernel(..., method=stem_method)` when `resize_stem`, else an error;
    * the CRATE linear stem ('stem/proj/kernel', 'stem/norm_in/*') cannot change patch size:
      LN over the P·P·C patch vector has no resized equivalent;
    * anything else that differs, a target key the source lacks (head excepted when
      `reinit_head`) or a source key the target lacks (head excepted) is an error. All problems
      are collected and reported together in one ValueError naming every key, before anything
      is resized.

    Returns (params with the target's structure, notes), the notes being one human-readable line
    per change, e.g. 'posemb/embedding resized 7x7 -> 16x16 (bilinear)'.
    """
    if stem_method not in KERNEL_METHODS:
        raise ValueError(f"stem_method must be one of {list(KERNEL_METHODS)}, got "
                         f"{stem_method!r}")
    if posemb_method not in POSEMB_METHODS:
        raise ValueError(f"posemb_method must be one of {list(POSEMB_METHODS)}, got "
                         f"{posemb_method!r}")
    # Matched layer by layer, whichever layout either side has, so that a message names
    # 'encoder/layers/3/sparse/D'; the result has the target's layout.
    stacked = not layer_stack.has_per_layer(target)
    source = layer_stack.unstack_layers(layer_stack.nest(layer_stack.flatten(source)))
    target = layer_stack.unstack_layers(target)
    src, tgt = layer_stack.flatten(source), layer_stack.flatten(target)
    acc = _Adaptation(num_prefix, reinit_head, resize_stem, stem_method, posemb_method)
    for path, fresh in tgt.items():
        _adapt_leaf(acc, path, fresh, src)
    _raise_problems(acc, _source_only(acc, src, tgt))
    for (frm, to), count in acc.casts.items():
        acc.notes.append(f"{count} leaf(s) cast {frm} -> {to}")
    # The resizes run only now, once every key has been checked.
    out = {}
    for path, (value, dtype) in acc.values.items():
        value = value() if isinstance(value, functools.partial) else value
        out[path] = value if dtype is None else jnp.asarray(value, dtype=dtype)
    adapted = _rebuild(target, out)
    return (layer_stack.stack_layers(adapted) if stacked else adapted), acc.notes


@dataclasses.dataclass
class _Adaptation:
    """adapt_for_finetune's options and what it has decided so far: per target path (value,
    dtype to cast to or None), the value maybe a deferred resize; the notes; the problems."""

    num_prefix: int
    reinit_head: bool
    resize_stem: bool
    stem_method: str
    posemb_method: str
    values: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    linear_stem: list[str] = dataclasses.field(default_factory=list)
    casts: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)


def _adapt_leaf(acc: _Adaptation, path: str, fresh: Any, src: dict[str, Any]) -> None:
    """The rules of adapt_for_finetune for the target leaf `path`: the head's fresh init, a
    missing key, a resize of a differing shape, a dtype cast."""
    want = _shape(fresh)
    if _is_head(path):
        if acc.reinit_head:
            acc.values[path] = (fresh, None)
            acc.notes.append(f"{path} re-initialised (target's fresh init, shape {want})")
            return
        if path in src and _shape(src[path]) != want:
            acc.values[path] = (fresh, None)
            acc.notes.append(f"{path} re-initialised: source shape {_shape(src[path])} != "
                             f"target shape {want}")
            return
    if path not in src:
        acc.missing.append(path)
        return
    value = src[path]
    if _shape(value) != want:
        value = _resized(acc, path, value, want)
        if value is None:
            return
    dtype = getattr(fresh, "dtype", None)
    have_dtype = getattr(src[path], "dtype", dtype)
    if dtype is not None and have_dtype != dtype:
        key = (str(have_dtype), str(jnp.dtype(dtype)))
        acc.casts[key] = acc.casts.get(key, 0) + 1
    else:
        dtype = None
    acc.values[path] = (value, dtype)


def _resized(acc: _Adaptation, path: str, value: Any,
             want: tuple[int, ...]) -> functools.partial | None:
    """The deferred resize of a source leaf whose shape differs from the target's `want`: a
    position table to the target's square grid, a convolutional stem kernel to its patch;
    None (with the problem recorded) for any other difference."""
    have = _shape(value)
    if (_is_posemb(path) and len(have) == len(want) == 3 and have[0] == want[0]
            and have[2] == want[2]):
        try:
            old = _grid_of(have[1] - acc.num_prefix, None, f"{path} (source)")
            new = _grid_of(want[1] - acc.num_prefix, None, f"{path} (target)")
        except ValueError as err:
            acc.problems.append(f"{err}")
            return None
        acc.notes.append(f"{path} resized {old[0]}x{old[1]} -> {new[0]}x{new[1]} "
                         f"({acc.posemb_method}, {acc.num_prefix} prefix row(s) kept)")
        return functools.partial(resize_posemb, value, new, old_grid=old,
                                 num_prefix=acc.num_prefix, method=acc.posemb_method)
    if (_is_conv_stem(path) and len(have) == len(want) == 4
            and have[0] == have[1] and want[0] == want[1] and have[2:] == want[2:]):
        if not acc.resize_stem:
            acc.problems.append(f"{path}: patch size differs ({have} -> {want}) and "
                                f"resize_stem=False")
            return None
        acc.notes.append(f"{path} resized {have[0]}x{have[1]} -> {want[0]}x{want[1]} "
                         f"({acc.stem_method})")
        return functools.partial(resize_patch_kernel, value, want[0], method=acc.stem_method)
    if _is_linear_stem(path):
        acc.linear_stem.append(f"{path} {have} -> {want}")
    else:
        acc.mismatched.append(f"{path}: source {have} vs target {want}")
    return None


def _source_only(acc: _Adaptation, src: dict[str, Any], tgt: dict[str, Any]) -> list[str]:
    """The source keys the target lacks that are not the head's (those are dropped, noted)."""
    for path in src:
        if path not in tgt and _is_head(path):
            acc.notes.append(f"{path} dropped (shape {_shape(src[path])}; the target has no "
                             "such key)")
    return [path for path in src if path not in tgt and not _is_head(path)]


def _raise_problems(acc: _Adaptation, unexpected: list[str]) -> None:
    """One ValueError naming every key that cannot be adapted, if there is any."""
    problems = list(acc.problems)
    if acc.linear_stem:
        problems.append(
            "the CRATE linear stem cannot be resized to another patch size: its LayerNorm over "
            "the flattened P*P*C patch vector has no resized equivalent (keep the pretraining "
            "patch size, or use a convolutional stem): " + "; ".join(acc.linear_stem))
    if acc.mismatched:
        problems.append("shape mismatch (source vs target): " + "; ".join(acc.mismatched))
    if acc.missing:
        problems.append("keys in target missing from source: " + ", ".join(acc.missing))
    if unexpected:
        problems.append("keys in source not in target: " + ", ".join(unexpected))
    if problems:
        raise ValueError("cannot adapt the checkpoint to the target model:\n  "
                         + "\n  ".join(problems))
