"""Forward+backward step time and forward GFLOPs for any registry model.

    python benchmarks/model_step.py --model crate-alpha-b/32 --batch 8 --compare-to vit-b/32
    python benchmarks/model_step.py --model crate-alpha-l/14 --batch 128 --dtype bfloat16 \
        --attention-impl cudnn           # on a GPU

A step is loss → gradients → SGD update, one jax.jit with the parameters donated. The time is
the median of --steps steps after compilation. GFLOPs/img is XLA's cost analysis of the
forward divided by the batch; MFU uses 3 × forward FLOPs (DESIGN.md §6) and is printed where
the accelerator's peak is known.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax import models, perf


def measure(name: str, args: argparse.Namespace) -> dict:
    overrides = dict(num_classes=args.num_classes, dtype=args.dtype, remat=args.remat,
                     attention_impl=args.attention_impl)
    if args.image_size:
        overrides["image_size"] = args.image_size
    model = models.create(name, **overrides)
    cfg = model.cfg
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, cfg.image_size, cfg.image_size, 3)),
                         jnp.float32)
    labels = jnp.asarray(rng.integers(0, cfg.num_classes, args.batch))

    def forward(params, images):
        return nnx.merge(graphdef, params, rest)(images)

    def loss_fn(params, images, labels):
        logits = forward(params, images)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    def step(params, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        params = jax.tree.map(lambda p, g: p - 1e-4 * g.astype(p.dtype), params, grads)
        return params, loss

    step = jax.jit(step, donate_argnums=0)
    fwd_flops = perf.traced_flops(forward, params, images)
    t0 = time.perf_counter()
    params, loss = step(params, images, labels)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        params, loss = step(params, images, labels)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    mfu = perf.mfu(3 * fwd_flops, step_s, num_devices=1)
    return dict(name=name, params=models.count_params(model), gflops=fwd_flops / args.batch / 1e9,
                step_ms=step_s * 1e3, img_s=args.batch / step_s, compile_s=compile_s,
                tflops=3 * fwd_flops / step_s / 1e12, mfu=mfu, loss=float(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registry name, e.g. crate-alpha-b/16")
    parser.add_argument("--compare-to", default=None, help="a second model, e.g. vit-b/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None, help="default: 224")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype (parameters stay float32)")
    parser.add_argument("--remat", default="none", choices=["none", "dots", "full"])
    parser.add_argument("--attention-impl", default=None, choices=[None, "xla", "cudnn"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after compilation")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"batch {args.batch}, compute {args.dtype}, remat {args.remat}")
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
    if len(rows) == 2:
        a, b = rows
        print(f"{a['name']} / {b['name']}: step time ×{a['step_ms'] / b['step_ms']:.2f}, "
              f"forward FLOPs ×{a['gflops'] / b['gflops']:.2f}")


if __name__ == "__main__":
    main()
