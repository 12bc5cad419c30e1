"""CRATE-α finetuning on ImageNet-1K from an ImageNet-21K pretrain (docs/design.md §4).

Same optimiser as the pretrain (Adam b1 0.9, b2 0.95, weight decay 0.1, clip 1.0), peak lr
1.6e-4, RandAugment(2, 9), label smoothing 0.1, a re-initialised head, 91 epochs, 224 px. The
pretrained position embedding is resized in 2-D (the cls row kept apart) and, when the patch
size changes, the stem kernel is resized too (FlexiViT's pseudo-inverse resize): pretraining
at L/32 and finetuning at L/14 or L/8 is the paper's efficient scaling recipe.

    --config=configs/crate_alpha_in1k.py:variant=L/8,init_from=gs://.../crate_alpha_l32_in21k
"""

import ml_collections

from crate_jax import config_utils

IMAGENET_TRAIN = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, variant="B/16", init_from="", smoke=False)
    c = config_utils.base_config()
    c.trainer = "classification"
    c.model.name = f"crate-alpha-{args.variant.lower()}"
    c.model.overrides = ml_collections.ConfigDict(dict(pool="cls", dtype="bfloat16"))
    c.data = ml_collections.ConfigDict(dict(
        source="tfds", name="imagenet2012", image_size=224, num_classes=1000,
        data_dir=ml_collections.config_dict.placeholder(str),  # None: TFDS's default
        train_split="train", eval_split="validation", train_augment="inception_crop",
        randaugment=(2, 9), num_workers=32))
    c.init_from = args.init_from or None
    c.reinit_head = True
    c.batch_size = 4096
    epochs = 91
    steps_per_epoch = IMAGENET_TRAIN // c.batch_size
    c.total_steps = epochs * steps_per_epoch
    c.label_smoothing = 0.1
    c.optim.update(name="adamw", lr=1.6e-4, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0,
                   schedule="cosine", warmup_steps=5 * steps_per_epoch,
                   total_steps=c.total_steps, end_lr=1e-6)
    c.eval_every = 5 * steps_per_epoch
    c.checkpoint.update(every=1000, keep=2, keep_best=1, best_metric="val/top1")
    if args.smoke:
        config_utils.smoke(c)
    return c
