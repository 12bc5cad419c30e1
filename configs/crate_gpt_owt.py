"""CRATE-GPT on OpenWebText: the journal paper's causal CRATE (MSSA under a causal mask, ISTA, a
next-token head) at the GPT-2 sizes, trained with the GPT-2 recipe as nanoGPT reproduces it.

    # once: the GPT-2 BPE files (vocab.json + merges.txt of Hugging Face's 'gpt2', or OpenAI's
    # encoder.json + vocab.bpe) in a folder, and the corpus as token-stream ArrayRecord files
    python -m crate_jax.data.text_sources prepare --tokenizer=data/gpt2 \
        --input='openwebtext/train/**/*.txt' --out=data/owt/train.array_record
    python -m crate_jax.data.text_sources prepare --tokenizer=data/gpt2 \
        --input='openwebtext/val/**/*.txt' --out=data/owt/val.array_record
    python -m crate_jax.main --config=configs/crate_gpt_owt.py:variant=small \
        --config.data.train_path=data/owt/train.array_record \
        --config.data.eval_path=data/owt/val.array_record --config.data.tokenizer=data/gpt2

Arguments: variant small | medium | large (GPT-2's 768/12/12, 1024/24/16, 1280/36/20);
block crate (CRATE-GPT, default) | crate_alpha (the overcomplete ODL code of arXiv 2410.12288) |
gpt2 (the baseline, same recipe); smoke (seconds on a CPU: a toy model on a few standard-library
files, byte tokens, the same task code path).

Recipe. From nanoGPT's GPT-2 (124M) OpenWebText config, which the CRATE-GPT experiments follow:
context 1,024, ~0.5 M tokens per step (480 sequences: nanoGPT's 12 × 40 accumulation × 8 GPUs
/ 8), 600,000 steps, AdamW lr 6e-4 (β 0.9/0.95, weight decay 0.1 on matrices and embeddings),
gradient clip 1.0, 2,000 warmup steps, cosine decay to 6e-5 at the end. Chosen here: the peak lr
of medium / large from GPT-3's table (3e-4, 2.5e-4) since nanoGPT gives only the small one;
bfloat16 compute with float32 parameters; no dropout (the models have none; nanoGPT's
OpenWebText run uses 0.0 as well); evaluation over the whole validation split every 2,000 steps
(nanoGPT samples 200 batches). The GPT-2 vocabulary of 50,257 ids is kept unpadded (the
published parameter counts).
"""

import os

import ml_collections

from crate_jax import config_utils

MODELS = {"crate": "crate-gpt", "crate_alpha": "crate-alpha-gpt", "gpt2": "gpt2"}
PEAK_LR = {"small": 6e-4, "medium": 3e-4, "large": 2.5e-4}
STDLIB = os.path.dirname(os.__file__)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, variant="small", block="crate", smoke=False)
    if args.variant not in PEAK_LR:
        raise ValueError(f"config argument variant={args.variant!r}: one of {list(PEAK_LR)}")
    if args.block not in MODELS:
        raise ValueError(f"config argument block={args.block!r}: one of {list(MODELS)}")
    c = config_utils.base_config()
    c.trainer = "lm"
    c.model.name = f"{MODELS[args.block]}-{args.variant}"
    c.model.overrides = ml_collections.ConfigDict(dict(
        vocab_size=50_257, context_length=1024, dtype="bfloat16"))
    c.compare_with = None
    c.data = ml_collections.ConfigDict(dict(
        train_path="data/owt/train.array_record", eval_path="data/owt/val.array_record",
        tokenizer="data/gpt2", seq_len=1024, text_field="text", heldout_every=10,
        eval_rows=None, unigram_baseline=False, num_workers=0))
    c.batch_size = 480
    c.eval_batch_size = 64
    c.total_steps = 600_000
    c.log_every = 100
    c.eval_every = 2000
    c.optim.update(name="adamw", lr=PEAK_LR[args.variant], b1=0.9, b2=0.95, eps=1e-8,
                   weight_decay=0.1, clip_norm=1.0, schedule="cosine", warmup_steps=2000,
                   total_steps=c.total_steps, end_lr=PEAK_LR[args.variant] / 10)
    c.checkpoint.update(every=2000, keep=2, keep_best=1, best_metric="val/loss",
                        best_mode="min")
    if args.smoke:
        smoke(c)
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A toy model of the same family on a few standard-library files, byte tokens."""
    c.model.overrides = ml_collections.ConfigDict(dict(width=32, depth=2, heads=2))
    c.data.update(train_path=os.path.join(STDLIB, "b*.py"),
                  eval_path=os.path.join(STDLIB, "g*.py"), tokenizer="bytes", seq_len=32,
                  eval_rows=16)
    return config_utils._smoke_schedule(c)
