"""python -m crate_jax.evaluate --workdir=RUN_DIR [--evals=zeroshot,retrieval,probe]
    [--data=auto|synthetic|tfds:NAME[:SPLIT]] [--probe_data=...|tfds:NAME[:TRAIN,TEST]]
    [--tokenizer=vocab.txt] [--step=N] [--num_examples=N] [--batch_size=N] [--json=OUT.json]

The command line of `crate_jax.inference.evaluate`. Runs evaluators on any run directory: one
the trainer wrote, or a released checkpoint imported by `python -m crate_jax.convert import`.
The parameters are read straight into their shardings on the mesh of every local device
(several processes too, as training does).

Kinds (--evals; default zeroshot,retrieval for a two-tower run, probe for any other):
  zeroshot   top-1/top-5 with OpenAI CLIP's 1,000 curated ImageNet names and 80 templates
             (eval_in1k.py of the CRATE-α release), on the run's evaluation preprocessing
  retrieval  image↔text R@1/5/10, each image embedded once with its first 5 captions
  probe      DINO's weighted k-NN (k 20, T 0.07) and a linear probe on the frozen image
             features of any run with an image tower (two-tower, classification — imported
             backbones too —, SimDINO, MAE)

Which sets. --data=auto (the default) takes an evaluator of that kind from a two-tower run's
own config (the synthetic sets of the demo); otherwise the published sets when prepared under
$TFDS_DATA_DIR: zeroshot on TFDS imagenet2012 validation, retrieval on coco_captions test (the
Karpathy 5k) and flickr30k test (1k), probes trained on imagenet2012 train and tested on
validation; and the synthetic captioned shapes when none is (said on the console).
--data=synthetic or --data=tfds:NAME[:SPLIT] chooses explicitly for every kind; for probes
the splits are TRAIN,TEST (default train, and test or else validation), and --probe_data sets
the probes' set apart from the others'.

Every result names its protocol: the console prints one `eval:` line per evaluator with its
protocol, and --json writes '{name}/protocol' records beside the numbers.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys
from typing import Any

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to evaluate.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer file (vocab.txt, tokenizer.json "
                                 "or .model) or builtin:NAME; default: the run's "
                                 "data.tokenizer.")
_EVALS = flags.DEFINE_list("evals", None, "Evaluator kinds to run (zeroshot, retrieval, probe; "
                           "default zeroshot,retrieval for a two-tower run, else probe).")
_DATA = flags.DEFINE_string("data", "auto", "auto, synthetic, or tfds:NAME[:SPLIT] "
                            "(probes: tfds:NAME[:TRAIN_SPLIT,TEST_SPLIT]).")
_PROBE_DATA = flags.DEFINE_string("probe_data", None, "The probes' set when it differs from "
                                  "--data: auto, synthetic or tfds:NAME[:TRAIN,TEST].")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM = flags.DEFINE_integer("num_examples", None, "Evaluate on the first N examples only "
                            "(probes: of each split).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Evaluation batch size (global; default: "
                               "the run's eval_batch_size, else 64).")
_JSON = flags.DEFINE_string("json", None, "Also write the metrics to this JSON file.")


def report_lines(results: dict[str, Any]) -> list[str]:
    """`eval:` lines: the step, then per evaluator its numbers and its protocol."""
    from crate_jax.evals.embedding import describe

    lines = [f"eval: {k} {v:g}" for k, v in sorted(results.items()) if "/" not in k]
    names = sorted({k.split("/")[0] for k in results if "/" in k})
    for name in names:
        numbers = ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())
                            if k.startswith(name + "/") and not k.endswith("/protocol"))
        protocol = results.get(f"{name}/protocol")
        lines.append(f"eval: {numbers}" + (f" [protocol: {describe(protocol)}]"
                                           if protocol else ""))
    return lines


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logging.get_absl_handler().setLevel(std_logging.WARNING)
    from crate_jax import gc_tuning
    from crate_jax.parallel import maybe_initialize_distributed

    gc_tuning.for_tracing()

    maybe_initialize_distributed()
    try:
        from crate_jax.inference import evaluate

        results = evaluate(_WORKDIR.value, kinds=_EVALS.value, data=_DATA.value,
                           probe_data=_PROBE_DATA.value, tokenizer=_TOKENIZER.value,
                           step=_STEP.value, num_examples=_NUM.value, batch_size=_BATCH.value)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("\n".join(report_lines(results)), flush=True)
    if _JSON.value:
        from etils import epath

        epath.Path(_JSON.value).write_text(json.dumps(results, indent=2, sort_keys=True))


def cli() -> None:
    """The `crate-eval` console script."""
    app.run(main)


if __name__ == "__main__":
    cli()
