"""FLOP counting and model-FLOPs utilisation (MFU).

MFU = model FLOPs per step / (step time × peak FLOP/s of the devices), with model FLOPs
= 3 × forward FLOPs (forward + backward, no remat recomputation counted), DESIGN.md §6.
Forward FLOPs come from XLA's cost analysis of the compiled forward (an FMA counts as 2).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

# Dense bf16 peak FLOP/s per device (vendor figures), keyed by a substring of device_kind.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
    "TPU v3": 123e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when unknown (a CPU, say)."""
    kind = (device or jax.devices()[0]).device_kind
    for key, value in PEAK_BF16_FLOPS.items():
        if key.lower() in kind.lower():
            return value
    return None


def compiled_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs of one call of `fn(*args)` from XLA's cost analysis (args may be abstract)."""
    compiled = jax.jit(fn, **kwargs).lower(*args).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax returns one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def step_flops(compiled: jax.stages.Compiled) -> float:
    """FLOPs of one call of an already compiled (possibly sharded) program, for the global
    batch. XLA's cost analysis of an SPMD-partitioned executable describes the program each
    device runs, so it is scaled by the number of devices the program spans."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    per_device = float((analysis or {}).get("flops", 0.0))
    shardings = jax.tree.leaves(compiled.input_shardings)
    devices = len(shardings[0].device_set) if shardings else 1
    return per_device * devices


def mfu(model_flops_per_step: float, step_seconds: float, num_devices: int,
        device: jax.Device | None = None) -> float | None:
    """Model-FLOPs utilisation in [0, 1], or None when the peak of the device is unknown."""
    peak = peak_flops(device)
    if peak is None or step_seconds <= 0:
        return None
    return model_flops_per_step / (step_seconds * peak * num_devices)
