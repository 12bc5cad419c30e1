"""CRATE-MAE-{T,S,B,L}/16 masked-autoencoder pretraining on ImageNet-1K (CRATE-MAE, "Masked
Completion via Structured Diffusion with White-Box Transformers"), and the ViT-MAE baseline.

    python -m crate_jax.main --config=configs/crate_mae_in1k.py:variant=B --workdir=gs://.../mae_b
    python -m crate_jax.main --config=configs/crate_mae_in1k.py:variant=B,family=vit ...

From docs/design.md §1 and the official crate_ae: the CRATE encoder (ISTA λ = 0.5) and its
transposed decoder of the same size, a conv stem, mask tokens inside the encoder, MAE's fixed
2-D sin-cos positions, 75 % of the patches masked (MAE's count, N − int(N·0.25)), MSE on the
masked patches. Where docs/design.md and the papers leave it open, MAE's recipe is used (my choice,
since CRATE-MAE builds on MAE's code): normalised pixel targets (unbiased variance, as MAE),
AdamW (b2 0.95), lr 1.5e-4 × batch/256, weight decay 0.05, batch 4096, 40 warmup epochs of
800, cosine to 0, random resized crops of 20–100 % of the image plus flips. Finetune the
encoder into a classifier with init_from=<this run>, init_prefix='backbone' and the classifier
model 'crate-<size>/16' with stem='conv', posemb='sincos2d_mae', lam=0.5, head_norm_eps=1e-6,
pool='gap'. The released CRATE-MAE-B imports as such a run:
`python -m crate_jax.convert import --from crate-mae-torch FILE RUN_DIR`.
"""

import ml_collections

from crate_jax import config_utils

IMAGENET_TRAIN = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, variant="B", family="crate", smoke=False)
    if args.family not in ("crate", "vit"):
        raise ValueError(f"config argument family={args.family!r}: 'crate' or 'vit'")
    c = config_utils.base_config()
    c.trainer = "mae"
    c.model.name = f"{args.family}-mae-{args.variant.lower()}/16"
    config_utils.mae_model_fields(c)
    c.model.overrides = ml_collections.ConfigDict(dict(dtype="bfloat16"))
    c.mask_ratio = 0.75
    c.norm_pix_loss = True
    c.data = ml_collections.ConfigDict(dict(
        source="tfds", name="imagenet2012", image_size=224, num_classes=1000,
        data_dir=ml_collections.config_dict.placeholder(str),  # None: TFDS's default
        train_split="train", eval_split="validation", train_augment="inception_crop",
        num_workers=16))
    c.evals = ml_collections.ConfigDict(dict(
        reconstruction=dict(kind="reconstruction", split="validation", num_examples=10_000,
                            figure_images=8),
        probe=dict(kind="probe", split="validation", num_examples=10_000,
                   train_split="train", num_train_examples=50_000, num_classes=1000),
    ))
    c.batch_size = 4096
    c.eval_batch_size = 1024
    epochs = 800
    c.total_steps = epochs * IMAGENET_TRAIN // c.batch_size
    c.optim.update(name="adamw", lr=1.5e-4 * c.batch_size / 256, b1=0.9, b2=0.95,
                   weight_decay=0.05, clip_norm=None, schedule="cosine",
                   warmup_steps=40 * IMAGENET_TRAIN // c.batch_size, total_steps=c.total_steps,
                   end_lr=0.0)
    c.eval_every = 20 * IMAGENET_TRAIN // c.batch_size
    c.log_every = 100
    c.checkpoint.update(every=2000, keep=2, keep_best=1, best_metric="reconstruction/mse",
                        best_mode="min")
    if args.smoke:
        config_utils.smoke_mae(c)
    return c
