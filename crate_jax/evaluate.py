"""python -m crate_jax.evaluate --workdir=RUN_DIR [--tokenizer=vocab.txt]
    [--evals=zeroshot,retrieval] [--data=auto|synthetic|tfds:NAME[:SPLIT]] [--step=N]
    [--num_examples=N] [--json=OUT.json]

The command line of `crate_jax.inference.evaluate`. Runs a task's evaluators on any run
directory: one the trainer wrote, or a released checkpoint imported by
`python -m crate_jax.convert import`. The parameters are read straight into their
shardings on the mesh of every local device (several processes too, as training does).

Which evaluation sets. Each name in --evals is an evaluator kind of the run's task (contrastive:
zeroshot, retrieval, probe). With --data=auto (the default) an evaluator of that kind in the
run's own config is used as it is (the synthetic sets of a demo run); otherwise zero-shot runs
on TFDS `imagenet2012` (validation) and retrieval on TFDS `coco_captions` (val) when those are
prepared, and on the synthetic captioned shapes when they are not (said on the console).
--data=synthetic or --data=tfds:NAME[:SPLIT] chooses explicitly.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to evaluate.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer file (vocab.txt, tokenizer.json "
                                 "or .model); default: the run's data.tokenizer.")
_EVALS = flags.DEFINE_list("evals", ["zeroshot", "retrieval"], "Evaluator kinds to run.")
_DATA = flags.DEFINE_string("data", "auto", "auto, synthetic, or tfds:NAME[:SPLIT].")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM = flags.DEFINE_integer("num_examples", None, "Evaluate on the first N examples only.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Evaluation batch size (global; default: "
                               "the run's eval_batch_size, else 64).")
_JSON = flags.DEFINE_string("json", None, "Also write the metrics to this JSON file.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logging.get_absl_handler().setLevel(std_logging.WARNING)
    from crate_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    try:
        from crate_jax.inference import evaluate

        results = evaluate(_WORKDIR.value, kinds=_EVALS.value, data=_DATA.value,
                           tokenizer=_TOKENIZER.value, step=_STEP.value,
                           num_examples=_NUM.value, batch_size=_BATCH.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())), flush=True)
    if _JSON.value:
        from etils import epath

        epath.Path(_JSON.value).write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
