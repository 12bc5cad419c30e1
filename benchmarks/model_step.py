"""Forward+backward step time and forward GFLOPs for any registry model.

    python benchmarks/model_step.py --model crate-alpha-b/32 --batch 8 --compare-to vit-b/32
    python benchmarks/model_step.py --model crate-alpha-b/32 --batch 8 --compare-reference
    python benchmarks/model_step.py --model crate-alpha-l/14 --batch 128 --dtype bfloat16 \
        --attention-impl cudnn           # on a GPU

A step is loss → gradients → SGD update, one jax.jit with the parameters donated. The time is
the median of --steps steps after compilation. GFLOPs/img is the forward's FLOPs (counted on
its jaxpr, crate_jax.perf) divided by the batch. --compare-reference times the reference
implementations' computation (reference_shapes.py: the official code's shape, rebuilt from
DESIGN.md, none of it imported) on the same weights, after checking that its logits match.
MFU uses 3 × forward FLOPs (DESIGN.md §6) and is printed where the accelerator's peak is
known.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax import models, perf
from crate_jax.models import layer_stack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_shapes


def compiled_step(forward, params, images, labels):
    """(step, params copy, compile seconds): loss → gradients → SGD in one jit with the
    parameters donated, compiled and run once; `forward(params, images)` gives the logits."""
    def loss_fn(params, images, labels):
        logp = jax.nn.log_softmax(forward(params, images).astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    def step(params, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        params = jax.tree.map(lambda p, g: p - 1e-4 * g.astype(p.dtype), params, grads)
        return params, loss

    step = jax.jit(step, donate_argnums=0)
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


def time_step(forward, params, images, labels, steps: int) -> tuple[float, float, float]:
    """(median step seconds, compile seconds, last loss)."""
    step, params, compile_s = compiled_step(forward, params, images, labels)
    _, loss, times = run_steps(step, params, images, labels, steps)
    return statistics.median(times), compile_s, float(loss)


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


def _row(name: str, params, fwd_flops: float, step_s: float, compile_s: float, loss: float,
         batch: int) -> dict:
    return dict(name=name, params=sum(x.size for x in jax.tree.leaves(params)),
                gflops=fwd_flops / batch / 1e9, step_ms=step_s * 1e3, img_s=batch / step_s,
                compile_s=compile_s, tflops=3 * fwd_flops / step_s / 1e12,
                mfu=perf.mfu(3 * fwd_flops, step_s, num_devices=1), loss=loss)


def measure(name: str, args: argparse.Namespace) -> dict:
    model, images, labels = _model(name, args)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(params, images):
        return nnx.merge(graphdef, params, rest)(images)

    fwd_flops = perf.traced_flops(forward, params, images)
    step_s, compile_s, loss = time_step(forward, params, images, labels, args.steps)
    return _row(name, params, fwd_flops, step_s, compile_s, loss, args.batch)


def compare_reference(name: str, args: argparse.Namespace) -> list[dict]:
    """Our step and the reference-shaped computation's (reference_shapes.py) on the same
    weights, after checking that their logits agree. The two are timed in alternating rounds
    of --steps steps, so that a machine whose speed drifts (a shared VM) slows both alike;
    each figure is the median over all its rounds."""
    model, images, labels = _model(name, args)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    table, cfg = jnp.asarray(model.posemb()), model.cfg

    def ours(params, images):
        return nnx.merge(graphdef, params, rest)(images)

    def reference(params, images):
        return reference_shapes.forward(params, images, table, cfg)

    # The reference holds one array per layer, as the official code does (our stacked arrays
    # would make it slice them and re-stack their gradients inside its step).
    pure = layer_stack.unstack_layers(nnx.to_pure_dict(params))
    np.testing.assert_allclose(reference(pure, images[:2]), ours(params, images[:2]),
                               rtol=2e-3, atol=2e-3)
    runs = {}
    for key, forward, p in (("ours", ours, params), ("reference", reference, pure)):
        step, state, compile_s = compiled_step(forward, p, images, labels)
        runs[key] = dict(forward=forward, params=p, step=step, state=state, times=[],
                         compile_s=compile_s, flops=perf.traced_flops(forward, p, images))
    for _ in range(args.rounds):
        for run in runs.values():
            run["state"], loss, times = run_steps(run["step"], run["state"], images, labels,
                                                  args.steps)
            run["times"] += times
            run["loss"] = float(loss)
    return [_row(name if key == "ours" else f"{name} (reference)", run["params"],
                 run["flops"], statistics.median(run["times"]), run["compile_s"], run["loss"],
                 args.batch) for key, run in runs.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registry name, e.g. crate-alpha-b/16")
    parser.add_argument("--compare-to", default=None, help="a second model, e.g. vit-b/16")
    parser.add_argument("--compare-reference", action="store_true",
                        help="also time the reference implementations' computation "
                             "(reference_shapes.py) on the same weights; prints our / theirs")
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
    parser.add_argument("--steps", type=int, default=5, help="timed steps after compilation")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--compare-reference: alternating rounds of --steps steps each")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"batch {args.batch}, compute {args.dtype}, remat {args.remat or 'model default'}")
    if args.compare_reference:
        rows = compare_reference(args.model, args)
    else:
        rows = [measure(args.model, args)]
    if args.compare_to:
        rows.append(measure(args.compare_to, args))
    header = (f"{'model':<20} {'params':>12} {'fwd GFLOPs/img':>15} {'step ms':>9} "
              f"{'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'compile s':>9}")
    print(header)
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{r['name']:<20} {r['params']:>12,} {r['gflops']:>15.2f} {r['step_ms']:>9.1f} "
              f"{r['img_s']:>9.1f} {r['tflops']:>8.2f} {mfu:>6} {r['compile_s']:>9.1f}")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"{a['name']} / {b['name']}: step time ×{a['step_ms'] / b['step_ms']:.2f}, "
              f"forward FLOPs ×{a['gflops'] / b['gflops']:.2f}")
    if args.compare_reference:
        a, b = rows[0], rows[1]
        print(f"ratio (our step / reference step): {a['step_ms'] / b['step_ms']:.2f}")


if __name__ == "__main__":
    main()
