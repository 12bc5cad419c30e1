"""FLOP counting: model FLOPs and hardware FLOPs, and their utilisations (MFU, HFU).

Two counts of one train step, each under its own name (docs/design.md §6):

    model FLOPs     what the model needs: 3 × the forward FLOPs of the loss on the step's
                    global batch (forward + backward), each example counted once, whatever
                    the remat policy or the gradient accumulation (`model_flops`). An operation
                    that depends on no trained parameter (a frozen tower, an EMA teacher, the
                    input pipeline's normalisation) has no backward pass and counts once.
    hardware FLOPs  everything the compiled step executes: forward, backward, remat's
                    recomputation, feature-cached accumulation's second forward pass, the
                    optimizer (`jaxpr_flops` of the step).

MFU = model FLOPs / (step time × peak); HFU = hardware FLOPs / (step time × peak). Only MFU
compares across remat policies and implementations; HFU says how busy the chips were.

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

import collections
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core

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


def planned_peak_bytes(compiled: jax.stages.Compiled) -> int | None:
    """XLA's plan for a compiled program, per device: live at the peak, at most, are the inputs,
    the temporaries and the outputs that do not reuse an input (a donated state is updated in
    place): argument + temp + output − alias bytes. XLA:CPU's own peak_memory_in_bytes leaves
    the temporaries out, so it is not used. None where the backend gives no analysis."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(memory.argument_size_in_bytes + memory.temp_size_in_bytes
               + memory.output_size_in_bytes - memory.alias_size_in_bytes)


def utilisation(flops_per_step: float, step_seconds: float, num_devices: int,
                device: jax.Device | None = None) -> float | None:
    """flops_per_step / (step time × the devices' peak) in [0, 1], or None when the peak of
    the device is unknown: MFU for model FLOPs, HFU for hardware FLOPs."""
    peak = peak_flops(device)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / (step_seconds * peak * num_devices)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """The two FLOP counts of one train step of the global batch (see the module)."""

    model: float
    hardware: float


# --- model FLOPs: which operations a trained parameter reaches ---------------------------------

def _is_live(var: Any, live: dict) -> bool:
    return not isinstance(var, jax.extend.core.Literal) and live.get(var, False)


def _carried(body: Any, ins: list[bool], start: int, count: int) -> tuple:
    """_live_flops of a loop body whose inputs ins[start:start + count] are the carry, with
    the carry's liveness iterated to its fixed point (a carry becomes live once any
    iteration makes it so)."""
    ins = list(ins)
    while True:
        const, trained, outs = _live_flops(body, ins)
        carry = [a or b for a, b in zip(ins[start:start + count], outs[:count], strict=True)]
        if carry == ins[start:start + count]:
            return const, trained, outs
        ins[start:start + count] = carry


def _eqn_live_flops(eqn: Any, ins: list[bool]) -> tuple[float, float, list[bool]]:
    name, params, n_out = eqn.primitive.name, eqn.params, len(eqn.outvars)
    if name == "stop_gradient":
        return 0.0, 0.0, [False] * n_out
    if name == "scan":
        const, trained, outs = _carried(params["jaxpr"], ins, params["num_consts"],
                                        params["num_carry"])
        return params["length"] * const, params["length"] * trained, outs
    if name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        const, trained, outs = _carried(params["body_jaxpr"], ins[nc:], nb, n_out)
        c_const, c_trained, _ = _live_flops(params["cond_jaxpr"], ins[:nc] + outs)
        return const + c_const, trained + c_trained, outs
    if name == "cond":
        runs = [_live_flops(branch, ins[1:]) for branch in params["branches"]]
        const, trained, _ = max(runs, key=lambda r: r[0] + r[1])
        outs = [any(r[2][i] for r in runs) or ins[0] for i in range(n_out)]
        return const, trained, outs
    subs = list(_sub_jaxprs(params))
    if not subs:
        flops = _eqn_flops(eqn)
        return (0.0, flops, [True] * n_out) if any(ins) else (flops, 0.0, [False] * n_out)
    if len(subs) == 1 and len(subs[0].invars) == len(ins):  # pjit, remat, custom_jvp/vjp, …
        const, trained, outs = _live_flops(subs[0], ins)
        if name == "shard_map":
            devices = math.prod(params["mesh"].shape[a] for a in params["newly_manual_axes"])
            const, trained = devices * const, devices * trained
        return const, trained, outs if len(outs) == n_out else [any(ins)] * n_out
    flops = _eqn_flops(eqn)  # anything else: all its work on the side of its inputs
    return (0.0, flops, [True] * n_out) if any(ins) else (flops, 0.0, [False] * n_out)


def _live_flops(jaxpr: Any, live_in: Sequence[bool]) -> tuple[float, float, list[bool]]:
    """(FLOPs of the operations no live input reaches, FLOPs of those one does, liveness of
    the outputs) of one run of `jaxpr`, its inputs live as `live_in` says."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    live = dict(zip(jaxpr.invars, live_in, strict=True))
    const = trained = 0.0
    for eqn in jaxpr.eqns:
        c, t, outs = _eqn_live_flops(eqn, [_is_live(v, live) for v in eqn.invars])
        const, trained = const + c, trained + t
        live.update(zip(eqn.outvars, outs, strict=True))
    return const, trained, [_is_live(v, live) for v in jaxpr.outvars]


def model_flops(forward_jaxpr: Any, trained: Sequence[bool]) -> float:
    """Model FLOPs of a train step from the jaxpr of its forward pass (the loss of the global
    batch, no gradient): 3 × the FLOPs of the operations that depend on a trained input
    (`trained[i]`: the jaxpr's input i is a trained parameter; stop_gradient cuts the
    dependence), 1 × those of the others (frozen parts: a forward pass only)."""
    const, live, _ = _live_flops(forward_jaxpr, trained)
    return const + 3.0 * live


# --- the matmul shapes of a program -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MatmulShape:
    """A dot_general as the batched matmul (batch, m, k) · (batch, k, n) it computes."""

    batch: int
    m: int
    k: int
    n: int
    dtype: str

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n


def _matmul_shape(eqn: Any) -> MatmulShape:
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    batch = math.prod(lhs.shape[i] for i in lb)
    k = math.prod(lhs.shape[i] for i in lc)
    m = math.prod(lhs.shape) // (batch * k)
    n = math.prod(rhs.shape) // (batch * k)
    return MatmulShape(batch, m, k, n, str(lhs.dtype))


def matmul_shapes(jaxpr: Any) -> collections.Counter:
    """{MatmulShape: how many times one run of `jaxpr` computes it}, with the multiplicities
    of jaxpr_flops (a scan body × its length, a while body once, the costliest cond branch,
    a shard_map body × its devices)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    counts: collections.Counter = collections.Counter()
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            counts[_matmul_shape(eqn)] += 1
            continue
        inner = [matmul_shapes(j) for j in _sub_jaxprs(params)]
        if name == "cond":
            inner = [max(inner, key=lambda c: sum(s.flops * n for s, n in c.items()))]
        times = 1
        if name == "scan":
            times = params["length"]
        elif name == "shard_map":
            times = math.prod(params["mesh"].shape[a] for a in params["newly_manual_axes"])
        for c in inner:
            for shape, n in c.items():
                counts[shape] += n * times
    return counts
