"""CRATE-α-CLIPA-L/14 as the official config runs it (docs/design.md §4,
configs/crate/clipa/84_32_pre_training.py of the CRATE-α repository).

pretrain: 84 px (36 patches), 32 text tokens, batch 32,768, lr 1.024e-3 (8e-6 × 64 × 2), 1,600
          warmup steps, cosine to 0, weight decay 0.2, Adam b1 0.9 / b2 0.95 with a bf16 first
          moment, clip 1.0, about 2.56B samples seen (2,000 virtual ImageNet epochs). Text tower
          "H" (1024 × 24, 16 heads, bidirectional, last-position pooling) loaded and frozen
          together with the temperature; image pooling on the cls token; both towers projected
          to 1,024; BERT-base uncased WordPiece vocabulary; shuffle buffer 250,000 samples.
finetune: 224 px, lr 5.12e-5, 800 warmup steps, about 512M samples, from the pretrain run.
Reported: 69.8 % zero-shot ImageNet-1K top-1.

    python -m crate_jax.convert import --from crate-alpha-clipa-torch \\
        crate_alpha_CLIPA_L14.pth runs/clipa_l14_release        # the text tower to freeze
    python -m crate_jax.main --config=configs/clipa_l14.py:text_from=runs/clipa_l14_release \\
        --config.data.shards='gs://B/datacomp/{00000..12799}.tar' \\
        --config.data.tokenizer=gs://B/bert-base-uncased/vocab.txt --workdir=gs://B/runs/l14
"""

import ml_collections

from crate_jax import config_utils


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return config_utils.clipa_config(
        image="crate-alpha-l/14", text="clipa-text-h", embed_dim=1024, arg=arg,
        pretrain=dict(image_size=84, text_tokens=32, batch_size=32_768, lr=1.024e-3,
                      warmup_steps=1600, samples=2_560_000_000),
        finetune=dict(image_size=224, text_tokens=32, batch_size=32_768, lr=5.12e-5,
                      warmup_steps=800, samples=512_000_000))
