"""Device meshes, logical-axis sharding rules, and global arrays from host-local batches."""

from crate_jax.parallel.mesh import MESH_AXES, make_mesh, maybe_initialize_distributed
from crate_jax.parallel.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    format_undivided,
    host_batch_to_global,
    logical_spec,
    param_shardings,
    replicated,
    undivided_parameters,
)

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "batch_sharding", "format_undivided", "host_batch_to_global",
    "logical_spec", "make_mesh", "maybe_initialize_distributed", "param_shardings", "replicated",
    "undivided_parameters",
]
