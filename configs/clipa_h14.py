"""CRATE-α-CLIPA-H/14 on DataComp-scale image-text data (CLIPA-v2 recipe, DESIGN.md §4).

pretrain: 84 px (36 patches) and 8 text tokens, batch 65,536, lr 1.024e-3, 1,600 warmup steps,
          cosine, weight decay 0.2, 12.8B samples seen.
finetune: 224 px and 32 tokens, batch 16,384, lr 5.12e-5, 800 warmup steps, 512M samples,
          starting from the pretrain run (position embeddings resized in 2-D).
Reported: 72.3 % zero-shot ImageNet-1K top-1.

    python -m crate_jax.main --config=configs/clipa_h14.py \
        --config.data.shards='gs://B/datacomp/{00000..12799}.tar' \
        --config.data.tokenizer=gs://B/tokenizers/datacomp_32k.model \
        --workdir=gs://B/runs/clipa_h14_pre
    python -m crate_jax.main \
        --config=configs/clipa_h14.py:stage=finetune,init_from=gs://B/runs/clipa_h14_pre \
        --config.data.shards=... --config.data.tokenizer=... --workdir=gs://B/runs/clipa_h14_ft

The tokenizer: `python -m crate_jax.data.tokenizer train --corpus SHARDS... --out PREFIX
--vocab-size 32000` on a sample of the captions.
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return config_utils.clipa_config(
        image="crate-alpha-h/14", text="text-h", embed_dim=1024, arg=arg,
        pretrain=dict(image_size=84, text_tokens=8, batch_size=65_536, lr=1.024e-3,
                      warmup_steps=1600, samples=12_800_000_000),
        finetune=dict(image_size=224, text_tokens=32, batch_size=16_384, lr=5.12e-5,
                      warmup_steps=800, samples=512_000_000))
