"""SimDINO self-distillation of a small CRATE on the built-in synthetic shapes, on a CPU.

    python -m crate_jax.main --config=configs/demo_simdino.py

Student and EMA teacher see 2 global 32 px views of each image (the labels are never used for
training). Reported: the k-NN and linear probe of the teacher's features on the 8 shape classes
next to the same probes of the backbone at its random initialisation, and the coding rate of
the features (near 0 would mean collapse). `:smoke` shrinks it to seconds.

Choices made for this data, each measured on the 2-core machine with the earlier objective
(expansion on the student alone, ε² = 0.5, γ = 0.02; the official recipe's objective, which the
task now computes, has not been re-measured here):
- Local views are off (data.local_crops=0): at 16 px and patch 8 a local view is 4 tokens,
  and with 2 of them the k-NN probe fell below the random initialisation's (0.162 against
  0.170 after 500 steps). `:smoke` keeps 2, so the suite still runs the multi-crop path.
- The backbone is CRATE (MSSA + ISTA), learning rate 5e-4. With the same recipe a CRATE-α of
  the same size (MSSA + ODL) did not learn features a k-NN can use: k-NN 0.18 against its random
  initialisation's 0.17 at lr 5e-4, 0.17 against 0.17 at 2e-3; CRATE reached 0.26 against 0.16
  in 800 steps, and a ViT of the same size 0.29 against 0.17 (0.20 at lr 2e-3).
- The shapes stand on plain grey (data.background='plain'). The default textured background
  is unique to each image and survives every crop and colour jitter: it tells two views of
  one image apart from the others without any shape in it.
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, smoke=False)
    c = config_utils.base_config()
    c.trainer = "simdino"
    c.model.name = "crate-t/8"
    c.model.overrides = ml_collections.ConfigDict(dict(width=96, depth=3, heads=4, pool="gap"))
    c.head = ml_collections.ConfigDict(dict(hidden=256, dim=64))
    c.teacher_momentum = 0.99
    c.teacher_momentum_end = 1.0
    c.eps = 0.05  # the official recipe's objective (tasks/simdino.py)
    c.coeff = 1.0
    c.expa_type = 1
    c.reduce_cov = 0
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic_shapes", background="plain", image_size=32, num_classes=8,
        num_train_examples=20_000,
        num_eval_examples=1_000, train_split="train", eval_split="test", num_workers=0,
        global_crops=2, local_crops=0, local_size=16, global_scale=(0.3, 1.0),
        local_scale=(0.2, 0.5), color_jitter=0.4, hue=0.5, jitter_prob=0.8,
        grayscale_prob=0.2,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    c.evals = ml_collections.ConfigDict(dict(
        probe=dict(kind="probe", split="test", num_examples=500, train_split="train",
                   num_train_examples=2_000, num_classes=8, random_init=True),
    ))
    c.batch_size = 64
    c.eval_batch_size = 250
    c.total_steps = 750
    c.log_every = 100
    c.eval_every = 375
    c.optim.update(name="adamw", lr=5e-4, b1=0.9, b2=0.99, weight_decay=0.04,
                   warmup_steps=60, total_steps=c.total_steps, schedule="cosine", clip_norm=3.0)
    c.checkpoint.update(every=375, keep=2, keep_best=1, best_metric="probe/knn_top1")
    if args.smoke:
        config_utils.smoke_simdino(c)
    return c
