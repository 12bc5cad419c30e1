"""The device mesh: axes dcn × data × fsdp × tensor, sizes from the config, -1 meaning "the rest".

    dcn     data parallelism across TPU slices joined by the data-centre network (multi-slice):
            parameters replicated across it, so the slow network carries the gradients'
            all-reduce (and batch-wide gathers such as the contrastive loss's embeddings),
            never FSDP's parameter gathers, which stay on a slice's ICI
    data    pure data parallelism: parameters replicated across it
    fsdp    data parallelism with parameters and optimizer state sharded across it (ZeRO-3)
    tensor  tensor parallelism: heads and MLP / dictionary columns split across it

The batch is split over dcn × data × fsdp (crate_jax.parallel.sharding.DEFAULT_RULES).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

# The names live in a jax-free module: the planner reads them before jax is imported.
from crate_jax.mesh_axes import MESH_AXES

# jax.make_mesh splits physical axes on these TPU kinds; so does our hybrid mesh
_SPLIT_PHYSICAL_KINDS = ("TPU v5 lite", "TPU v5e")


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
    """A mesh over `devices` (default: all of them, every process) with axes MESH_AXES.

    On TPU, and on devices spread over several slices (their `slice_index`: multi-slice TPU,
    GPUs on several hosts), the mesh is jax's hybrid mesh: each slice an ICI mesh
    (1, data, fsdp, tensor), the slices stacked along dcn, so dcn must equal the number of
    slices. Elsewhere (CPU, one GPU host: no slice structure) dcn > 1 is a plain reshape of
    the devices in their order, dcn the outermost, slowest-varying axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = _slice_count(devices)
    if slices is not None and (slices > 1 or sizes[0] > 1):
        return Mesh(_hybrid_devices(sizes, devices, slices), MESH_AXES, axis_types=axis_types)
    if sizes[0] == 1 and len(devices) == len(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (ICI rings on TPU).
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def _slice_count(devices: Sequence[jax.Device]) -> int | None:
    """How many slices the devices span (their slice_index), None when that says nothing:
    no slice_index (CPU), or one slice of a platform other than TPU (one GPU host).

    GPUs of a multi-process run: XLA's global topology gives every device of one host (one
    /proc boot id) the same slice_index and each further host the next one, unless every
    process sets it (jax.distributed.initialize(partition_index=...) or JAX_PARTITION_INDEX)
    (xla/pjrt/distributed/topology_util.cc, BuildGlobalTopology). So N GPU nodes are N slices
    and need mesh.dcn=N (launch/gpu/slurm.sbatch sets it); processes sharing a host share one.
    """
    if not all(hasattr(d, "slice_index") for d in devices):
        return None
    slices = len({d.slice_index for d in devices})
    return None if slices == 1 and devices[0].platform != "tpu" else slices


def _hybrid_devices(sizes: tuple[int, ...], devices: Sequence[jax.Device],
                    slices: int) -> np.ndarray:
    """The device array of a multi-slice mesh: ICI shape (1, data, fsdp, tensor) within each
    slice, DCN shape (dcn, 1, 1, 1) across them."""
    dcn, *ici = sizes
    if dcn != slices:
        raise ValueError(f"mesh.dcn={dcn}, but the {len(devices)} devices span {slices} "
                         f"slice(s) (their slice_index): set mesh.dcn={slices}, one entry "
                         "per slice")
    return mesh_utils.create_hybrid_device_mesh(
        (1, *ici), (dcn, 1, 1, 1), devices,
        allow_split_physical_axes=devices[0].device_kind in _SPLIT_PHYSICAL_KINDS)


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
