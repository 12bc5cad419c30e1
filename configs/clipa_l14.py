"""CRATE-α-CLIPA-L/14 (the CRATE-α paper's CLIPA recipe, DESIGN.md §4).

pretrain: 84 px (36 patches), 32 text tokens, batch 32,768, lr 1.024e-3, 1,600 warmup steps,
          cosine, weight decay 0.2, about 2.56B samples seen.
finetune: 224 px, lr 5.12e-5, 800 warmup steps, about 512M samples, from the pretrain run.
Reported: 69.8 % zero-shot ImageNet-1K top-1. The paper's variant loads and freezes a pretrained
text tower: add `text_from=RUN` (another CLIPA run whose 'text' tower is copied and frozen).

    python -m crate_jax.main --config=configs/clipa_l14.py:shards=...,tokenizer=... --workdir=...
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return config_utils.clipa_config(
        image="crate-alpha-l/14", text="text-l", embed_dim=768, arg=arg,
        pretrain=dict(image_size=84, text_tokens=32, batch_size=32_768, lr=1.024e-3,
                      warmup_steps=1600, samples=2_560_000_000),
        finetune=dict(image_size=224, text_tokens=32, batch_size=32_768, lr=5.12e-5,
                      warmup_steps=800, samples=512_000_000))
