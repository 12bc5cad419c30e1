"""python -m crate_jax.plan --config=CONFIG --mesh=AXIS:SIZE[,...] [...] (the package
docstring, crate_jax/plan/__init__.py, says what it does): the flags and the start-up only."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from crate_jax import gc_tuning

# The package's public names, as it gathers them; the rest from their modules.
from crate_jax.plan import (
    PlanError,
    Result,
    describe,
    parse_bytes,
    parse_mesh,
    resolve_meshes,
    search,
    start_fake_devices,
    suggestion_flags,
    summarize,
    tpu_devices,
    tpu_target_devices,
    with_settings,
)
from crate_jax.plan.devices import data_parallel
from crate_jax.plan.report import format_bytes, mesh_text, setting_text

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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    gc_tuning.for_tracing()
    try:
        run()
    except PlanError as e:
        print(f"crate_jax.plan: {e}", file=sys.stderr)
        sys.exit(2)
    # Leave at once: libtpu's threads keep a finished process from exiting, and jax's exit
    # clean-up (every cache cleared, gc.collect() four times) is wasted on a process that ends.
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
    source = (f"--accelerator={_ACCELERATOR.value}" if _ACCELERATOR.value else
              f"--devices={devices}" if devices is not None else None)
    meshes, devices = resolve_meshes([parse_mesh(t) for t in texts], devices, texts,
                                     source=source)
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
        dp, accum = data_parallel(shape), config.get("grad_accum_steps", 1)
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
          f"{format_bytes(memory)}; at most {_MAX_COMPILES.value} compile(s) per mesh", flush=True)
    report = []
    for mesh_shape in meshes:
        printed = []

        def on_result(r: Result, printed=printed) -> None:
            if not printed:
                print(describe(r, memory, usable, _HEADROOM.value), flush=True)
            else:
                print(f"  compiled {setting_text(r)}: peak {format_bytes(r.peak_bytes)} "
                      f"({'fits' if r.fits else 'does not fit'}) in "
                      f"{r.lower_s + r.compile_s:.0f} s", flush=True)
            printed.append(r)

        print(f"compiling the train step for mesh {mesh_text(mesh_shape)} ...", flush=True)
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
