"""Will a config fit? Compile its real train step for a device mesh, without the devices.

    python -m crate_jax.plan --config=configs/clipa_h14.py --mesh=fsdp:64
    python -m crate_jax.plan --config=configs/clipa_h14.py --mesh=fsdp:64 --mesh=data:4,fsdp:16 \
        --device-memory=32GiB --batch-size=32768 --max-compiles=4 --json=plan.json
    python -m crate_jax.plan --config=configs/crate_alpha_in21k.py:variant=L/14 \
        --accelerator=v4-64 --mesh=fsdp:-1                 # 32 devices (chips), 32 GiB each
    python -m crate_jax.plan --config=... --accelerator=v4-128 --mesh=fsdp:64 --target=tpu

Nothing is materialised. The planner builds exactly what crate_jax.train.loop builds — the
task, the abstract model, the parameter shardings from the logical-axis rules, the optimizer
and its state shardings, the train step with its in/out shardings and donated state — from
jax.ShapeDtypeStruct only, and compiles the step ahead of time for the mesh. It prints the
parameter count, the model FLOPs and the hardware FLOPs of one step (crate_jax.perf: model
FLOPs = 3 × the forward's, hardware FLOPs = what the compiled step runs, remat's recomputation
included; per device, in total, per example), per-device bytes of parameters, optimizer
state, input batch and temporaries (activations saved for the backward pass, gradients,
gathered weights, workspace), the peak, whether it fits --device-memory less --headroom, and
the compile time.

Targets:
  cpu (default)  as many fake CPU devices as the mesh has (XLA_FLAGS is set here, before jax
                 starts: run the planner as its own process). Works anywhere. It is an
                 estimate: XLA:CPU keeps part of the bf16 intermediates in f32; remat applies
                 inside the layer scan, but the CPU's choices are not the TPU's. Measured
                 before the scan, for CLIPA-H/14 widths (2 layers per tower), fsdp:64, 1,024
                 images per device: CPU 28.6 GiB; TPU v4 31.7 GiB with remat none, 17.5 GiB
                 with remat dots.
  tpu            the TPU compiler itself (libtpu: pip install 'jax[tpu]'; no TPU needed) for
                 the slice of --accelerator: exact memory for that TPU, remat included; it
                 reports a step that exceeds HBM without compiling it. Slower to compile.

The search (bounded by --max-compiles, the first compile included):
  1. remat (tpu target only): when the step does not fit, the heavier policies at the same
     batch (none → dots → full); when it fits, the next lighter one (faster) if it fits too.
  2. micro-batch: a second size per device — half (grad_accum_steps doubled, same global batch
     and update) when nothing fits yet, double when it fits — and a straight line through the
     two peaks predicts the largest micro-batch per device that fits; a compile left over
     checks the predicted grad_accum_steps.
The suggestion is printed as crate_jax.main flags (--config.grad_accum_steps=...,
--config.model.*overrides.remat=...). Confirm on the hardware with the first steps of the run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import TYPE_CHECKING

from absl import app, flags
from ml_collections import config_flags

if TYPE_CHECKING:  # jax starts only after XLA_FLAGS is set (see main)
    from crate_jax.perf import StepFlops

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (Python, get_config(arg)); add ':ARG' to pass an argument. "
    "--config.key=value overrides work as for crate_jax.main.", lock_config=True)
_MESH = flags.DEFINE_multi_string(
    "mesh", None, "Mesh axis sizes, e.g. 'fsdp:64', 'data:16,fsdp:16' or 'dcn:2,fsdp:32' (axes "
    "dcn = TPU slices, data, fsdp, tensor; one may be -1 = the remaining devices). Repeat the "
    "flag to compare meshes.")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "Number of devices (default: from --accelerator, else the mesh sizes).")
_ACCELERATOR = flags.DEFINE_string(
    "accelerator", None, "A Cloud TPU type such as v4-64, v5litepod-64, v5p-128, v6e-256: "
    "gives the device count (JAX sees chips) and the default --device-memory.")
_MEMORY = flags.DEFINE_string(
    "device-memory", None, "Memory per device, e.g. 32GiB (TPU v4), 16GiB (v5e), 95GiB (v5p), "
    "80GB (H100); units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB. Default: from --accelerator, "
    "else 32GiB.")
_HEADROOM = flags.DEFINE_float(
    "headroom", 0.1, "Fraction of --device-memory kept free for the runtime, fragmentation "
    "and compiler differences; the step fits when peak <= (1 - headroom) * memory.")
_BATCH = flags.DEFINE_integer("batch-size", None, "Global batch size (default: the config's).")
_REMAT = flags.DEFINE_enum("remat", None, ["none", "minimal", "dots", "full"],
                           "Per-layer rematerialisation for every tower (default: the config's).")
_ACCUM = flags.DEFINE_integer("grad-accum-steps", None,
                              "Gradient accumulation steps (default: the config's).")
_MAX_COMPILES = flags.DEFINE_integer(
    "max-compiles", 3, "Compiles per mesh, the first included; 1 = no search.")
_FAST = flags.DEFINE_boolean(
    "fast-compile", True, "Compile with --xla_backend_optimization_level=0: the same buffer "
    "assignment and cost analysis, several times faster on CPU.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_TARGET = flags.DEFINE_enum(
    "target", "cpu", ["cpu", "tpu"],
    "cpu: compile for fake CPU devices (works anywhere; XLA:CPU keeps bf16 intermediates partly "
    "in f32, so activations are over-estimated; remat applies inside the layer scan). tpu: "
    "compile for the "
    "real TPU of --accelerator with the TPU compiler (needs libtpu, e.g. pip install "
    "'jax[tpu]'; no TPU needed): exact for that TPU.")

MESH_AXES = ("dcn", "data", "fsdp", "tensor")  # crate_jax.parallel.mesh.MESH_AXES
REMAT_ORDER = ("none", "minimal", "dots", "full")  # lighter (faster) → heavier (less memory)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# Cloud TPU generations: (TensorCores per chip in the type name, HBM per chip in GiB).
# JAX sees one device per chip (v4 and v5p: the two cores of a chip form one megacore device).
_TPU = {"v4": (2, 32), "v5p": (2, 95), "v5litepod": (1, 16), "v5e": (1, 16), "v6e": (1, 32)}


def _data_parallel(mesh: dict[str, int]) -> int:
    """The devices the batch is split over: dcn × data × fsdp."""
    return mesh.get("dcn", 1) * mesh.get("data", 1) * mesh.get("fsdp", 1)


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


def resolve_meshes(meshes: list[dict[str, int]], devices: int | None,
                   texts: list[str]) -> tuple[list[dict[str, int]], int]:
    """Fill in -1 and check every mesh against the device count (given, or the largest mesh).
    Each mesh comes back with every axis of MESH_AXES, dcn first (1 where not given)."""
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
        elif known != devices and (_DEVICES.value is not None or _ACCELERATOR.value):
            source = (f"--devices={_DEVICES.value}" if _DEVICES.value is not None
                      else f"--accelerator={_ACCELERATOR.value}")
            raise PlanError(f"--mesh={text!r} has {known} devices, but {source} gives "
                            f"{devices}" + (" (JAX sees one device per TPU chip; v4 and v5p "
                                            "type names count 2 TensorCores per chip)"
                                            if _ACCELERATOR.value else ""))
        out.append({axis: int(shape.get(axis, 1)) for axis in MESH_AXES})
    return out, devices


_OOM = re.compile(r"HLO temporaries \(([0-9.]+[KMGT]?)\) exceeds available HBM "
                  r"\(([0-9.]+[KMGT]?)\)")


def _size(text: str) -> int:
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


# --- the step --------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    mesh: dict[str, int]
    batch_size: int
    grad_accum_steps: int
    remat: str
    params: int
    param_bytes: int
    opt_bytes: int
    batch_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    peak_bytes: int
    model_flops_per_device: float  # 3 × forward (crate_jax.perf.model_flops)
    hardware_flops_per_device: float  # all the compiled step runs (perf.jaxpr_flops)
    lower_s: float
    compile_s: float
    fits: bool = False
    note: str = ""  # e.g. the TPU compiler's out-of-memory message
    # parameters left replicated because the mesh does not divide them (one line each)
    undivided: list[str] = dataclasses.field(default_factory=list)

    @property
    def per_device_batch(self) -> int:
        return self.batch_size // _data_parallel(self.mesh)

    @property
    def micro_batch(self) -> int:
        return self.per_device_batch // self.grad_accum_steps


def remat_keys(config) -> list[str]:
    """The config keys that hold a tower's model overrides (where `remat` goes)."""
    return [f"model.{k}" for k in config.model.keys()
            if k == "overrides" or k.endswith("_overrides")]


def config_remat(config) -> str:
    from crate_jax.models.config import TowerConfig

    default = TowerConfig.remat  # what a tower without a remat override runs with
    found = {dict(config.model[k.split(".", 1)[1]]).get("remat", default)
             for k in remat_keys(config)}
    return max(found, key=REMAT_ORDER.index) if found else default


def with_settings(config, *, batch_size: int, accum: int, remat: str):
    config = copy.deepcopy(config)
    with config.unlocked():
        config.batch_size = batch_size
        config.grad_accum_steps = accum
        for key in remat_keys(config):
            overrides = dict(config.model[key.split(".", 1)[1]])
            overrides["remat"] = remat
            config.model[key.split(".", 1)[1]] = overrides
    return config


def _shard_bytes(tree) -> int:
    import jax
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _check_plan_batch(config, mesh, mesh_shape: dict[str, int], rules: dict) -> None:
    from crate_jax.parallel.sharding import data_parallel_size

    accum = config.get("grad_accum_steps", 1)
    dp = data_parallel_size(mesh, rules)
    if config.batch_size % (dp * accum):
        raise PlanError(f"--batch-size={config.batch_size} is not divisible by the {dp} "
                        f"data-parallel devices × grad_accum_steps={accum} of mesh "
                        f"{mesh_shape}")


def _base_fields(config, mesh_shape, state) -> dict:
    """The Result fields that the abstract state alone gives."""
    import jax

    params = state.abstract_state["params"]
    return dict(mesh=dict(mesh_shape), batch_size=config.batch_size,
                grad_accum_steps=config.get("grad_accum_steps", 1), remat=config_remat(config),
                params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
                param_bytes=_shard_bytes(params),
                opt_bytes=_shard_bytes(state.abstract_state["opt_state"]),
                batch_bytes=_shard_bytes(state.example_batch()), undivided=state.undivided)


def _measured(fields: dict, compiled, flops: StepFlops, devices: int, lower_s: float,
              compile_s: float) -> Result:
    memory = compiled.memory_analysis()
    args, out = memory.argument_size_in_bytes, memory.output_size_in_bytes
    alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
    # Live at the peak, at most: the inputs, the temporaries and the outputs that do not reuse
    # an input (the donated state is updated in place). XLA:CPU's own peak_memory_in_bytes
    # leaves the temporaries out, so it is not used.
    return Result(**fields, argument_bytes=args, output_bytes=out, alias_bytes=alias,
                  temp_bytes=temp, code_bytes=memory.generated_code_size_in_bytes,
                  peak_bytes=args + temp + out - alias,
                  model_flops_per_device=flops.model / devices,
                  hardware_flops_per_device=flops.hardware / devices,
                  lower_s=lower_s, compile_s=compile_s)


def _out_of_memory(fields: dict, oom, lower_s: float, compile_s: float) -> Result:
    """The Result of a step the TPU compiler refused for its HBM."""
    known = fields["param_bytes"] + fields["opt_bytes"] + fields["batch_bytes"]
    temp = _size(oom.group(1))
    return Result(**fields, argument_bytes=known, output_bytes=0, alias_bytes=0,
                  temp_bytes=temp, code_bytes=0, peak_bytes=known + temp,
                  model_flops_per_device=0.0, hardware_flops_per_device=0.0,
                  lower_s=lower_s, compile_s=compile_s,
                  note=f"the TPU compiler: HLO temporaries need {oom.group(1)}B, "
                       f"{oom.group(2)}B of HBM available")


def compile_step(config, mesh_shape: dict[str, int], devices=None) -> Result:
    """Build the train state and step exactly as crate_jax.train.loop does
    (crate_jax.train.state.build_train_state), from shapes only, and compile the step for
    `mesh_shape` over `devices` (default: the first of jax.devices())."""
    import jax

    from crate_jax import perf
    from crate_jax.parallel import make_mesh
    from crate_jax.train.state import build_train_state

    devices = list(devices or jax.devices())[:math.prod(mesh_shape.values())]
    mesh = make_mesh(mesh_shape, devices=devices)
    state = build_train_state(config, mesh)
    _check_plan_batch(config, mesh, mesh_shape, state.rules)
    fields = _base_fields(config, mesh_shape, state)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        traced = state.trace()
        lowered = traced.lower()
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as e:  # the TPU compiler refuses what does not fit its HBM
            oom = _OOM.search(str(e))
            if not oom:
                raise
            return _out_of_memory(fields, oom, t1 - t0, time.perf_counter() - t1)
        t2 = time.perf_counter()
        flops = perf.StepFlops(model=state.model_flops(),
                               hardware=perf.jaxpr_flops(traced.jaxpr))
    return _measured(fields, compiled, flops, len(devices), t1 - t0, t2 - t1)


# --- the search ------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """What the search found: every compile, the best verified setting, and a prediction."""
    results: list[Result]
    best: Result | None  # the fastest setting with the config's global batch that fits
    largest: Result | None = None  # the largest per-device batch compiled that fits
    predicted: dict | None = None  # from a straight line through two compiles at one remat


def _line(a: Result, b: Result) -> tuple[float, float] | None:
    """peak = fixed + slope × (micro-batch per device), through two compiles at one remat."""
    if a.remat != b.remat or a.micro_batch == b.micro_batch:
        return None
    slope = (b.peak_bytes - a.peak_bytes) / (b.micro_batch - a.micro_batch)
    if slope <= 0:
        return None
    return a.peak_bytes - slope * a.micro_batch, slope


def _faster(a: Result | None, b: Result | None) -> Result | None:
    """The better of two fitting settings: lighter remat first, then fewer micro-batches,
    then the larger batch."""
    fitting = [r for r in (a, b) if r is not None and r.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda r: (REMAT_ORDER.index(r.remat), r.grad_accum_steps,
                                       -r.batch_size))


@dataclasses.dataclass
class _Trials:
    """The compiles of one search, at most `max_compiles`, none repeated."""

    config: object
    mesh_shape: dict[str, int]
    usable: int
    max_compiles: int
    report: object
    devices: object
    results: list = dataclasses.field(default_factory=list)

    def __call__(self, batch_size: int, accum: int, remat: str) -> Result | None:
        dp = _data_parallel(self.mesh_shape)
        if len(self.results) >= self.max_compiles or batch_size % (dp * accum):
            return None
        for r in self.results:
            if (r.batch_size, r.grad_accum_steps, r.remat) == (batch_size, accum, remat):
                return r
        r = compile_step(with_settings(self.config, batch_size=batch_size, accum=accum,
                                       remat=remat), self.mesh_shape, self.devices)
        r.fits = r.peak_bytes <= self.usable and not r.note
        self.results.append(r)
        self.report(r)
        return r


def _search_remat(trial: _Trials, current: Result, best: Result | None):
    """Step 1: heavier policies until one fits, or one lighter when it fits already."""
    batch, accum = current.batch_size, current.grad_accum_steps
    index = REMAT_ORDER.index(current.remat)
    if not current.fits:
        for heavier in REMAT_ORDER[index + 1:]:
            r = trial(batch, accum, heavier)
            if r is None:
                break
            current, best = r, _faster(r, best)
            if r.fits:
                break
    elif index > 0:
        r = trial(batch, accum, REMAT_ORDER[index - 1])
        if r is not None and r.fits:
            current, best = r, _faster(r, best)
    return current, best


def _second_size(trial: _Trials, current: Result, best: Result | None, per_device: int):
    batch, accum, remat = current.batch_size, current.grad_accum_steps, current.remat
    if best is None:  # halve the micro-batch
        return trial(batch, accum * 2, remat) if per_device // accum >= 2 else None
    if accum > 1:  # the same global batch in fewer, larger micro-batches
        return trial(batch, accum // 2, remat)
    return trial(batch * 2, 1, remat)  # a larger per-device batch: reported, not prescribed


def _predict(trial: _Trials, current: Result, second: Result, best: Result | None,
             per_device: int):
    """Step 2's straight line through two peaks: (prediction, best after checking it)."""
    line = _line(current, second)
    if line is None:
        return None, best
    batch, accum, remat = current.batch_size, current.grad_accum_steps, current.remat
    fixed, slope = line
    micro = int((trial.usable - fixed) // slope)
    predicted = {"remat": remat, "fixed_bytes": fixed, "bytes_per_example": slope,
                 "largest_micro_batch": max(micro, 0)}
    if micro >= 1 and best is None:
        k = accum  # the fewest micro-batches (a power of two) whose size fits
        while per_device // k > micro and per_device // k > 1:
            k *= 2
        predicted["grad_accum_steps"] = k
        check = trial(batch, k, remat)
        if check is not None and not check.fits and per_device // k > 1:
            check = trial(batch, k * 2, remat)
        best = _faster(check, best)
    return predicted, best


def search(config, mesh_shape, usable: int, max_compiles: int, report,
           devices=None, remat_search: bool = True) -> Plan:
    """Compile the config as given, then spend the remaining compiles (see the module doc):

    1. remat (when `remat_search`): when it does not fit, the next heavier policies (none →
       dots → full) at the same batch; when it fits, the next lighter one if that fits too.
    2. batch, at the remat from 1: a second micro-batch size per device — half (twice the
       grad_accum_steps) when nothing fits yet, double when it fits — then a straight line
       through the two peaks predicts the largest micro-batch that fits; a compile left over
       checks the prediction.
    `report(result)` is called after every compile."""
    trial = _Trials(config, mesh_shape, usable, max_compiles, report, devices)
    batch = config.batch_size
    current = trial(batch, config.get("grad_accum_steps", 1), config_remat(config))
    best = _faster(current, None)
    if remat_search:
        current, best = _search_remat(trial, current, best)
    per_device = batch // _data_parallel(mesh_shape)
    second = _second_size(trial, current, best, per_device)
    if second is not None and second.batch_size == batch:
        best = _faster(second, best)
    predicted = None
    if second is not None:
        predicted, best = _predict(trial, current, second, best, per_device)
    fitting = [r for r in trial.results if r.fits]
    largest = max(fitting, key=lambda r: r.micro_batch) if fitting else None
    return Plan(trial.results, best, largest, predicted)


# --- report ----------------------------------------------------------------------------------

def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOP"


def _flop_counts(per_device: float, devices: int, r: Result) -> str:
    return (f"{_flops(per_device * devices)} in total, {_flops(per_device)} per device, "
            f"{_flops(per_device * devices / r.batch_size)} per example")


def _setting(r: Result) -> str:
    return (f"batch {r.batch_size:,} ({r.per_device_batch:,} per device, micro-batch "
            f"{r.micro_batch:,} × grad_accum_steps {r.grad_accum_steps}), remat {r.remat}")


def _undivided_text(r: Result) -> str:
    from crate_jax.parallel import format_undivided
    return "  " + format_undivided(r.undivided).replace("\n", "\n  ")


def describe(r: Result, memory: int, usable: int) -> str:
    """The table for one compile."""
    devices = math.prod(r.mesh.values())
    other_args = r.argument_bytes - r.param_bytes - r.opt_bytes - r.batch_bytes
    verdict = "FITS" if r.fits else "DOES NOT FIT"
    return "\n".join([
        f"mesh {_mesh_text(r.mesh)} ({devices} devices): {_setting(r)}",
        f"  parameters            {r.params:,}",
        (f"  model FLOPs per step  {_flop_counts(r.model_flops_per_device, devices, r)}\n"
         "                        (3 × the forward of the global batch; frozen parts once)\n"
         f"  hardware FLOPs        {_flop_counts(r.hardware_flops_per_device, devices, r)}\n"
         "                        (counted on the traced step: forward, backward, remat "
         "recomputation, optimizer)") if not r.note else
        "  FLOPs per step        unknown: the step did not compile",
        f"  compile time          {r.lower_s + r.compile_s:.1f} s (trace + lower "
        f"{r.lower_s:.1f} s, XLA compile {r.compile_s:.1f} s)",
        "  memory per device",
        f"    parameters          {_bytes(r.param_bytes):>12}",
        f"    optimizer state     {_bytes(r.opt_bytes):>12}",
        f"    input batch         {_bytes(r.batch_bytes):>12}",
        f"    other inputs        {_bytes(other_args):>12}   (non-parameter model state)",
        f"    activations (temp)  {_bytes(r.temp_bytes):>12}   (XLA temporaries: activations "
        "saved for the backward pass, gradients, gathered weights, workspace)",
        f"    new outputs         {_bytes(r.output_bytes - r.alias_bytes):>12}   (outputs not "
        "written in place over the donated state)",
        f"    peak                {_bytes(r.peak_bytes):>12}   (inputs + temp + new outputs)",
        f"  device memory         {_bytes(memory):>12}   ({_bytes(usable)} usable with "
        f"{100 * _HEADROOM.value:.0f} % headroom)",
        f"  verdict               {verdict}: peak is {100 * r.peak_bytes / memory:.0f} % of "
        "the device memory" + (f" ({r.note})" if r.note else ""),
    ] + ([_undivided_text(r)] if r.undivided else []))


def _mesh_text(mesh: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in mesh.items() if v > 1) or "1 device"


def suggestion_flags(config, r: Result) -> list[str]:
    """crate_jax.main flags that turn `config` into the setting of `r`."""
    out = []
    if r.batch_size != config.batch_size:
        out.append(f"--config.batch_size={r.batch_size}")
    if r.grad_accum_steps != config.get("grad_accum_steps", 1):
        out.append(f"--config.grad_accum_steps={r.grad_accum_steps}")
    if r.remat != config_remat(config):
        out += [f"--config.{key}.remat={r.remat}" for key in remat_keys(config)]
    return out


def summarize(config, plan: Plan, memory: int) -> str:
    first, best = plan.results[0], plan.best
    lines = []
    if len(plan.results) > 1:
        lines.append("  search (every compile):")
        for r in plan.results:
            lines.append(f"    {_setting(r)}: peak {_bytes(r.peak_bytes)} "
                         f"({'fits' if r.fits else 'does not fit'}), "
                         f"{r.lower_s + r.compile_s:.0f} s")
    if plan.predicted:
        p = plan.predicted
        lines.append(f"  linear fit at remat {p['remat']}: peak ≈ {_bytes(p['fixed_bytes'])} + "
                     f"{_bytes(p['bytes_per_example'])} per example of the per-device "
                     f"micro-batch → largest micro-batch that fits ≈ "
                     f"{p['largest_micro_batch']:,} per device")
    if best is None:
        text = "verdict: DOES NOT FIT, and no setting tried fits"
        if plan.predicted and plan.predicted.get("grad_accum_steps"):
            text += (f"; predicted to fit: --config.grad_accum_steps="
                     f"{plan.predicted['grad_accum_steps']} at remat {plan.predicted['remat']}"
                     " (not compiled: raise --max-compiles to check)")
        else:
            text += ("; raise --max-compiles, add devices or tensor parallelism "
                     "(--mesh=fsdp:N,tensor:T)")
    elif best is first:
        text = "verdict: FITS as configured"
    else:
        text = ("verdict: " + ("FITS as configured; faster: " if first.fits else
                               "DOES NOT FIT as configured; fits with: ")
                + " ".join(suggestion_flags(config, best))
                + f"  ({_setting(best)}: peak {_bytes(best.peak_bytes)} of {_bytes(memory)})")
        if best.grad_accum_steps > 1 and config.trainer == "contrastive":
            text += ("\n  accumulation: feature-cached (the contrastive loss over the whole "
                     "global batch, as compiled here)")
    largest = plan.largest
    if largest is not None and largest.micro_batch > (best or first).micro_batch:
        text += (f"\n  headroom: a per-device micro-batch of {largest.micro_batch:,} also fits "
                 f"(compiled, remat {largest.remat}: peak {_bytes(largest.peak_bytes)}); a "
                 "larger global batch is another recipe (learning rate, steps)")
    if len(plan.results) == 1:
        text += "\n  (--max-compiles > 1 also tries other micro-batch sizes)"
    lines.append(text)
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run()
    except PlanError as e:
        print(f"crate_jax.plan: {e}", file=sys.stderr)
        sys.exit(2)
    if _TARGET.value == "tpu":
        # libtpu's threads keep a finished process from exiting: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _flag_meshes() -> tuple[list[dict[str, int]], list[str], int, int]:
    """(meshes, their flag texts, device count, device memory) from the flags."""
    if not _MESH.value:
        raise PlanError("--mesh is required, e.g. --mesh=fsdp:64 (repeat it to compare meshes)")
    texts = list(_MESH.value)
    devices, memory = _DEVICES.value, None
    if devices is not None and devices < 1:
        raise PlanError(f"--devices={devices}: must be positive")
    if _ACCELERATOR.value:
        tpu_count, memory = tpu_devices(_ACCELERATOR.value)
        if devices is not None and devices != tpu_count:
            raise PlanError(f"--devices={devices} but --accelerator={_ACCELERATOR.value} has "
                            f"{tpu_count} devices (chips)")
        devices = tpu_count
    meshes, devices = resolve_meshes([parse_mesh(t) for t in texts], devices, texts)
    memory = parse_bytes(_MEMORY.value) if _MEMORY.value else (memory or 32 * 2**30)
    if not 0 <= _HEADROOM.value < 1:
        raise PlanError(f"--headroom={_HEADROOM.value}: a fraction in [0, 1)")
    if _MAX_COMPILES.value < 1:
        raise PlanError(f"--max-compiles={_MAX_COMPILES.value}: at least 1")
    return meshes, texts, devices, memory


def _flag_config(meshes: list[dict[str, int]], texts: list[str]):
    """The config with --batch-size, --grad-accum-steps and --remat applied, checked against
    every mesh."""
    if _CONFIG.value is None:
        raise PlanError("--config is required, e.g. --config=configs/clipa_h14.py")
    config = copy.deepcopy(_CONFIG.value)
    with config.unlocked():
        if _BATCH.value is not None:
            if _BATCH.value < 1:
                raise PlanError(f"--batch-size={_BATCH.value}: must be positive")
            config.batch_size = _BATCH.value
        if _ACCUM.value is not None:
            if _ACCUM.value < 1:
                raise PlanError(f"--grad-accum-steps={_ACCUM.value}: must be positive")
            config.grad_accum_steps = _ACCUM.value
    if _REMAT.value is not None:
        config = with_settings(config, batch_size=config.batch_size,
                               accum=config.get("grad_accum_steps", 1), remat=_REMAT.value)
    for shape, text in zip(meshes, texts, strict=True):
        dp, accum = _data_parallel(shape), config.get("grad_accum_steps", 1)
        if config.batch_size % (dp * accum):
            raise PlanError(f"--batch-size={config.batch_size} (or the config's batch_size) "
                            f"is not divisible by the {dp} data-parallel devices of "
                            f"--mesh={text} × grad_accum_steps {accum}")
    return config


def _target_devices(devices: int):
    """The TPU compiler's devices for --target=tpu; else start `devices` fake CPU ones."""
    if _TARGET.value != "tpu":
        start_fake_devices(devices, _FAST.value)
        return None
    if not _ACCELERATOR.value:
        raise PlanError("--target=tpu needs --accelerator (the TPU type), e.g. v4-64")
    start_fake_devices(1, fast=False)  # the XLA flag would reach the TPU compiler too
    return tpu_target_devices(_ACCELERATOR.value)


def run() -> None:
    meshes, texts, devices, memory = _flag_meshes()
    usable = int(memory * (1 - _HEADROOM.value))
    config = _flag_config(meshes, texts)
    target_devices = _target_devices(devices)
    _plan_meshes(config, meshes, devices, memory, usable, target_devices)


def _plan_meshes(config, meshes, devices: int, memory: int, usable: int,
                 target_devices) -> None:
    name = config.model.get("name") or f"{config.model.get('image')} + {config.model.get('text')}"
    where = (f"{devices} fake CPU devices (an XLA:CPU estimate, about the memory of remat "
             "'none'; --target=tpu is exact for a TPU)" if target_devices is None else
             f"{len(target_devices)} {target_devices[0].device_kind} devices "
             f"({_ACCELERATOR.value}, compiled by the TPU compiler)")
    print(f"crate_jax.plan: {config.trainer}, {name}, on {where}; device memory "
          f"{_bytes(memory)}; at most {_MAX_COMPILES.value} compile(s) per mesh", flush=True)
    report = []
    for mesh_shape in meshes:
        printed = []

        def on_result(r: Result, printed=printed) -> None:
            if not printed:
                print(describe(r, memory, usable), flush=True)
            else:
                print(f"  compiled {_setting(r)}: peak {_bytes(r.peak_bytes)} "
                      f"({'fits' if r.fits else 'does not fit'}) in "
                      f"{r.lower_s + r.compile_s:.0f} s", flush=True)
            printed.append(r)

        print(f"compiling the train step for mesh {_mesh_text(mesh_shape)} ...", flush=True)
        plan = search(config, mesh_shape, usable, _MAX_COMPILES.value, on_result,
                      target_devices, remat_search=target_devices is not None)
        print(summarize(config, plan, memory), flush=True)
        report.append({
            "mesh": mesh_shape, "device_memory_bytes": memory, "usable_bytes": usable,
            "fits": plan.results[0].fits,
            "results": [dataclasses.asdict(r) for r in plan.results],
            "best": None if plan.best is None else dataclasses.asdict(plan.best),
            "suggestion_flags": [] if plan.best is None else suggestion_flags(config, plan.best),
            "predicted": plan.predicted})
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=2)


def cli() -> None:
    """The `crate-plan` console script."""
    app.run(main)


if __name__ == "__main__":
    cli()
