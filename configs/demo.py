"""The main demo: a small CRATE-α CLIPA model on the built-in synthetic image-caption set.

    python -m crate_jax.main --config=configs/demo.py

Images are shapes on textured backgrounds, captions describe them ("a large red circle left of a
small blue star"). Eight (colour, shape) pairs never appear in training; zero-shot
classification of test images of exactly those pairs measures compositional generalisation
(chance: 1/8 among the held-out classes, 1/64 among all). Retrieval recall@1/5/10 runs on the
test captions. Runs on a 2-core CPU in a few minutes; nothing is downloaded.
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, smoke=False)
    c = config_utils.base_config()
    c.trainer = "contrastive"
    c.loss = "infonce"
    c.model = ml_collections.ConfigDict(dict(
        image="crate-alpha-ti/8", image_overrides=dict(width=64, depth=3, heads=2, pool="gap"),
        text="crate-alpha-text-ti", text_overrides=dict(width=64, depth=2, heads=2, pool="eot"),
        embed_dim=64))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic_captions", image_size=32, holdout_pairs=8, seed=0,
        num_train_examples=50_000, tokenizer="builtin:shapes_captions", context_length=16,
        text_tokens=16,
        text_reduction="truncate", num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    c.image_reduction = ml_collections.ConfigDict(dict(strategy="none", keep=1.0))
    c.evals = ml_collections.ConfigDict(dict(
        zeroshot_heldout=dict(kind="zeroshot", source="synthetic_captions", split="test",
                              holdout_pairs=8, heldout_only=True, num_examples=400),
        zeroshot_heldout_all64=dict(kind="zeroshot", source="synthetic_captions", split="test",
                                    holdout_pairs=8, num_examples=400),
        retrieval=dict(kind="retrieval", source="synthetic_captions", split="test",
                       holdout_pairs=0, num_examples=400),
        probe=dict(kind="probe", source="synthetic_captions", split="test", holdout_pairs=0,
                   train_split="train", num_examples=1000, num_classes=64),
    ))
    c.batch_size = 128
    c.eval_batch_size = 200
    c.total_steps = 800
    c.log_every = 100
    c.eval_every = 400
    c.optim.update(name="adamw", lr=2e-3, b2=0.98, weight_decay=0.1, warmup_steps=100,
                   total_steps=c.total_steps, schedule="cosine", clip_norm=1.0)
    c.checkpoint.update(every=400, keep=2, keep_best=1, best_metric="zeroshot_heldout/top1")
    if args.smoke:
        config_utils.smoke_clip(c, probe=True)
    return c
