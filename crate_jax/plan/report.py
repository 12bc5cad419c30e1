"""What the planner prints: one step's figures, the plan's summary and the suggested flags."""

from __future__ import annotations

import math

from crate_jax.plan.search import Plan
from crate_jax.plan.step import Result, config_remat, remat_keys

# --- report ----------------------------------------------------------------------------------

def format_bytes(n: float) -> str:
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


def setting_text(r: Result) -> str:
    return (f"batch {r.batch_size:,} ({r.per_device_batch:,} per device, micro-batch "
            f"{r.micro_batch:,} × grad_accum_steps {r.grad_accum_steps}), remat {r.remat}")


def _undivided_text(r: Result) -> str:
    from crate_jax.parallel import format_undivided
    return "  " + format_undivided(r.undivided).replace("\n", "\n  ")


def describe(r: Result, memory: int, usable: int, headroom: float) -> str:
    """The table for one compile."""
    devices = math.prod(r.mesh.values())
    other_args = r.argument_bytes - r.param_bytes - r.opt_bytes - r.batch_bytes
    verdict = "FITS" if r.fits else "DOES NOT FIT"
    return "\n".join([
        f"mesh {mesh_text(r.mesh)} ({devices} devices): {setting_text(r)}",
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
        f"    parameters          {format_bytes(r.param_bytes):>12}",
        f"    optimizer state     {format_bytes(r.opt_bytes):>12}",
        f"    input batch         {format_bytes(r.batch_bytes):>12}",
        f"    other inputs        {format_bytes(other_args):>12}   (non-parameter model state)",
        f"    activations (temp)  {format_bytes(r.temp_bytes):>12}   (XLA temporaries: activations "
        "saved for the backward pass, gradients, gathered weights, workspace)",
        f"    new outputs         {format_bytes(r.output_bytes - r.alias_bytes):>12}   "
        "(outputs not "
        "written in place over the donated state)",
        f"    peak                {format_bytes(r.peak_bytes):>12}   (inputs + temp + new outputs)",
        f"  device memory         {format_bytes(memory):>12}   ({format_bytes(usable)} usable with "
        f"{100 * headroom:.0f} % headroom)",
        f"  verdict               {verdict}: peak is {100 * r.peak_bytes / memory:.0f} % of "
        "the device memory" + (f" ({r.note})" if r.note else ""),
    ] + ([_undivided_text(r)] if r.undivided else []))


def mesh_text(mesh: dict[str, int]) -> str:
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
            lines.append(f"    {setting_text(r)}: peak {format_bytes(r.peak_bytes)} "
                         f"({'fits' if r.fits else 'does not fit'}), "
                         f"{r.lower_s + r.compile_s:.0f} s")
    if plan.predicted:
        p = plan.predicted
        lines.append(f"  linear fit at remat {p['remat']}: peak ≈ "
                     f"{format_bytes(p['fixed_bytes'])} + "
                     f"{format_bytes(p['bytes_per_example'])} per example of the per-device "
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
                + f"  ({setting_text(best)}: peak {format_bytes(best.peak_bytes)} of "
                  f"{format_bytes(memory)})")
        if best.grad_accum_steps > 1 and config.trainer == "contrastive":
            text += ("\n  accumulation: feature-cached (the contrastive loss over the whole "
                     "global batch, as compiled here)")
    largest = plan.largest
    if largest is not None and largest.micro_batch > (best or first).micro_batch:
        text += (f"\n  headroom: a per-device micro-batch of {largest.micro_batch:,} also fits "
                 f"(compiled, remat {largest.remat}: peak {format_bytes(largest.peak_bytes)}); a "
                 "larger global batch is another recipe (learning rate, steps)")
    if len(plan.results) == 1:
        text += "\n  (--max-compiles > 1 also tries other micro-batch sizes)"
    lines.append(text)
    return "\n".join(lines)
