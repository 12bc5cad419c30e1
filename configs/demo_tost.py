"""ToST against CRATE of the same width on the synthetic shapes at a resolution where MSSA's
N×N attention dominates: patch 8 on 384 px images, 2,304 tokens (CRATE: 2,305 with its cls).

    python -m crate_jax.main --config=configs/demo_tost.py          # both, then the comparison
    python -m crate_jax.main --config=configs/demo_tost.py:model=tost   # one of them alone

Both models train one after the other on the same batches (crate_jax/study.py: WORKDIR/tost,
WORKDIR/crate), then a table of validation top-1, the median logged step time and the step's
memory (XLA's planned peak per device for the compiled train step, the same on any machine of
one backend) is printed and written to WORKDIR/comparison.json. `:smoke` shrinks the runs to
seconds (16 px, 4 steps).

It compares cost, not accuracy: 12 steps of 4 images is what fits 5 minutes on a 2-core CPU,
where one CRATE step at 2,305 tokens takes seconds; neither model learns the 8 classes at this
budget (validation top-1 near the chance level, 0.125, on 32 held-out images).
"""

import ml_collections

from crate_jax import config_utils

MODELS = {
    # ToST-T/8's family at width 64 (4 TSSA layers, 2 class-attention blocks)
    "tost": ("tost-t-12/8", dict(width=64, depth=4, heads=4, layer_scale_init=1.0)),
    # CRATE of the same width and depth: MSSA forms a (1 + N)×(1 + N) map per head
    "crate": ("crate-t/8", dict(width=64, depth=4, heads=4)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, smoke=False, model="both")
    if args.model not in (*MODELS, "both"):
        raise ValueError(f"config argument model={args.model!r}: one of "
                         f"{[*sorted(MODELS), 'both']}")
    c = config_utils.base_config()
    c.trainer = "classification"
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic_shapes", image_size=384, num_classes=8, num_train_examples=20_000,
        num_eval_examples=32, train_split="train", eval_split="test",
        train_augment="flip", num_workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    c.batch_size = 4
    c.eval_batch_size = 16
    c.total_steps = 12
    c.log_every = 4
    c.eval_every = 0
    c.optim.update(name="adamw", lr=2e-3, b2=0.99, weight_decay=0.05, warmup_steps=2,
                   total_steps=c.total_steps, schedule="cosine", clip_norm=1.0)
    c.checkpoint.update(every=12, keep=1, keep_best=0)
    if args.smoke:
        config_utils.smoke(c, model_name="crate-t/8")
        c.data.image_size = 16
    size = dict(width=32, depth=2, heads=2) if args.smoke else {}
    name, overrides = MODELS["tost" if args.model == "both" else args.model]
    c.model.name = name
    c.model.overrides = ml_collections.ConfigDict(dict(overrides, **size))
    if args.model == "both":  # crate_jax/study.py trains each, then prints the comparison
        c.study = ml_collections.ConfigDict(dict(models={
            model: dict(name=registry, overrides=dict(model_overrides, **size))
            for model, (registry, model_overrides) in MODELS.items()}))
    return c
