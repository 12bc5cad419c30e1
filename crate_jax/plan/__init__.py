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

The package: devices.py (sizes, meshes, TPU slices, fake CPU devices), step.py (one compile
of the train step), search.py (remat and micro-batch), report.py (what is printed) and
__main__.py (the flags). Importing it starts no jax backend: jax is imported inside the
functions that need it, after plan/__main__.py has set XLA_FLAGS.
"""

from crate_jax.plan.devices import (
    MESH_AXES,
    REMAT_ORDER,
    PlanError,
    parse_bytes,
    parse_mesh,
    resolve_meshes,
    start_fake_devices,
    tpu_devices,
    tpu_target_devices,
    tpu_topology,
)
from crate_jax.plan.report import describe, suggestion_flags, summarize
from crate_jax.plan.search import Plan, search
from crate_jax.plan.step import Result, compile_step, with_settings

__all__ = [
    "MESH_AXES", "REMAT_ORDER", "Plan", "PlanError", "Result", "compile_step", "describe",
    "parse_bytes", "parse_mesh", "resolve_meshes", "search", "start_fake_devices",
    "suggestion_flags", "summarize", "tpu_devices", "tpu_target_devices", "tpu_topology",
    "with_settings",
]
