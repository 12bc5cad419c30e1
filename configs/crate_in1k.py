"""CRATE-{T,S,B,L}/16 on ImageNet-1K from scratch (the CRATE paper's recipe).

Lion, lr 2.4e-4, weight decay 0.5, batch 2048, 5 warmup epochs then cosine, 150 epochs,
random crop + horizontal flip only, 224 px.

    python -m crate_jax.main --config=configs/crate_in1k.py:variant=B --workdir=gs://.../crate_b16
"""

import ml_collections

from crate_jax import config_utils

IMAGENET_TRAIN = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, variant="B", smoke=False)
    c = config_utils.base_config()
    c.trainer = "classification"
    c.model.name = f"crate-{args.variant.lower()}/16"
    c.model.overrides = ml_collections.ConfigDict(dict(pool="cls", dtype="bfloat16"))
    c.data = ml_collections.ConfigDict(dict(
        source="tfds", name="imagenet2012", image_size=224, num_classes=1000,
        data_dir=ml_collections.config_dict.placeholder(str),  # None: TFDS's default
        train_split="train", eval_split="validation", train_augment="inception_crop",
        num_workers=16))
    c.batch_size = 2048
    epochs = 150
    c.total_steps = epochs * IMAGENET_TRAIN // c.batch_size
    c.optim.update(name="lion", lr=2.4e-4, b1=0.9, b2=0.99, weight_decay=0.5, clip_norm=None,
                   schedule="cosine", warmup_steps=5 * IMAGENET_TRAIN // c.batch_size,
                   total_steps=c.total_steps, end_lr=0.0)
    c.eval_every = 5 * IMAGENET_TRAIN // c.batch_size
    c.log_every = 100
    c.checkpoint.update(every=2000, keep=2, keep_best=1, best_metric="val/top1")
    if args.smoke:
        config_utils.smoke(c)
    return c
