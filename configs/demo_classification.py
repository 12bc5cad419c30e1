"""A small CRATE-α learning the synthetic shapes dataset on a CPU in a few minutes.

    python -m crate_jax.main --config=configs/demo_classification.py \
        --workdir=runs/demo_classification
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, smoke=False)
    c = config_utils.base_config()
    c.trainer = "classification"
    c.model.name = "crate-alpha-ti/8"
    c.model.overrides = ml_collections.ConfigDict(dict(width=64, depth=4, heads=2))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic_shapes", image_size=32, num_classes=8, num_train_examples=20_000,
        num_eval_examples=1_000, train_split="train", eval_split="test",
        train_augment="flip", num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    c.batch_size = 64
    c.eval_batch_size = 200
    c.total_steps = 1500
    c.log_every = 100
    c.eval_every = 750
    c.optim.update(name="adamw", lr=2e-3, b2=0.99, weight_decay=0.05, warmup_steps=100,
                   total_steps=c.total_steps, schedule="cosine", clip_norm=1.0)
    c.checkpoint.update(every=750, keep=2, keep_best=1, best_metric="val/top1")
    if args.smoke:
        config_utils.smoke(c)
    return c
