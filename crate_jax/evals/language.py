"""Held-out evaluation of the language models, over the whole evaluation split.

Causal LM ('lm'): every target token of the held-out stream is scored exactly once (the rows
overlap by one token and the partial tail is padded with weight 0, crate_jax/data/text.py), padded
rows carry mask 0 (pipeline.eval_batches):

    loss       = Σ_j w_j · (−log p(s_j | s_<j)) / Σ_j w_j               nats per token
    perplexity = exp(loss),   accuracy = Σ_j w_j · [argmax = s_j] / Σ_j w_j

Masked LM ('mlm'): the same over the chosen positions of a fixed per-row mask.

A run that trains a baseline next to the CRATE model (config.compare_with) reports the CRATE
model under '{name}/loss' … and the baseline under '{name}/baseline_loss' …; with a unigram
figure, '{name}/unigram_perplexity' (the add-one unigram of the training split on the same
held-out tokens) is reported with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.evals.base import Evaluator
from crate_jax.evals.classification import masked_sums
from crate_jax.parallel import host_batch_to_global, replicated

# (model, batch) -> {member: (Σ nll, Σ correct, Σ weight) per row (B,)}
RowSums = Callable[..., dict[str, tuple[jax.Array, jax.Array, jax.Array]]]


def token_nll(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(−log softmax(logits)[target], [argmax = target]) per position, float32:
    nll = logsumexp(l) − l_target."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return nll, correct


def weighted_lm_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean nll over the weighted positions, {'perplexity', 'accuracy'}): the train loss."""
    nll, correct = token_nll(logits, targets)
    total = jnp.maximum(weights.sum(), 1.0)
    loss = (nll * weights).sum() / total
    return loss, {"perplexity": jnp.exp(loss), "accuracy": (correct * weights).sum() / total}


class LanguageEvaluator(Evaluator):
    """Loss, perplexity and accuracy per token over a whole split (module docstring).

    batches(): a fresh pass (host batches with 'mask'); row_sums(model, batch) → for each
    member ('' for a single model, 'baseline' for the compared one) the per-row sums of nll,
    correct and weight; unigram(): the unigram perplexity, or None; param_counts(params):
    figures reported with the metrics (the two models' sizes of a side-by-side run)."""

    def __init__(self, name: str, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
                 row_sums: RowSums, *, unigram: Callable[[], float] | None = None,
                 param_counts: Callable[[dict], dict[str, int]] | None = None):
        self.name, self._batches, self._row_sums = name, batches, row_sums
        self._param_counts = param_counts
        self._unigram, self._unigram_value = unigram, None
        self._step = None

    def _compile(self, graphdef, mesh):
        def per_example(model, batch):
            out = {}
            for member, (nll, correct, weight) in self._row_sums(model, batch).items():
                prefix = f"{member}_" if member else ""
                out.update({prefix + "nll": nll, prefix + "correct": correct,
                            prefix + "tokens": weight})
            return out
        return jax.jit(masked_sums(graphdef, per_example), out_shardings=replicated(mesh))

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        if self._step is None:
            self._step = self._compile(graphdef, mesh)
        totals: dict[str, float] = {}
        for batch in self._batches():
            out = jax.device_get(self._step(params, rest, host_batch_to_global(batch, mesh)))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        results = {}
        for key in totals:
            if not key.endswith("nll"):
                continue
            prefix = key[:-3]
            tokens = max(totals[prefix + "tokens"], 1.0)
            loss = totals[key] / tokens
            results.update({f"{prefix}loss": loss, f"{prefix}perplexity": _exp(loss),
                            f"{prefix}accuracy": totals[prefix + "correct"] / tokens})
        results["tokens"] = totals.get("tokens", 0.0)
        if self._param_counts is not None:
            results.update({k: float(v) for k, v in self._param_counts(params).items()})
        if self._unigram is not None:
            if self._unigram_value is None:  # the corpus does not change: count once
                self._unigram_value = self._unigram()
            results["unigram_perplexity"] = self._unigram_value
        return {f"{self.name}/{k}": v for k, v in results.items()}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


__all__ = ["LanguageEvaluator", "token_nll", "weighted_lm_metrics"]
