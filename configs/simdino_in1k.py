"""SimDINO self-supervised pretraining on ImageNet-1K ("Simplifying DINO via Coding Rate
Regularization", arXiv 2502.10385) as the official code runs it (RobinWu218/SimDINO: the
README's `main_dino.py --arch vit_base --patch_size 16 --local_crops_number 10 --eps 0.05
--coeff 1` on 8 GPUs, the other options at their argparse defaults), on any registry backbone.

    python -m crate_jax.main --config=configs/simdino_in1k.py:variant=vit-b/16 --workdir=...
    python -m crate_jax.main --config=configs/simdino_in1k.py:variant=crate-alpha-b/16 ...
    python -m crate_jax.main --config=configs/simdino_in1k.py:variant=crate-b/16 ...

The recipe: 2 global 224 px views (40–100 % of the image) and 10 local 96 px views (5–40 %),
flips, colour jitter 0.4/0.4/0.2/0.1 with p 0.8, grey scale p 0.2; an EMA teacher with
momentum 0.996 → 1 (cosine); AdamW (0.9, 0.999), lr 5e-4 × batch/256 after 10 warmup epochs,
cosine to 1e-6, weight decay 0.04, gradient clip 3.0, drop path 0.1, 100 epochs; batch 512
(64 per GPU × 8); a head of 2048 hidden units and a 256-d output. The loss
(crate_jax/tasks/simdino.py): −coeff·C − E with C the mean cosine of the student–teacher view
pairs and E = γ·½ logdet(I + k/(m·N·ε)·WᵀW) on (student + teacher)/2 of each global view
(expa_type=1), each data shard's covariance on its own (reduce_cov=0; the official code's per
GPU: on 8 devices each holds 64 rows, as there), ε = 0.05, γ = (k + N·m)/(k·N·m).
Where ours differs: a constant weight decay (DINO raises it from 0.04 to 0.4; the optimizer here
has no weight-decay schedule), no Gaussian blur or solarisation, and the local views' position
table resized bilinearly (DINO: bicubic). Evaluated by k-NN and a linear probe on the teacher
backbone's features.
"""

import ml_collections

from crate_jax import config_utils

IMAGENET_TRAIN = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, variant="vit-b/16", smoke=False)
    c = config_utils.base_config()
    c.trainer = "simdino"
    c.model.name = args.variant
    c.model.overrides = ml_collections.ConfigDict(dict(pool="cls", dtype="bfloat16",
                                                       drop_path_rate=0.1))
    c.head = ml_collections.ConfigDict(dict(hidden=2048, dim=256))
    c.teacher_momentum = 0.996
    c.teacher_momentum_end = 1.0
    c.eps = 0.05  # the README's --eps 0.05 (the argparse default, 0.5, is not the recipe)
    c.coeff = 1.0
    c.expa_type = 1  # expansion on (student + teacher)/2 of each global view
    c.reduce_cov = 0  # each data shard's covariance on its own (per GPU, as the official)
    c.data = ml_collections.ConfigDict(dict(
        source="tfds", name="imagenet2012", image_size=224, num_classes=1000,
        data_dir=ml_collections.config_dict.placeholder(str),  # None: TFDS's default
        train_split="train", eval_split="validation", num_workers=16,
        global_crops=2, local_crops=10, local_size=96, global_scale=(0.4, 1.0),
        local_scale=(0.05, 0.4), color_jitter=0.4, hue=0.1, jitter_prob=0.8,
        grayscale_prob=0.2))
    c.evals = ml_collections.ConfigDict(dict(
        probe=dict(kind="probe", split="validation", num_examples=10_000, train_split="train",
                   num_train_examples=50_000, num_classes=1000),
    ))
    c.batch_size = 512  # the official 64 per GPU × 8 GPUs
    c.eval_batch_size = 1024
    epochs = 100
    c.total_steps = epochs * IMAGENET_TRAIN // c.batch_size
    c.optim.update(name="adamw", lr=5e-4 * c.batch_size / 256, b1=0.9, b2=0.999,
                   weight_decay=0.04, clip_norm=3.0, schedule="cosine",
                   warmup_steps=10 * IMAGENET_TRAIN // c.batch_size, total_steps=c.total_steps,
                   end_lr=1e-6)
    c.eval_every = 10 * IMAGENET_TRAIN // c.batch_size
    c.log_every = 100
    c.checkpoint.update(every=2000, keep=2, keep_best=1, best_metric="probe/knn_top1")
    if args.smoke:
        config_utils.smoke_simdino(c)
    return c
