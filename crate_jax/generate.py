"""Text from a trained causal language model run, decoded with a key-value cache.

    python -m crate_jax.generate --workdir=RUN --prompt "def main():" \
        [--max-new-tokens 200] [--temperature 0.8] [--top-k 40] [--seed 0] [--model baseline]

Loads RUN/config.json and the latest checkpoint, tokenizes the prompt with the run's tokenizer
(data.tokenizer), and continues it with crate_jax.models.lm_cache.generate: greedy at
--temperature 0, else sampled from softmax(logits / T) among the --top-k most likely tokens.
The prompt is treated as the start of a document: it follows an EOS, as every document does in
training. The continuation stops at the first EOS it produces. Prompt + new tokens must fit the
model's context; a longer prompt keeps its last tokens. A run that trained a baseline next to
the CRATE model (config.compare_with) generates with the CRATE model, or with --model baseline.

Exit status 2, with one line on stderr, for a missing workdir, config or checkpoint, a run that
is not a causal LM, or bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

PROG = "python -m crate_jax.generate"


@dataclasses.dataclass
class LanguageRun:
    """A trained language-model run: its config, task, model (parameters loaded) and step."""

    workdir: str
    config: Any  # ml_collections.ConfigDict
    task: Any  # CausalLMTask / MaskedLMTask
    model: Any  # CausalLM, MaskedLM or PairedLM
    step: int

    @property
    def tokenizer(self):
        return self.task.tokenizer

    def language_models(self) -> dict[str, Any]:
        """{'crate': …, 'baseline': …} for a side-by-side run, else {'model': …}."""
        from crate_jax.tasks.language import PairedLM
        if isinstance(self.model, PairedLM):
            return {"crate": self.model.crate, "baseline": self.model.baseline}
        return {"model": self.model}


def load_language_run(workdir: str, *, causal: bool = True) -> LanguageRun:
    """The run in `workdir` with its latest parameters. FileNotFoundError for a missing
    workdir, config.json or checkpoint; ValueError for a run that is not a (causal, with
    `causal`) language model."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx

    from crate_jax.tasks.language import CausalLMTask, MaskedLMTask
    from crate_jax.train.loop import final_params

    if "://" in workdir:  # the reads below are local (os.path); say so, not "does not exist"
        raise ValueError(f"--workdir={workdir}: text generation reads a local workdir only; "
                         "copy the run to a local folder first")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir: {workdir} does not exist")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir: no config.json in {workdir} (not a training run)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    trainer = config.get("trainer")
    wanted = ("lm",) if causal else ("lm", "mlm")
    if trainer not in wanted:
        raise ValueError(f"--workdir: {workdir} is a {trainer!r} run; this needs a "
                         f"{' or '.join(map(repr, wanted))} (language model) run")
    ckpt = os.path.join(workdir, "checkpoints")
    steps = [int(s) for s in os.listdir(ckpt) if s.isdigit()] if os.path.isdir(ckpt) else []
    if not steps:
        raise FileNotFoundError(f"--workdir: {workdir} has no checkpoint in {ckpt}")
    task = (CausalLMTask if trainer == "lm" else MaskedLMTask)(config)
    seed = int(config.get("seed", 0))
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(params=seed,
                                                                 dropout=seed + 1)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):  # RNG streams (DropPath): their initial values, made once
        rest = jax.jit(lambda: nnx.split(task.build_model(nnx.Rngs(
            params=seed, dropout=seed + 1)), nnx.Param, ...)[2])()
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, final_params(workdir)))
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return LanguageRun(workdir, config, task, model, max(steps))


def prompt_ids(tokenizer: Any, prompt: str, room: int) -> list[int]:
    """[EOS] + the prompt's ids, its last `room` ids when it is longer."""
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    return ids[-room:]


def continue_text(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int | None = None,
                  seed: int = 0) -> tuple[str, list[int]]:
    """(the continuation's text up to the first EOS, its ids) of `prompt`."""
    import jax
    import numpy as np

    from crate_jax.models.lm_cache import generate

    context = model.cfg.context_length
    if not 1 <= max_new_tokens < context:
        raise ValueError(f"--max-new-tokens={max_new_tokens}: must be in [1, {context - 1}] "
                         f"(the model's context is {context} tokens, the prompt needs one)")
    ids = prompt_ids(tokenizer, prompt, context - max_new_tokens)
    out = generate(model, np.asarray([ids], np.int32), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k,
                   rng=jax.random.key(seed) if temperature > 0 else None)
    new = [int(t) for t in np.asarray(out)[0, len(ids):]]
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    return tokenizer.decode(new), new


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Generate text with a trained causal "
                                "language model run (key-value cached decoding).")
    p.add_argument("--workdir", required=True, help="the run's directory")
    p.add_argument("--prompt", default="", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=("crate", "baseline"), default="crate",
                   help="for a side-by-side run (compare_with): which model generates")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        run = load_language_run(args.workdir)
        models = run.language_models()
        if args.model == "baseline" and "baseline" not in models:
            raise ValueError("--model baseline: the run trained no baseline (compare_with)")
        model = models.get(args.model, models.get("model"))
        text, _ = continue_text(model, run.tokenizer, args.prompt,
                                max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k,
                                seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
