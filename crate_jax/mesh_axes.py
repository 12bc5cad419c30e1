"""The device mesh's axis names and the axes the batch is split over, without jax.

crate_jax.parallel builds meshes and shardings from these; the planner (crate_jax.plan) parses
--mesh and counts data-parallel devices with them before jax is imported: it sets XLA_FLAGS and
JAX_PLATFORMS first, which jax reads when it is imported, and crate_jax/parallel/__init__.py
imports jax. Hence this module lives outside that package and imports nothing.
"""

# dcn: TPU slices (multi-slice); data: replicated parameters; fsdp: sharded parameters;
# tensor: heads and MLP columns split (crate_jax/parallel/mesh.py says more).
MESH_AXES: tuple[str, ...] = ("dcn", "data", "fsdp", "tensor")
# The mesh axes the leading (batch) axis is split over: DEFAULT_RULES["batch"].
BATCH_AXES: tuple[str, ...] = ("dcn", "data", "fsdp")
