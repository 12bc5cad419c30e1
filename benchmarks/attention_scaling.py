"""How MSSA (CRATE: N×N attention per head) and TSSA (ToST: token statistics) scale with the
number of tokens N: forward + backward time and peak memory of one layer's attention block,
the largest N each fits in a memory budget, and the fitted log-log slopes (TSSA ≈ 1, MSSA ≈ 2).

    python benchmarks/attention_scaling.py                               # N = 256 … 16,384
    python benchmarks/attention_scaling.py --tokens 256,512,1024 --rounds 2 --budget 2GiB
    python benchmarks/attention_scaling.py --json scaling.json --dtype bfloat16

What is measured, per N and block, on `--batch` sequences of width `--width` (default 384):
  time    the median over `--rounds` of one jitted call of ∂/∂(params, Z) of Σ block(Z)
          (forward + backward), after a warm-up call; not run when the step's memory is
          over the budget (reported as '-').
  memory  XLA's own account of the compiled forward + backward (jax `memory_analysis()` of
          the compiled step): temp_size_in_bytes + argument_size_in_bytes, i.e. the
          intermediates the program allocates plus its inputs (parameters and Z). It is what
          the compiler plans, not a sampled allocator high-water mark, and it is known
          without running the step, so it is given for every N, also over the budget.
MSSA runs jax.nn.dot_product_attention's XLA path (it forms the N×N matrix; a fused flash
kernel, `--attention-impl cudnn` on GPUs, would change MSSA's memory, not its time slope).
The largest N that fits is the largest measured N within `--budget`, and the power law
memory ≈ a·N^b fitted to the measurements, solved for the budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.models.blocks import MSSA
from crate_jax.models.tssa import TSSA

UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "B": 1}


def parse_bytes(text: str) -> int:
    """'16GiB' → bytes."""
    for unit, scale in sorted(UNITS.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    raise argparse.ArgumentTypeError(f"--budget {text!r}: a size such as 16GiB or 512MiB")


def build(kind: str, width: int, heads: int, dtype: str, attention_impl: str | None):
    kw = dict(eps=1e-5, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    if kind == "mssa":
        return MSSA(width, heads, out_bias=True, attention_impl=attention_impl, **kw)
    return TSSA(width, heads, **kw)


def measure(kind: str, tokens: int, args: argparse.Namespace) -> dict:
    """One row: compiled memory, and the median time when it fits the budget."""
    module = build(kind, args.width, args.heads, args.dtype, args.attention_impl)
    graphdef, params = nnx.split(module)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, tokens, args.width)),
                    jnp.dtype(args.dtype))

    def loss(params, z):
        return jnp.sum(nnx.merge(graphdef, params)(z)[0].astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = step.lower(params, z).compile()
    memory = compiled.memory_analysis()
    peak = int(memory.temp_size_in_bytes + memory.argument_size_in_bytes)
    row = dict(block=kind, tokens=tokens, peak_bytes=peak,
               temp_bytes=int(memory.temp_size_in_bytes),
               argument_bytes=int(memory.argument_size_in_bytes), seconds=None)
    if peak > args.budget:
        return row
    jax.block_until_ready(compiled(params, z))  # warm-up
    times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, z))
        times.append(time.perf_counter() - t0)
    row["seconds"] = statistics.median(times)
    return row


def slope(rows: list[dict], key: str) -> float | None:
    """The least-squares slope of log(value) against log(N), None with < 2 points."""
    pts = [(r["tokens"], r[key]) for r in rows if r[key]]
    if len(pts) < 2:
        return None
    n, v = np.log(np.array(pts, np.float64)).T
    return float(np.polyfit(n, v, 1)[0])


def largest_fitting(rows: list[dict], budget: int) -> tuple[int | None, float | None]:
    """(largest measured N within the budget, N where the fitted memory power law meets it)."""
    fits = [r["tokens"] for r in rows if r["peak_bytes"] <= budget]
    pts = np.log(np.array([(r["tokens"], r["peak_bytes"]) for r in rows], np.float64))
    predicted = None
    if len(pts) >= 2:
        b, log_a = np.polyfit(pts[:, 0], pts[:, 1], 1)
        predicted = float(np.exp((np.log(budget) - log_a) / b))
    return (max(fits) if fits else None), predicted


def report(rows: list[dict], args: argparse.Namespace) -> dict:
    summary = {}
    for kind in args.blocks:
        mine = [r for r in rows if r["block"] == kind]
        largest, predicted = largest_fitting(mine, args.budget)
        summary[kind] = dict(time_exponent=slope(mine, "seconds"),
                             memory_exponent=slope(mine, "peak_bytes"),
                             largest_measured_tokens_in_budget=largest,
                             fitted_tokens_at_budget=predicted)
    return summary


def _print(rows: list[dict], summary: dict, args: argparse.Namespace) -> None:
    print(f"width {args.width}, {args.heads} heads, batch {args.batch}, {args.dtype}, budget "
          f"{args.budget / 2**20:,.0f} MiB, {jax.devices()[0].device_kind}")
    print(f"{'block':6} {'tokens':>7} {'fwd+bwd ms':>11} {'peak MiB':>10} (temp + arguments)")
    for r in rows:
        ms = "-" if r["seconds"] is None else f"{1e3 * r['seconds']:.2f}"
        print(f"{r['block']:6} {r['tokens']:>7,} {ms:>11} {r['peak_bytes'] / 2**20:>10.1f}")
    for kind, s in summary.items():
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
        fitted = s["fitted_tokens_at_budget"]
        print(f"{kind}: time ∝ N^{fmt(s['time_exponent'])}, memory ∝ "
              f"N^{fmt(s['memory_exponent'])}; largest measured N in budget: "
              f"{s['largest_measured_tokens_in_budget']}; fitted N at budget: "
              f"{'n/a' if fitted is None else f'{fitted:,.0f}'}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="256,512,1024,2048,4096,8192,16384",
                   help="comma-separated sequence lengths N")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="timed calls per point (median)")
    p.add_argument("--budget", type=parse_bytes, default=parse_bytes("16GiB"),
                   help="device memory budget, e.g. 16GiB: larger steps are compiled only")
    p.add_argument("--blocks", default="mssa,tssa")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention-impl", default=None, choices=(None, "xla", "cudnn"))
    p.add_argument("--json", default=None, help="write rows and summary here")
    args = p.parse_args(argv)
    args.blocks = [b.strip() for b in args.blocks.split(",")]
    if set(args.blocks) - {"mssa", "tssa"} or args.width % args.heads:
        p.error("--blocks takes mssa,tssa; --width must be divisible by --heads")
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = [measure(kind, n, args) for n in tokens for kind in args.blocks]
    summary = report(rows, args)
    _print(rows, summary, args)
    result = dict(rows=rows, summary=summary, width=args.width, heads=args.heads,
                  batch=args.batch, dtype=args.dtype, budget_bytes=args.budget,
                  device=jax.devices()[0].device_kind)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
