"""The device mesh: axes data × fsdp × tensor, sizes from the config, -1 meaning "the rest".

    data    pure data parallelism: parameters replicated across it
    fsdp    data parallelism with parameters and optimizer state sharded across it (ZeRO-3)
    tensor  tensor parallelism: heads and MLP / dictionary columns split across it
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for MESH_AXES; one axis may be -1 (all remaining devices); missing axes are 1."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axes {unknown}; the axes are {list(MESH_AXES)}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(shape)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {dict(shape)} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes, strict=True))} needs "
                         f"{math.prod(sizes)} devices, but {num_devices} are available")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all of them, every process) with axes MESH_AXES."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    if len(devices) == len(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                             devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                  "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


_initialized = False


def maybe_initialize_distributed() -> bool:
    """Call jax.distributed.initialize when this process is one of several (a TPU pod slice,
    SLURM, Open MPI, or an explicit JAX_COORDINATOR_ADDRESS). Returns whether it did (now or
    in an earlier call: calling it twice is harmless).
    CRATE_DISTRIBUTED=1 always calls it (a Cloud TPU VM slice, whose workers jax finds on the
    metadata server; launch/tpu/run.sh sets it), CRATE_DISTRIBUTED=0 never."""
    global _initialized
    if _initialized:
        return True
    forced = os.environ.get("CRATE_DISTRIBUTED", "")
    if forced == "0":
        return False
    if forced != "1":
        if not any(os.environ.get(k) for k in _MULTIHOST_ENV):
            return False
        if os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") in ("", "localhost") and not any(
                os.environ.get(k) for k in _MULTIHOST_ENV if k != "TPU_WORKER_HOSTNAMES"):
            return False  # a single-host TPU VM
        if (os.environ.get("SLURM_JOB_ID") and not os.environ.get("JAX_COORDINATOR_ADDRESS")
                and int(os.environ.get("SLURM_NTASKS", "1")) <= 1):
            return False  # one SLURM task (an explicit coordinator wins: multiprocess.sh)
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]) if os.environ.get(
                          "JAX_NUM_PROCESSES") else None,
                      process_id=int(os.environ["JAX_PROCESS_ID"]) if os.environ.get(
                          "JAX_PROCESS_ID") else None)
    jax.distributed.initialize(**kwargs)
    _initialized = True
    return True


def process_files_suffix() -> str:
    """'{index}-of-{count}': names the files each process writes for itself."""
    return f"{jax.process_index()}-of-{jax.process_count()}"
