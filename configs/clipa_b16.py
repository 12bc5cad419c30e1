"""CRATE-α-CLIPA-B/16: the L/14 recipe (configs/clipa_l14.py, docs/design.md §4) with the B/16 image
tower, pretrained at 112 px (49 patches, CLIPA's resolution for /16 models) and finetuned at
224 px. As in the official config's size table, B also projects to 1,024 against text "H".
No B/16 result is published; the numbers here are the L/14 recipe's.

    python -m crate_jax.main --config=configs/clipa_b16.py:text_from=RUN,shards=...,tokenizer=...
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return config_utils.clipa_config(
        image="crate-alpha-b/16", text="clipa-text-h", embed_dim=1024, arg=arg,
        pretrain=dict(image_size=112, text_tokens=32, batch_size=32_768, lr=1.024e-3,
                      warmup_steps=1600, samples=2_560_000_000),
        finetune=dict(image_size=224, text_tokens=32, batch_size=32_768, lr=5.12e-5,
                      warmup_steps=800, samples=512_000_000))
