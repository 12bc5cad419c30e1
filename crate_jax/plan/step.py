"""One compile of the real train step for a mesh, from abstract values only, and what it
needs: the memory, the model and hardware FLOPs, the compile time."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import TYPE_CHECKING

from crate_jax.plan.devices import OOM, REMAT_ORDER, PlanError, data_parallel, hbm_size

if TYPE_CHECKING:  # jax starts only after XLA_FLAGS is set (plan/__main__.py)
    from crate_jax.perf import StepFlops


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
        return self.batch_size // data_parallel(self.mesh)

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
    from crate_jax import perf  # jax starts only after XLA_FLAGS is set (plan/__main__.py)

    memory = compiled.memory_analysis()
    args, out = memory.argument_size_in_bytes, memory.output_size_in_bytes
    alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
    return Result(**fields, argument_bytes=args, output_bytes=out, alias_bytes=alias,
                  temp_bytes=temp, code_bytes=memory.generated_code_size_in_bytes,
                  peak_bytes=perf.planned_peak_bytes(compiled),
                  model_flops_per_device=flops.model / devices,
                  hardware_flops_per_device=flops.hardware / devices,
                  lower_s=lower_s, compile_s=compile_s)


def _out_of_memory(fields: dict, oom, lower_s: float, compile_s: float) -> Result:
    """The Result of a step the TPU compiler refused for its HBM."""
    known = fields["param_bytes"] + fields["opt_bytes"] + fields["batch_bytes"]
    temp = hbm_size(oom.group(1))
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
            oom = OOM.search(str(e))
            if not oom:
                raise
            return _out_of_memory(fields, oom, t1 - t0, time.perf_counter() - t1)
        t2 = time.perf_counter()
        flops = perf.StepFlops(model=state.model_flops(),
                               hardware=perf.jaxpr_flops(traced.jaxpr))
    return _measured(fields, compiled, flops, len(devices), t1 - t0, t2 - t1)
