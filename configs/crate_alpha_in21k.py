"""CRATE-α pretraining on ImageNet-21K (the CRATE-α paper's recipe; docs/design.md §4).

224 px, batch 4096, Adam (b1 0.9, b2 0.95), peak lr 8e-4, 10 warmup epochs, cosine to 1e-6,
weight decay 0.1, gradient clip 1.0, mixup 0.8 / cutmix 1.0, 91 epochs.

    --config=configs/crate_alpha_in21k.py:variant=B/16      (also L/14, L/32 for efficient scaling)

ImageNet-21K has no canonical TFDS builder: point data.name / data.data_dir at yours (a TFDS
builder, or data.source='folder' with ROOT/train/CLASS/*.jpg).
"""

import ml_collections

from crate_jax import config_utils

IMAGENET21K_TRAIN = 13_153_500  # the usual fall11 split minus the held-out images
IMAGENET21K_CLASSES = 21_843


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, variant="B/16", smoke=False)
    c = config_utils.base_config()
    c.trainer = "classification"
    c.model.name = f"crate-alpha-{args.variant.lower()}"
    c.model.overrides = ml_collections.ConfigDict(dict(pool="cls", dtype="bfloat16",
                                                       remat="none"))
    c.data = ml_collections.ConfigDict(dict(
        source="tfds", name="imagenet21k", image_size=224,
        data_dir=ml_collections.config_dict.placeholder(str),  # None: TFDS's default
        num_classes=IMAGENET21K_CLASSES, train_split="train", eval_split="validation",
        train_augment="inception_crop", num_workers=32))
    c.batch_size = 4096
    epochs = 91
    steps_per_epoch = IMAGENET21K_TRAIN // c.batch_size
    c.total_steps = epochs * steps_per_epoch
    c.loss = "softmax"
    c.mixup, c.cutmix = 0.8, 1.0
    c.optim.update(name="adamw", lr=8e-4, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0,
                   schedule="cosine", warmup_steps=10 * steps_per_epoch,
                   total_steps=c.total_steps, end_lr=1e-6)
    c.eval_every = 5 * steps_per_epoch
    c.checkpoint.update(every=2000, keep=2, keep_best=1, best_metric="val/top1")
    if args.smoke:
        config_utils.smoke(c)
    return c
