"""CRATE-MAE on the built-in synthetic shapes, on a CPU in a few minutes.

    python -m crate_jax.main --config=configs/demo_mae.py

A small CRATE masked autoencoder (the official crate_ae design: encoder and its transposed
CRATE decoder, conv stem, mask tokens inside the encoder, MAE's fixed 2-D sin-cos positions)
learns to fill in the hidden half of the 4×4 patches of 32 px shape images. The mask ratio
is 0.5, not the recipe's 0.75: of 64 patches, 0.75 would leave 16 visible, and a shape
covering 10–30 % of the image would be mostly hidden. It reports the held-out masked-patch MSE
next to the MSE of predicting each image's mean colour, a k-NN / linear probe of the frozen
encoder on the 8 shape classes (chance 1/8), and writes WORKDIR/reconstruction.png.
`:smoke` shrinks it to seconds.
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, smoke=False)
    c = config_utils.base_config()
    c.trainer = "mae"
    c.model.name = "crate-mae-t/4"
    config_utils.mae_model_fields(c)
    c.model.overrides = ml_collections.ConfigDict(dict(width=96, depth=4, heads=4))
    c.mask_ratio = 0.5
    c.norm_pix_loss = False
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic_shapes", image_size=32, num_classes=8, num_train_examples=20_000,
        num_eval_examples=1_000, train_split="train", eval_split="test", train_augment="flip",
        num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    c.evals = ml_collections.ConfigDict(dict(
        reconstruction=dict(kind="reconstruction", split="test", num_examples=500,
                            figure_images=8),
        probe=dict(kind="probe", split="test", num_examples=500, train_split="train",
                   num_train_examples=2_000, num_classes=8),
    ))
    c.batch_size = 64
    c.eval_batch_size = 250
    c.total_steps = 400
    c.log_every = 100
    c.eval_every = 200
    c.optim.update(name="adamw", lr=3e-3, b1=0.9, b2=0.95, weight_decay=0.05,
                   warmup_steps=50, total_steps=c.total_steps, schedule="cosine", clip_norm=1.0)
    c.checkpoint.update(every=200, keep=2, keep_best=1, best_metric="reconstruction/mse",
                        best_mode="min")
    if args.smoke:
        config_utils.smoke_mae(c)
    return c
