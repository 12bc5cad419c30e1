"""CRATE-α-CLIPA-B/16: the L/14 recipe (DESIGN.md §4) at base size, pretrained at 112 px (49
patches, CLIPA's resolution for /16 models) and finetuned at 224 px.

    python -m crate_jax.main --config=configs/clipa_b16.py:shards=...,tokenizer=... --workdir=...
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return config_utils.clipa_config(
        image="crate-alpha-b/16", text="text-b", embed_dim=512, arg=arg,
        pretrain=dict(image_size=112, text_tokens=32, batch_size=32_768, lr=1.024e-3,
                      warmup_steps=1600, samples=2_560_000_000),
        finetune=dict(image_size=224, text_tokens=32, batch_size=32_768, lr=5.12e-5,
                      warmup_steps=800, samples=512_000_000))
