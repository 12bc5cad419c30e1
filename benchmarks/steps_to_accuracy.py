"""Steps to reach a validation accuracy on the synthetic shapes, per model family at one size:
does CRATE / CRATE-α start as fast as a ViT of the same width and depth?

    python benchmarks/steps_to_accuracy.py [--steps 500] [--every 50] [--target 0.5]

Trains configs/demo_classification.py (8 classes, 32 px, batch 64) with each model for --steps
steps, evaluating every --every steps on 500 held-out images, and prints the first evaluated
step at which val/top1 reaches --target, with the whole accuracy curve. Each family starts from
its own reference initialisation (docs/design.md §1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # the same width, depth and heads; the ViT's MLP is 4 × width
    "crate-alpha": ("crate-alpha-ti/8", {}),
    "vit": ("vit-ti/8", {"mlp_dim": 256}),
    "crate": ("crate-t/8", {}),
}


def curve(name: str, overrides: dict, steps: int, every: int) -> list[tuple[int, float]]:
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import demo_classification

    from crate_jax.train.loop import train_and_evaluate

    config = demo_classification.get_config()
    config.model.name = name
    config.model.overrides = {"width": 64, "depth": 4, "heads": 2, **overrides}
    config.total_steps = config.optim.total_steps = steps
    config.eval_every = every
    config.log_every = every
    config.data.num_eval_examples = 500
    config.checkpoint.every = steps
    config.checkpoint.async_save = False
    config.measure_flops = False
    config.tensorboard = False
    with tempfile.TemporaryDirectory() as workdir:
        train_and_evaluate(config, workdir)
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r["val/top1"]) for r in rows if "val/top1" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    for family in args.models.split(","):
        name, overrides = MODELS[family]
        t0 = time.perf_counter()
        points = curve(name, overrides, args.steps, args.every)
        reached = next((s for s, acc in points if acc >= args.target), None)
        print(f"{family:12s} steps to {args.target:.0%}: "
              f"{reached if reached is not None else f'> {args.steps}'}  "
              f"({time.perf_counter() - t0:.0f} s)  curve: "
              + " ".join(f"{s}:{acc:.2f}" for s, acc in points), flush=True)


if __name__ == "__main__":
    main()
