"""python -m crate_jax.evaluate --workdir=RUN_DIR [--tokenizer=vocab.txt]
    [--evals=zeroshot,retrieval] [--data=auto|synthetic|tfds:NAME[:SPLIT]] [--step=N]
    [--num_examples=N] [--json=OUT.json]

Runs a task's evaluators on any run directory: one the trainer wrote, or a released checkpoint
imported by `python -m crate_jax.convert import`. The parameters are read straight into their
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
from typing import Any

import ml_collections
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

TFDS_DEFAULT = {"zeroshot": ("imagenet2012", "validation"), "retrieval": ("coco_captions", "val")}
KINDS = ("zeroshot", "retrieval", "probe")


def _synthetic_spec(kind: str, num: int | None) -> dict[str, Any]:
    spec = dict(kind=kind, source="synthetic_captions", split="test",
                num_examples=num or 64)
    if kind == "probe":
        spec.update(train_split="train", holdout_pairs=0, num_classes=64)
    return spec


def _tfds_prepared(name: str, split: str) -> bool:
    from crate_jax.data.images import image_source

    try:
        image_source(ml_collections.ConfigDict(dict(source="tfds", name=name)), split)
    except (FileNotFoundError, ValueError):
        return False
    return True


def eval_specs(config: ml_collections.ConfigDict, kinds: list[str], data: str,
               num: int | None) -> dict[str, dict]:
    """{name: spec} for the requested kinds (see the module docstring)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"--evals: {unknown} unknown; kinds are {list(KINDS)}")
    own = dict(config.get("evals") or {})
    specs = {}
    for kind in kinds:
        if data == "auto":
            mine = [(n, dict(s)) for n, s in own.items() if s.get("kind") == kind]
            if mine:
                specs.update(mine)
                continue
            name, split = TFDS_DEFAULT.get(kind, (None, None))
            if name and _tfds_prepared(name, split):
                specs[kind] = dict(kind=kind, source="tfds", name=name, split=split)
            else:
                print(f"{kind}: {name or 'no TFDS set'} is not prepared; using the synthetic "
                      "captioned shapes", flush=True)
                specs[kind] = _synthetic_spec(kind, num)
        elif data == "synthetic":
            specs[kind] = _synthetic_spec(kind, num)
        elif data.startswith("tfds:"):
            name, _, split = data[5:].partition(":")
            specs[kind] = dict(kind=kind, source="tfds", name=name,
                               split=split or TFDS_DEFAULT.get(kind, ("", "validation"))[1])
        else:
            raise ValueError(f"--data={data!r}: use auto, synthetic or tfds:NAME[:SPLIT]")
        if num is not None:
            specs[kind]["num_examples"] = num
    return specs


def evaluate(workdir: str, *, kinds: list[str], data: str = "auto",
             tokenizer: str | None = None, step: int | None = None,
             num_examples: int | None = None,
             batch_size: int | None = None) -> dict[str, float]:
    """The metrics of the run's evaluators on its checkpoint (see the module docstring)."""
    import jax
    from flax import nnx

    from crate_jax import parallel, tasks
    from crate_jax.inference import absolute, read_run_config
    from crate_jax.train.finetune import _checkpointer

    workdir = absolute(workdir)
    config = read_run_config(workdir, tokenizer)
    if config.trainer == "contrastive":
        if not config.data.get("tokenizer") and "source" not in config.data:
            raise ValueError(f"--tokenizer: {workdir} (an imported checkpoint) names no "
                             "tokenizer; pass the one its text tower was trained with (the "
                             "CRATE-α-CLIPA releases: BERT-base uncased vocab.txt)")
        config.evals = eval_specs(config, kinds, data, num_examples)
    batch_size = batch_size or config.get("eval_batch_size") or 64
    config.eval_batch_size = batch_size
    if "batch_size" not in config:  # an imported run has no training batch
        config.batch_size = batch_size
    task = tasks.get(config.trainer)(config)
    mesh = parallel.make_mesh({"fsdp": -1})
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    shardings = parallel.param_shardings(abstract_params, mesh)
    with jax.set_mesh(mesh):
        rest = jax.jit(lambda: nnx.split(task.build_model(nnx.Rngs(0)), nnx.Param, ...)[2],
                       out_shardings=parallel.replicated(mesh))()
        checkpointer, _ = _checkpointer(workdir)
        try:
            found, _ = checkpointer.saved_params(step)
            target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                    sharding=s),
                                  nnx.to_pure_dict(abstract_params), shardings)
            params = checkpointer.restore_param_subset(found, target)
        finally:
            checkpointer.close()
        results: dict[str, float] = {"step": float(found)}
        for evaluator in task.evaluators():
            results.update(evaluator.run(graphdef, params, rest, mesh))
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logging.get_absl_handler().setLevel(std_logging.WARNING)
    from crate_jax.parallel import maybe_initialize_distributed

    maybe_initialize_distributed()
    try:
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
