"""FLOP counting and model-FLOPs utilisation (MFU).

MFU = model FLOPs per step / (step time × peak FLOP/s of the devices), with model FLOPs
= 3 × forward FLOPs (forward + backward, no remat recomputation counted), DESIGN.md §6.
FLOPs are counted on the program's jaxpr (`jaxpr_flops`): XLA's cost analysis counts the
body of a while loop once, so it undercounts a scanned layer stack by a factor of the depth.
The jaxpr is what `jax.jit(f).trace(...)` gives before any compile, so counting costs no
second compile, and the count is the same on every backend:

    dot_general      2 · |out| · |contracted dims|         (an FMA counts as 2, as XLA)
    conv             2 · |out| · |kernel| / out_features
    elementwise      1 per output element (add, mul, max, …; no transcendental, as XLA)
    reductions       1 per input element
    scan             its body × length;  shard_map: its body × the devices it spans
    cond             the costliest branch;  while: its body once (trip count unknown)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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


_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "max", "min", "neg", "abs", "sign", "floor", "ceil", "round",
    "select_n", "clamp", "square", "rem", "pow", "integer_pow", "sqrt", "rsqrt", "nextafter",
    "and", "or", "not", "xor", "eq", "ne", "lt", "le", "gt", "ge", "add_any",
})
_REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax",
                         "argmin", "cumsum", "cummax", "reduce_and", "reduce_or"})


def _size(aval: Any) -> int:
    return math.prod(getattr(aval, "shape", ()))


def _sub_jaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _eqn_flops(eqn: Any) -> float:
    name, params = eqn.primitive.name, eqn.params
    out = eqn.outvars[0].aval if eqn.outvars else None
    if name == "dot_general":
        (contract, _), _ = params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return 2.0 * _size(out) * math.prod(lhs[i] for i in contract)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        features = rhs[params["dimension_numbers"].rhs_spec[0]]
        return 2.0 * _size(out) * math.prod(rhs) / features
    if name in _ELEMENTWISE:
        return float(_size(out))
    if name in _REDUCTIONS:
        return float(_size(eqn.invars[0].aval))
    inner = [jaxpr_flops(j) for j in _sub_jaxprs(params)]
    if name == "scan":
        return params["length"] * sum(inner)
    if name == "shard_map":
        mesh = params["mesh"]
        return math.prod(mesh.shape[a] for a in params["newly_manual_axes"]) * sum(inner)
    if name == "cond":
        return max(inner, default=0.0)
    return sum(inner)  # pjit, remat, custom_jvp/vjp, while (its body once): their bodies


def jaxpr_flops(jaxpr: Any) -> float:
    """FLOPs of one run of a (closed) jaxpr, by the rules of the module docstring."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return sum(_eqn_flops(eqn) for eqn in jaxpr.eqns)


def traced_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs of one call of `fn(*args)` (args may be abstract), traced, never compiled."""
    return jaxpr_flops(jax.jit(fn, **kwargs).trace(*args).jaxpr)


def xla_flops(compiled: jax.stages.Compiled) -> float:
    """XLA's own count for a compiled program, per device (a while-loop body counted once)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax returns one dict per program
        analysis = analysis[0]
    return float((analysis or {}).get("flops", 0.0))


def mfu(model_flops_per_step: float, step_seconds: float, num_devices: int,
        device: jax.Device | None = None) -> float | None:
    """Model-FLOPs utilisation in [0, 1], or None when the peak of the device is unknown."""
    peak = peak_flops(device)
    if peak is None or step_seconds <= 0:
        return None
    return model_flops_per_step / (step_seconds * peak * num_devices)
