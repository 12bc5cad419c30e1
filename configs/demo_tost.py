"""ToST against CRATE of the same width on the synthetic shapes at a resolution where MSSA's
N×N attention dominates: patch 8 on 384 px images, 2,304 tokens (CRATE: 2,305 with its cls).

One run per model (the trainer runs one config):

    python -m crate_jax.main --config=configs/demo_tost.py:model=tost
    python -m crate_jax.main --config=configs/demo_tost.py:model=crate

or both, one after the other, then a table of accuracy, step time and peak memory:

    python configs/demo_tost.py [smoke]          # runs/demo_tost_{tost,crate}[_smoke]

Peak memory is XLA's plan for the compiled train step (memory_analysis(): temporaries +
arguments), the same on any machine; step time is the median of the logged step times.
`:smoke` (or `smoke` to the script) shrinks either run to seconds (16 px, 4 steps).
"""

import json
import os
import statistics
import sys

import ml_collections

from crate_jax import config_utils

MODELS = {
    # ToST-T/8's family at width 64 (4 TSSA layers, 2 class-attention blocks)
    "tost": ("tost-t-12/8", dict(width=64, depth=4, heads=4, layer_scale_init=1.0)),
    # CRATE of the same width and depth: MSSA forms a (1 + N)×(1 + N) map per head
    "crate": ("crate-t/8", dict(width=64, depth=4, heads=4)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, smoke=False, model="tost")
    if args.model not in MODELS:
        raise ValueError(f"config argument model={args.model!r}: one of {sorted(MODELS)}")
    c = config_utils.base_config()
    c.trainer = "classification"
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic_shapes", image_size=384, num_classes=8, num_train_examples=20_000,
        num_eval_examples=128, train_split="train", eval_split="test",
        train_augment="flip", num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    c.batch_size = 8
    c.eval_batch_size = 16
    c.total_steps = 30
    c.log_every = 5
    c.eval_every = 0
    c.optim.update(name="adamw", lr=2e-3, b2=0.99, weight_decay=0.05, warmup_steps=5,
                   total_steps=c.total_steps, schedule="cosine", clip_norm=1.0)
    c.checkpoint.update(every=30, keep=1, keep_best=0)
    if args.smoke:
        config_utils.smoke(c, model_name="crate-t/8")
        c.data.image_size = 16
    name, overrides = MODELS[args.model]
    c.model.name = name
    c.model.overrides = ml_collections.ConfigDict(
        dict(overrides, **(dict(width=32, depth=2, heads=2) if args.smoke else {})))
    return c


def _peak_bytes(config: ml_collections.ConfigDict) -> int:
    """XLA's planned temporaries + arguments of the compiled train step (a cache hit: the
    run compiled the same step)."""
    from crate_jax.parallel import make_mesh
    from crate_jax.train.state import build_train_state

    state = build_train_state(config, make_mesh(config.get("mesh", {"fsdp": -1})))
    memory = state.compile(count_flops=False)[0].memory_analysis()
    return int(memory.temp_size_in_bytes + memory.argument_size_in_bytes)


def compare(smoke: bool = False, root: str = "runs") -> dict[str, dict]:
    """Train both models (resuming finished runs does nothing), then print and return
    {model: {'val/top1', 'step_s', 'peak_bytes', 'tokens'}}."""
    import jax

    from crate_jax.train.loop import train_and_evaluate

    # the second compile of each step (for its memory analysis) comes from this cache
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, ".demo_tost_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    results = {}
    for model in MODELS:
        config = get_config(f"model={model}" + (",smoke" if smoke else ""))
        workdir = os.path.join(root, f"demo_tost_{model}" + ("_smoke" if smoke else ""))
        final = train_and_evaluate(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            times = [row["perf/step_time_s"] for row in map(json.loads, f)
                     if "perf/step_time_s" in row]
        grid = config.data.image_size // 8
        results[model] = {"val/top1": final.get("val/top1"), "tokens": grid * grid,
                          "step_s": statistics.median(times) if times else None,
                          "peak_bytes": _peak_bytes(config)}
    print(f"{'model':6} {'tokens':>7} {'val top1':>9} {'step s':>8} {'peak MiB':>9}")
    for model, r in results.items():
        step = "-" if r["step_s"] is None else f"{r['step_s']:.3f}"
        print(f"{model:6} {r['tokens']:>7,} {r['val/top1']:>9.3f} {step:>8} "
              f"{r['peak_bytes'] / 2**20:>9.1f}")
    return results


if __name__ == "__main__":
    compare(smoke=sys.argv[1:] == ["smoke"])
