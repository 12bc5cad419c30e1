"""Logical axis names → mesh axes (MaxText-style rules), and global batches.

Every model parameter names its axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `classes`); the
rules below say which mesh axis each name is split over. With the defaults, parameters and
optimizer state are sharded FSDP-style over `fsdp` along their `embed` axis, and tensor-parallel
over `tensor` along heads and MLP/dictionary columns. A dimension that its mesh axes do not
divide is replicated instead (a 10-class head on 4 tensor shards, say).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical axis → mesh axis, tuple of mesh axes, or None (replicated)
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "classes": "tensor",
}


def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_spec(axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh,
                 rules: Mapping[str, Any] = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` whose dimensions carry logical names `axes`.

    A mesh axis is used at most once per array; a dimension not divisible by the product of
    its mesh axes' sizes is replicated.
    """
    if axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in rules:
            raise ValueError(f"sharding rules: no rule for logical axis {name!r}; "
                             f"rules cover {sorted(rules)}")
        mesh_axes = tuple(a for a in _as_tuple(rules.get(name) if name else None)
                          if a not in used and mesh.shape[a] > 1)
        if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
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


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel mesh axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(_as_tuple(rules["batch"])))


def data_parallel_size(mesh: Mesh, rules: Mapping[str, Any] = DEFAULT_RULES) -> int:
    return math.prod(mesh.shape[a] for a in _as_tuple(rules["batch"]))


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                         rules: Mapping[str, Any] = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Assemble each process's local batch into one global array per key (the process-local
    rows become this process's shards of the batch axis)."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
