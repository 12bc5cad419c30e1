"""A small causal CRATE-α language model and a GPT-2 of the same size, trained side by side on
the Python standard library's own source code, on a CPU in a few minutes.

    python -m crate_jax.main --config=configs/demo_lm.py
    python -m crate_jax.generate --workdir=runs/demo_lm --prompt "def main():"
    python -m crate_jax.analyze --workdir=runs/demo_lm

Corpus: the top-level .py files of the running Python's standard library (the folder of
`os.__file__`; 168 files, 4.7 MB on CPython 3.11), sorted by name; every 30th file is held out
(on 3.11: calendar, genericpath, operator, shlex and token, 57 kB), the other 163 train. Source
code and its docstrings, present on every machine with Python, no download. The figures depend
a little on the Python version.

Tokens: the built-in byte-level tokenizer (UTF-8 bytes + pad/bos/eos/mask, 260 ids). Rows of
128 + 1 bytes, packed across files (crate_jax/data/text.py).

Models (the same width 96, depth 4, 4 heads, context 128, tied embeddings; ≈ 0.41 M parameters):
    crate   'crate-alpha-gpt-small' shrunk: MSSA + the overcomplete ODL sparse code (ratio 4,
            two ISTA steps) of "Improving Neuron-level Interpretability with White-box Language
            Models"; per layer 10·d² + 4d parameters
    baseline 'gpt2-small' shrunk, MLP width 3·d so that its layer has 10·d² + 11d parameters:
            the same parameter count up to 0.1 %
Both are trained on the same batches by one optimizer: config.compare_with makes the task's
model a pair (crate_jax/tasks/language.py) whose loss is the sum of the two losses. The groups
share no parameter and optim.clip_norm is None, so each is trained exactly as if alone with
these AdamW settings. The final evaluation prints val/perplexity (CRATE-α),
val/baseline_perplexity (GPT-2) and val/unigram_perplexity (add-one unigram of the training
bytes) over every byte of the held-out files.
"""

import ml_collections

from crate_jax import config_utils

WIDTH, DEPTH, HEADS, SEQ_LEN = 96, 4, 4, 128


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_utils.parse_arg(arg, smoke=False, steps=250)
    c = config_utils.base_config()
    c.trainer = "lm"
    size = dict(width=WIDTH, depth=DEPTH, heads=HEADS)
    c.model.name = "crate-alpha-gpt-small"
    c.model.overrides = ml_collections.ConfigDict(size)
    c.compare_with = ml_collections.ConfigDict(dict(
        name="gpt2-small", overrides=dict(**size, mlp_dim=3 * WIDTH)))
    c.data = ml_collections.ConfigDict(dict(
        train_path="stdlib:train", eval_path="stdlib:eval", heldout_every=30,
        tokenizer="bytes", seq_len=SEQ_LEN, text_field="text", eval_rows=None,
        unigram_baseline=True, num_workers=0))
    # Small batches, many updates: at this budget the number of updates, more than the tokens
    # seen, sets the loss (measured at width 128: 700 steps of 16 rows ended at validation
    # perplexity 9.9 / 7.2, 300 steps of 32 rows at 11.5 / 10.5)
    c.batch_size = 16
    c.eval_batch_size = 128
    c.total_steps = args.steps
    c.log_every = 50
    c.eval_every = 0  # once, at the end
    # AdamW as nanoGPT's small character-level recipe (β₂ 0.99, decay 0.1), a higher lr for
    # the short schedule; no global-norm clip, which would couple the two models (docstring)
    c.optim.update(name="adamw", lr=3e-3, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=None,
                   schedule="cosine", warmup_steps=30, total_steps=c.total_steps,
                   end_lr=3e-4)
    c.checkpoint.update(every=c.total_steps, keep=1, keep_best=0, best_metric=None,
                        async_save=False)
    c.measure_flops = False
    if args.smoke:
        c.model.overrides = ml_collections.ConfigDict(dict(width=32, depth=2, heads=2))
        c.compare_with.overrides = dict(width=32, depth=2, heads=2, mlp_dim=96)
        c.data.seq_len = 32
        c.data.eval_rows = 32
        c.batch_size, c.eval_batch_size = 8, 16
        c.total_steps = c.optim.total_steps = 4
        c.optim.warmup_steps = 1
        c.log_every = c.checkpoint.every = 2
    return c
