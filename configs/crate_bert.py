"""CRATE-BERT: the journal paper's bidirectional CRATE trained by masked language modelling, with
BERT's recipe, at the BERT sizes.

    # a BERT vocab.txt (bert-base-uncased's, 30,522 ids) and the corpus (Wikipedia + BookCorpus
    # as text files / .jsonl, or token-stream ArrayRecord from crate_jax.data.text_sources)
    python -m crate_jax.main --config=configs/crate_bert.py:variant=base,seq_len=128 \
        --config.data.train_path=data/bert/train.array_record \
        --config.data.eval_path=data/bert/val.array_record --config.data.tokenizer=data/vocab.txt
    # then the 512-token phase from that run
    python -m crate_jax.main --config=configs/crate_bert.py:variant=base,seq_len=512,init_from=RUN

Arguments: variant base | large (768/12/12, 1024/24/16); block crate (CRATE-BERT, default) |
crate_alpha | bert (the baseline, same recipe); seq_len 128 | 512; init_from (the 128-token run,
for the 512 phase); smoke (seconds on a CPU: a toy model on a few standard-library files through
the same WordPiece path, with the shipped BERT-layout vocab.txt of the synthetic captions).

Recipe (Devlin et al. 2019): 1 M steps of 256 sequences, the first 90 % at 128 tokens (at most 20
predictions a row), the last 10 % at 512 (at most 80); AdamW lr 1e-4, β 0.9/0.999, weight decay
0.01, 10,000 warmup steps then linear decay; masking 15 % with 80/10/10 (crate_jax/data/
mlm_masking.py). Chosen here: each phase is its own run with its own warmup and linear decay
(BERT's one schedule spans both); no next-sentence task and rows packed across documents
(RoBERTa's FULL-SENTENCES, which RoBERTa found no worse); no dropout (the models have none);
the 512 position embeddings exist in both phases, so the 512 phase loads the first one whole.
"""

import os

import ml_collections

from crate_jax import config_utils

MODELS = {"crate": "crate-bert", "crate_alpha": "crate-alpha-bert", "bert": "bert"}
PHASES = {128: dict(steps=900_000, max_predictions=20, warmup=10_000),
          512: dict(steps=100_000, max_predictions=80, warmup=10_000)}
STDLIB = os.path.dirname(os.__file__)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, variant="base", block="crate", seq_len=128,
                                  init_from="", smoke=False)
    if args.variant not in ("base", "large"):
        raise ValueError(f"config argument variant={args.variant!r}: 'base' or 'large'")
    if args.block not in MODELS:
        raise ValueError(f"config argument block={args.block!r}: one of {list(MODELS)}")
    if args.seq_len not in PHASES:
        raise ValueError(f"config argument seq_len={args.seq_len}: 128 or 512")
    phase = PHASES[args.seq_len]
    c = config_utils.base_config()
    c.trainer = "mlm"
    c.model.name = f"{MODELS[args.block]}-{args.variant}"
    c.model.overrides = ml_collections.ConfigDict(dict(
        vocab_size=30_522, context_length=512, dtype="bfloat16"))
    c.data = ml_collections.ConfigDict(dict(
        train_path="data/bert/train.array_record", eval_path="data/bert/val.array_record",
        tokenizer="data/vocab.txt", seq_len=args.seq_len, text_field="text",
        heldout_every=10, eval_rows=None, mask_prob=0.15,
        max_predictions=phase["max_predictions"], num_workers=0))
    c.batch_size = 256
    c.eval_batch_size = 256
    c.total_steps = phase["steps"]
    c.log_every = 100
    c.eval_every = 10_000
    c.optim.update(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
                   clip_norm=1.0, schedule="linear", warmup_steps=phase["warmup"],
                   total_steps=c.total_steps, end_lr=0.0)
    c.checkpoint.update(every=10_000, keep=2, keep_best=1, best_metric="val/loss",
                        best_mode="min")
    c.init_from = args.init_from or None
    c.reinit_head = False  # the 512 phase continues the same MLM head
    if args.smoke:
        smoke(c)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A toy model of the same family, the WordPiece path on a few standard-library files."""
    c.model.overrides = ml_collections.ConfigDict(dict(width=32, depth=2, heads=2,
                                                       context_length=32))
    c.data.update(train_path=os.path.join(STDLIB, "b*.py"),
                  eval_path=os.path.join(STDLIB, "g*.py"),
                  tokenizer="builtin:shapes_captions_bert", seq_len=32, eval_rows=16,
                  max_predictions=5)
    return config_utils._smoke_schedule(c)
