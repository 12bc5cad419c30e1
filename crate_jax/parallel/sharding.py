"""Logical axis names → mesh axes (MaxText-style rules), and global batches.

Every model parameter names its axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `classes`); the
rules below say which mesh axis each name is split over. With the defaults, parameters and
optimizer state are sharded FSDP-style over `fsdp` along their `embed` axis, and tensor-parallel
over `tensor` along heads and MLP/dictionary columns; the batch is split over every
data-parallel axis, `dcn` (across slices) included, while no parameter is split over `dcn`, so
FSDP's gathers stay within a slice. A dimension that its mesh axes do not divide is replicated
instead (a 10-class head on 4 tensor shards, say): `undivided_parameters` names each one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from crate_jax.mesh_axes import BATCH_AXES

# logical axis → mesh axis, tuple of mesh axes, or None (replicated)
DEFAULT_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "classes": "tensor",
    "layers": None,  # the stacked layers' leading axis (models/encoder.py): never split
}


def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _dimension_axes(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                    rules: Mapping[str, Any]) -> Iterator[tuple[str | None, int, tuple[str, ...],
                                                              bool]]:
    """Per dimension: (logical name, size, the mesh axes of size > 1 its rule names that no
    earlier dimension took, whether their product divides the size). A mesh axis is used at
    most once per array; the rules for `logical_spec` and `undivided_parameters` alike."""
    used: set[str] = set()
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in rules:
            raise ValueError(f"sharding rules: no rule for logical axis {name!r}; "
                             f"rules cover {sorted(rules)}")
        mesh_axes = tuple(a for a in _as_tuple(rules.get(name) if name else None)
                          if a not in used and mesh.shape.get(a, 1) > 1)
        divides = bool(mesh_axes) and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0
        if divides:
            used.update(mesh_axes)
        yield name, size, mesh_axes, divides


def logical_spec(axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh,
                 rules: Mapping[str, Any] = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dimensions carry logical names `axes`.

    A mesh axis is used at most once per array; a dimension not divisible by the product of
    its mesh axes' sizes is replicated. Mesh axes the mesh lacks count as size 1.
    """
    if axes is None:
        return PartitionSpec()
    spec = []
    for _, _, mesh_axes, divides in _dimension_axes(axes, shape, mesh, rules):
        if divides:
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(params_state: nnx.State, mesh: Mesh,
                    rules: Mapping[str, Any] = DEFAULT_RULES) -> dict:
    """NamedShardings for an (abstract) nnx.State of parameters, as the pure nested dict that
    `nnx.to_pure_dict` gives for that state."""
    sharded = jax.tree.map(
        lambda var: var.replace(NamedSharding(mesh, logical_spec(
            var.get_metadata().get("out_sharding"), tuple(var.shape), mesh, rules))),
        params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(sharded)


def undivided_parameters(params_state: nnx.State, mesh: Mesh,
                         rules: Mapping[str, Any] = DEFAULT_RULES) -> list[str]:
    """One line per parameter dimension left replicated because its mesh axes (of size n > 1)
    do not divide it: the '/'-path, the shape, the logical axis, the mesh axes and n, and what
    would shard it. `params_state` is the (abstract) nnx.State of nnx.Params, as for
    `param_shardings`. A dimension whose mesh axes an earlier dimension took is not listed
    (that is the one-use-per-array rule, not a size problem)."""
    lines = []
    for path, var in nnx.to_flat_state(params_state):
        axes = var.get_metadata().get("out_sharding")
        if axes is None:
            continue
        shape = tuple(var.shape)
        for dim, (name, size, mesh_axes, divides) in enumerate(
                _dimension_axes(tuple(axes), shape, mesh, rules)):
            if mesh_axes and not divides:
                lines.append(f"{'/'.join(map(str, path))} {shape}: dim {dim} ({name!r}, {size}) "
                             f"is replicated, {_undivided_hint(size, mesh_axes, mesh)}")
    return lines


def _undivided_hint(size: int, mesh_axes: tuple[str, ...], mesh: Mesh) -> str:
    """'fsdp=8 does not divide it; fsdp:4 would shard it (...), as would a size of 1288'.

    g = gcd(size, n) is the largest mesh size that divides both the dimension and the n
    devices the axes span now (the other n/g go to `data`); ⌈size/n⌉·n the nearest size that
    n divides."""
    n = math.prod(mesh.shape[a] for a in mesh_axes)
    label = "×".join(mesh_axes)
    g, padded = math.gcd(size, n), -(-size // n) * n
    text = f"{label}={n} does not divide it; "
    if g > 1:
        shards = f"{label}:{g}" if len(mesh_axes) == 1 else f"{label} of {g}"
        text += (f"{shards} would shard it (the other {n // g}× on data), as would a size of "
                 f"{padded} (a multiple of {n})")
    else:
        text += f"no mesh size along {label} divides {size}; a size of {padded} would"
    return text


def format_undivided(lines: Sequence[str], limit: int = 10) -> str:
    """One warning paragraph for `undivided_parameters`' lines ('' for none), the first `limit`
    of them in full."""
    if not lines:
        return ""
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return (f"{len(lines)} parameter dimension(s) stay replicated because the mesh does not "
            "divide them (every device holds them whole):\n" + "\n".join(shown))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _mesh_batch_axes(mesh: Mesh, rules: Mapping[str, Any]) -> tuple[str, ...]:
    """The rule's batch axes that this mesh has (all of them for a make_mesh mesh)."""
    return tuple(a for a in _as_tuple(rules["batch"]) if a in mesh.shape)


def split_batch_axes(mesh: Any) -> tuple[str, ...]:
    """The default rule's batch axes that `mesh` (a Mesh, an abstract mesh or None) splits,
    i.e. has with more than one device: what a collective over the batch runs over."""
    if mesh is None or getattr(mesh, "empty", False):
        return ()
    return tuple(a for a in _as_tuple(DEFAULT_RULES["batch"])
                 if a in mesh.shape and mesh.shape[a] > 1)


def constrain_to_batch(x: jax.Array) -> jax.Array:
    """x (B, ...) constrained to be split over the current mesh's batch axes (unchanged
    outside a mesh, or when they do not divide B). Inside a scanned layer the partitioner
    sees one body for all layers; without this it may keep an FSDP-sharded weight in place
    and gather the activations instead (measured: 4.8× the activation memory on fsdp:8),
    the opposite of FSDP."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = split_batch_axes(mesh)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes, *([None] * (x.ndim - 1))))


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel mesh axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(_mesh_batch_axes(mesh, rules)))


def data_parallel_size(mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> int:
    """dcn × data × fsdp with the default rules: how many shards the batch is split into."""
    return math.prod(mesh.shape[a] for a in _mesh_batch_axes(mesh, rules))


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                         rules: Mapping[str, Any] = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Assemble each process's local batch into one global array per key (the process-local
    rows become this process's shards of the batch axis)."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
