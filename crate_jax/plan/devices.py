"""The planner's inputs: sizes, meshes, TPU slices, and the fake CPU devices it compiles for
(set before jax starts its backends)."""

from __future__ import annotations

import math
import os
import re
import sys

# From the jax-free module: jax must not be imported before start_fake_devices.
from crate_jax.mesh_axes import BATCH_AXES, MESH_AXES

REMAT_ORDER = ("none", "minimal", "dots", "full")  # lighter (faster) → heavier (less memory)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Cloud TPU generations: (TensorCores per chip in the type name, HBM per chip in GiB).
# JAX sees one device per chip (v4 and v5p: the two cores of a chip form one megacore device).
_TPU = {"v4": (2, 32), "v5p": (2, 95), "v5litepod": (1, 16), "v5e": (1, 16), "v6e": (1, 32)}


def data_parallel(mesh: dict[str, int]) -> int:
    """The devices the batch is split over: dcn × data × fsdp (BATCH_AXES)."""
    return math.prod(mesh.get(axis, 1) for axis in BATCH_AXES)


class PlanError(ValueError):
    """A bad flag: the message names it."""


# --- flags -----------------------------------------------------------------------------------

def parse_bytes(text: str, flag: str = "--device-memory") -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS | {"": 1}:
        raise PlanError(f"{flag}={text!r}: expected a size such as 32GiB, 16GB or 800MiB "
                        f"(units {', '.join(sorted(_UNITS))})")
    return int(float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1))


def parse_mesh(text: str) -> dict[str, int]:
    """'data:16,fsdp:16' → {'data': 16, 'fsdp': 16} (':' or '=' between axis and size);
    'dcn:2,fsdp:32' → {'dcn': 2, 'fsdp': 32}: 2 slices of 32 devices."""
    shape: dict[str, int] = {}
    for item in filter(None, (text or "").replace(" ", "").split(",")):
        name, sep, size = item.replace("=", ":").partition(":")
        if not sep or name not in MESH_AXES or not re.fullmatch(r"-?[0-9]+", size):
            raise PlanError(f"--mesh={text!r}: expected AXIS:SIZE[,AXIS:SIZE...] with axes "
                            f"{', '.join(MESH_AXES)} and integer sizes, e.g. fsdp:64, "
                            f"data:16,fsdp:16 or dcn:2,fsdp:32 (bad item {item!r})")
        if name in shape:
            raise PlanError(f"--mesh={text!r}: axis {name!r} given twice")
        shape[name] = int(size)
        if shape[name] == 0 or shape[name] < -1:
            raise PlanError(f"--mesh={text!r}: sizes must be positive or -1, got {item!r}")
    if not shape:
        raise PlanError(f"--mesh={text!r}: empty; e.g. --mesh=fsdp:64")
    if list(shape.values()).count(-1) > 1:
        raise PlanError(f"--mesh={text!r}: at most one axis may be -1")
    return shape


def tpu_devices(accelerator: str) -> tuple[int, int]:
    """'v4-64' → (32 devices, 32 GiB each)."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-([0-9]+)", accelerator or "")
    if not m:
        raise PlanError(f"--accelerator={accelerator!r}: expected a Cloud TPU type such as "
                        "v4-64, v5litepod-64, v5p-128 or v6e-256")
    cores, hbm = _TPU[m.group(1)]
    count = int(m.group(2))
    if count % cores:
        raise PlanError(f"--accelerator={accelerator!r}: {m.group(1)} types count "
                        f"{cores} TensorCores per chip")
    return count // cores, hbm * 2**30


def resolve_meshes(meshes: list[dict[str, int]], devices: int | None, texts: list[str], *,
                   source: str | None = None) -> tuple[list[dict[str, int]], int]:
    """Fill in -1 and check every mesh against the device count (given, or the largest mesh).
    `source` is the flag that gave the count ('--devices=32', '--accelerator=v4-64'; None:
    the largest mesh set it). Each mesh comes back with every axis of MESH_AXES, dcn first
    (1 where not given)."""
    if devices is None:
        fixed = [m for m in meshes if -1 not in m.values()]
        if not fixed:
            raise PlanError(f"--mesh={texts[0]!r} has a -1 axis: give --devices or "
                            "--accelerator to say how many devices there are")
        devices = max(math.prod(m.values()) for m in fixed)
    out = []
    for shape, text in zip(meshes, texts, strict=True):
        known = math.prod(v for v in shape.values() if v != -1)
        if -1 in shape.values():
            if devices % known:
                raise PlanError(f"--mesh={text!r}: {known} does not divide the {devices} devices")
            shape = {k: (devices // known if v == -1 else v) for k, v in shape.items()}
        elif known != devices and source is not None:
            raise PlanError(f"--mesh={text!r} has {known} devices, but {source} gives "
                            f"{devices}" + (" (JAX sees one device per TPU chip; v4 and v5p "
                                            "type names count 2 TensorCores per chip)"
                                            if source.startswith("--accelerator") else ""))
        out.append({axis: int(shape.get(axis, 1)) for axis in MESH_AXES})
    return out, devices


OOM = re.compile(r"HLO temporaries \(([0-9.]+[KMGT]?)\) exceeds available HBM "
                  r"\(([0-9.]+[KMGT]?)\)")


def hbm_size(text: str) -> int:
    """'93.00G' → bytes (the TPU compiler's binary units)."""
    unit = text[-1] if text[-1] in "KMGT" else ""
    number = float(text[:-1] if unit else text)
    return int(number * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


# TPU types: the topology the TPU compiler is given (chips per axis), and the chip config.
def tpu_topology(accelerator: str) -> tuple[str, str]:
    """'v4-64' → ('v4:2x4x4', 'megacore'): 32 chips, each one device."""
    chips, _ = tpu_devices(accelerator)
    generation = accelerator.split("-")[0]
    if chips & (chips - 1):
        raise PlanError(f"--accelerator={accelerator}: --target=tpu knows power-of-two slices")
    if generation in ("v4", "v5p"):
        dims = [1, 1, 1]
    else:
        dims = [1, 1]
    while math.prod(dims) < chips:
        dims[dims.index(min(dims))] *= 2
    name = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}[generation]
    return (f"{name}:{'x'.join(str(d) for d in sorted(dims))}",
            "megacore" if len(dims) == 3 else "default")


def tpu_target_devices(accelerator: str) -> list:
    """The devices of a TPU slice, for ahead-of-time compilation on this (TPU-less) machine."""
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("--target=tpu needs libtpu, the TPU compiler: pip install 'jax[tpu]' "
                        "(no TPU is needed to compile)")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jax.experimental import topologies
    name, chip_config = tpu_topology(accelerator)
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             chip_config_name=chip_config).devices)


def _backends_initialised() -> bool:
    from jax._src import xla_bridge  # no public equivalent: jax.devices() would initialise
    return xla_bridge.backends_are_initialized()


def start_fake_devices(count: int, fast: bool) -> None:
    """XLA flags for `count` CPU devices; must run before jax initialises its backends."""
    # Importing jax (which orbax, etils and grain do) is harmless; only initialised backends
    # have fixed their device count.
    if "jax" in sys.modules and _backends_initialised():
        import jax
        if jax.device_count() >= count and jax.default_backend() == "cpu":
            return
        raise PlanError(f"jax is already initialised with {jax.device_count()} devices; run "
                        "the planner as its own process (python -m crate_jax.plan ...)")
    flags_ = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                    os.environ.get("XLA_FLAGS", ""))
    flags_ += f" --xla_force_host_platform_device_count={count}"
    if fast and "xla_backend_optimization_level" not in flags_:
        flags_ += " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags_.strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
