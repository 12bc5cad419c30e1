"""Train-step time of any registry model, as model and hardware FLOP rates and as a fraction of
the machine's own matmul rate at the step's matmul shapes.

    python benchmarks/model_step.py --model crate-b/16 --batch 8
    python benchmarks/model_step.py --model crate-alpha-b/32 --batch 8 --compare-to vit-b/32
    python benchmarks/model_step.py --model crate-alpha-l/14 --batch 128 --dtype bfloat16 \
        --attention-impl cudnn           # on a GPU

A step is loss → gradients → SGD update, one jax.jit with the parameters donated. Its time is
the median of all timed steps after compilation. Two FLOP counts (crate_jax.perf):

    model FLOPs     3 × the forward's FLOPs on the batch (what MFU counts)
    hardware FLOPs  what the compiled step runs: remat's recomputation included (HFU)

The roofline: every dot_general of the traced forward + backward is a batched matmul
(batch, m, k)·(batch, k, n); each distinct shape is timed alone as a jitted matmul of
contiguous arrays, and the matmul rate at the model's shapes is the step's matmul FLOPs over
the time those matmuls take alone (each shape weighted by its FLOPs). The step's model-FLOP
rate as a fraction of it says how close the step comes to running nothing but its matmuls at
the speed they run alone. Steps and matmuls are timed in alternating rounds (--rounds), so
that a machine whose speed drifts (a shared VM) slows both alike; the fraction is also given
from the fastest step and the fastest run of each matmul (the least disturbed ones). MFU and
HFU are printed where the accelerator's peak is known.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax import models, perf


def _loss_fn(forward):
    def loss_fn(params, images, labels):
        logp = jax.nn.log_softmax(forward(params, images).astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
    return loss_fn


def _step_fn(forward):
    loss_fn = _loss_fn(forward)

    def step(params, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        params = jax.tree.map(lambda p, g: p - 1e-4 * g.astype(p.dtype), params, grads)
        return params, loss
    return step


def step_counts(forward, params, images, labels) -> tuple[perf.StepFlops, collections.Counter]:
    """(model and hardware FLOPs of one step, the step's matmul shapes), traced, not
    compiled. Every parameter is trained: model FLOPs = 3 × the forward (and loss)."""
    step = jax.jit(_step_fn(forward)).trace(params, images, labels).jaxpr
    loss = jax.jit(_loss_fn(forward)).trace(params, images, labels).jaxpr
    trained = [True] * len(jax.tree.leaves(params)) + [False, False]
    return (perf.StepFlops(model=perf.model_flops(loss, trained),
                           hardware=perf.jaxpr_flops(step)),
            perf.matmul_shapes(step))


def compiled_step(forward, params, images, labels):
    """(step, params copy, compile seconds): the step jitted with the parameters donated,
    compiled and run once; `forward(params, images)` gives the logits."""
    step = jax.jit(_step_fn(forward), donate_argnums=0)
    params = jax.tree.map(jnp.array, params)  # a copy: the caller's arrays are not donated
    t0 = time.perf_counter()
    params, loss = step(params, images, labels)
    loss.block_until_ready()
    return step, params, time.perf_counter() - t0


def run_steps(step, params, images, labels, steps: int):
    """(params, loss, the seconds of each of `steps` steps)."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, loss = step(params, images, labels)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    return params, loss, times


class Matmuls:
    """Each distinct matmul shape of a step as its own jitted matmul on contiguous arrays."""

    def __init__(self, shapes: collections.Counter):
        rng = np.random.default_rng(0)
        self.shapes = shapes
        self._runs = {}
        for s in shapes:
            dims = (s.batch,) if s.batch > 1 else ()
            a = jnp.asarray(rng.normal(size=(*dims, s.m, s.k)), s.dtype)
            b = jnp.asarray(rng.normal(size=(*dims, s.k, s.n)), s.dtype)
            fn = jax.jit(jnp.matmul)
            fn(a, b).block_until_ready()  # compiled before any timing
            self._runs[s] = (fn, a, b)
        self.times: dict = {s: [] for s in shapes}

    def time(self, repeats: int) -> None:
        for s, (fn, a, b) in self._runs.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(a, b).block_until_ready()
                self.times[s].append(time.perf_counter() - t0)


def roofline(shapes: collections.Counter, seconds: dict) -> tuple[float, float]:
    """(the step's matmul FLOPs, the seconds its matmuls take alone): Σ count·FLOPs and
    Σ count·seconds over the shapes, `seconds[shape]` the time of one matmul of that shape.
    Their ratio is the matmul rate at the step's shapes, each shape weighted by its FLOPs."""
    flops = sum(n * s.flops for s, n in shapes.items())
    return flops, sum(n * seconds[s] for s, n in shapes.items())


def _model(name: str, args: argparse.Namespace):
    overrides = dict(num_classes=args.num_classes, dtype=args.dtype,
                     attention_impl=args.attention_impl, scan_layers=not args.unrolled)
    if args.remat:
        overrides["remat"] = args.remat
    if args.image_size:
        overrides["image_size"] = args.image_size
    model = models.create(name, **overrides)
    rng = np.random.default_rng(0)
    cfg = model.cfg
    images = jnp.asarray(rng.normal(size=(args.batch, cfg.image_size, cfg.image_size, 3)),
                         jnp.float32)
    labels = jnp.asarray(rng.integers(0, cfg.num_classes, args.batch))
    return model, images, labels


def measure(name: str, args: argparse.Namespace) -> dict:
    """The step of `name` timed in --rounds rounds of --steps steps, each round followed by
    --repeats runs of each of its matmul shapes alone."""
    model, images, labels = _model(name, args)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(params, images):
        return nnx.merge(graphdef, params, rest)(images)

    flops, shapes = step_counts(forward, params, images, labels)
    forward_flops = perf.traced_flops(forward, params, images)
    step, state, compile_s = compiled_step(forward, params, images, labels)
    matmuls = Matmuls(shapes)
    times = []
    for _ in range(args.rounds):
        state, loss, new = run_steps(step, state, images, labels, args.steps)
        times += new
        matmuls.time(args.repeats)
    per_shape = {s: statistics.median(t) for s, t in matmuls.times.items()}
    dot_flops, dot_s = roofline(shapes, per_shape)
    _, fastest_dot_s = roofline(shapes, {s: min(t) for s, t in matmuls.times.items()})
    return dict(name=name, params=sum(x.size for x in jax.tree.leaves(params)),
                forward_gflops=forward_flops / args.batch / 1e9,
                step_s=statistics.median(times), fastest_step_s=min(times), steps=len(times),
                compile_s=compile_s, loss=float(loss), flops=flops, dot_flops=dot_flops,
                dot_s=dot_s, fastest_dot_s=fastest_dot_s, per_shape=per_shape, shapes=shapes,
                batch=args.batch)


def report(r: dict, show_shapes: bool = False) -> str:
    """The lines printed for one model (see the module docstring)."""
    step_s, flops = r["step_s"], r["flops"]
    matmul_rate = r["dot_flops"] / r["dot_s"]
    lines = [f"{r['name']}: {r['params']:,} parameters, forward {r['forward_gflops']:.2f} "
             f"GFLOPs/img; step {1e3 * step_s:,.1f} ms (median of {r['steps']}), "
             f"{r['batch'] / step_s:.1f} img/s, compiled in {r['compile_s']:.1f} s"]
    for kind, name in (("model", "MFU"), ("hardware", "HFU")):
        count = getattr(flops, kind)
        share = perf.utilisation(count, step_s, num_devices=1)
        lines.append(f"  {kind + ' FLOPs':<15} {count / 1e9:10.2f} GFLOP/step "
                     f"{count / step_s / 1e9:10.2f} GFLOP/s   {name} "
                     + ("n/a" if share is None else f"{100 * share:.1f}%"))
    lines.append(f"  matmul rate at the step's shapes {matmul_rate / 1e9:.2f} GFLOP/s "
                 f"({len(r['shapes'])} shapes timed alone, weighted by FLOPs): the step's "
                 f"matmuls alone take {1e3 * r['dot_s']:,.0f} ms, "
                 f"{100 * r['dot_s'] / step_s:.0f} % of the step")
    fastest = flops.model / r["fastest_step_s"] / (r["dot_flops"] / r["fastest_dot_s"])
    lines.append(f"  model FLOP rate / matmul rate: {flops.model / step_s / matmul_rate:.2f} "
                 f"(medians; {fastest:.2f} from the fastest step and the fastest matmuls)")
    if show_shapes:
        lines.append(f"  {'batch × m × k × n':<26} {'dtype':<9} {'count':>6} "
                     f"{'GFLOP/step':>11} {'GFLOP/s alone':>14}")
        for s, n in sorted(r["shapes"].items(), key=lambda x: -x[0].flops * x[1]):
            lines.append(f"  {f'{s.batch} × {s.m} × {s.k} × {s.n}':<26} {s.dtype:<9} {n:>6} "
                         f"{n * s.flops / 1e9:>11.2f} {s.flops / r['per_shape'][s] / 1e9:>14.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registry name, e.g. crate-alpha-b/16")
    parser.add_argument("--compare-to", default=None, help="a second model, e.g. vit-b/16")
    parser.add_argument("--unrolled", action="store_true",
                        help="scan_layers=False: the layer loop unrolled")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None, help="default: 224")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (parameters stay float32)")
    parser.add_argument("--remat", default=None, choices=["none", "minimal", "dots", "full"],
                        help="per-layer remat policy (default: the model's, 'minimal')")
    parser.add_argument("--attention-impl", default=None, choices=[None, "xla", "cudnn"])
    parser.add_argument("--steps", type=int, default=1, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=12,
                        help="alternating rounds: --steps steps, then the matmuls alone")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each matmul shape per round")
    parser.add_argument("--shapes", action="store_true",
                        help="also print each matmul shape, its count and its rate alone")
    args = parser.parse_args()
    for flag in ("batch", "steps", "rounds", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"batch {args.batch}, compute {args.dtype}, remat {args.remat or 'model default'}")
    rows = [measure(args.model, args)]
    if args.compare_to:
        rows.append(measure(args.compare_to, args))
    for r in rows:
        print(report(r, args.shapes), flush=True)
    if len(rows) == 2:
        a, b = rows
        print(f"{a['name']} / {b['name']}: step time ×{a['step_s'] / b['step_s']:.2f}, "
              f"forward FLOPs ×{a['forward_gflops'] / b['forward_gflops']:.2f}")


if __name__ == "__main__":
    main()
