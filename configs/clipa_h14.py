"""CRATE-α-CLIPA-H/14: the L/14 recipe (configs/clipa_l14.py, docs/design.md §4) with the H/14 image
tower (1280 × 32, 16 heads) and the CLIPA-v2 H/14 schedule.

pretrain: 84 px (36 patches) and 8 text tokens, batch 65,536, 12.8B samples seen (CLIPA-v2);
          lr 1.024e-3, 1,600 warmup steps, cosine, weight decay 0.2, b2 0.95, bf16 first moment,
          clip 1.0 (the L/14 values: the CRATE-α paper publishes no separate H/14 optimiser
          settings). Text tower "H" frozen with the temperature, cls pooling, embedding 1,024,
          BERT vocabulary, as for L/14.
finetune: 224 px and 32 tokens, batch 16,384, lr 5.12e-5, 800 warmup steps, 512M samples,
          starting from the pretrain run (position embeddings resized in 2-D).
Reported: 72.3 % zero-shot ImageNet-1K top-1.

    python -m crate_jax.main --config=configs/clipa_h14.py:text_from=runs/clipa_h14_release \\
        --config.data.shards='gs://B/datacomp/{00000..12799}.tar' \\
        --config.data.tokenizer=gs://B/bert-base-uncased/vocab.txt \\
        --workdir=gs://B/runs/clipa_h14_pre
    python -m crate_jax.main \\
        --config=configs/clipa_h14.py:stage=finetune,init_from=gs://B/runs/clipa_h14_pre \\
        --config.data.shards=... --config.data.tokenizer=... --workdir=gs://B/runs/clipa_h14_ft

runs/clipa_h14_release: `python -m crate_jax.convert import --from crate-alpha-clipa-torch
crate_alpha_CLIPA_H14.pth runs/clipa_h14_release` (its text tower is the one L/14 uses).
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return config_utils.clipa_config(
        image="crate-alpha-h/14", text="clipa-text-h", embed_dim=1024, arg=arg,
        pretrain=dict(image_size=84, text_tokens=8, batch_size=65_536, lr=1.024e-3,
                      warmup_steps=1600, samples=12_800_000_000),
        finetune=dict(image_size=224, text_tokens=32, batch_size=16_384, lr=5.12e-5,
                      warmup_steps=800, samples=512_000_000))
