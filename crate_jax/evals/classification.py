"""Top-1 / top-5 accuracy and loss over a whole evaluation split.

Every example counts exactly once: batches are padded to a fixed shape and padded rows carry
mask 0 (crate_jax.data.pipeline.eval_batches), so nothing is dropped and nothing counts twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.evals.base import Evaluator
from crate_jax.models.state import merge_model
from crate_jax.parallel import host_batch_to_global, replicated

PerExample = Callable[[nnx.Module, dict], dict[str, jax.Array]]


def masked_sums(graphdef: nnx.GraphDef, per_example: PerExample):
    """jit-able (params, rest, batch) -> {metric: Σ mask·value, 'count': Σ mask}."""

    def sums(params, rest, batch):
        model = merge_model(graphdef, params, rest, train=False)
        mask = batch["mask"]
        values = per_example(model, batch)
        out = {k: jnp.sum(v * mask) for k, v in values.items()}
        out["count"] = jnp.sum(mask)
        return out

    return sums


def run_masked_average(batches: Iterable[dict], step_fn, params, rest, mesh) -> dict[str, float]:
    """Σ over batches of masked sums, divided by the number of real examples."""
    totals: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(step_fn(params, rest, host_batch_to_global(batch, mesh)))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    return {**{k: v / max(count, 1.0) for k, v in totals.items()}, "count": count}


def topk_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per-example correctness at 1 and 5, and the cross-entropy loss.

    The label's rank counts every other class whose logit is not below the label's, so a tie
    or a NaN counts against the example, and a NaN label logit ranks past the last class: a
    broken model can never score. The loss is left NaN/inf for such a model, not hidden."""
    labels = labels.astype(jnp.int32)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)
    # ~(l < label) is True for the label itself (subtracted) and for every tie or NaN
    rank = jnp.sum(~(logits < label_logit), axis=1) - 1
    rank = jnp.where(jnp.isnan(label_logit[:, 0]), logits.shape[1], rank)
    loss = jax.nn.logsumexp(logits, axis=1) - label_logit[:, 0]
    return {"top1": (rank < 1).astype(jnp.float32), "top5": (rank < 5).astype(jnp.float32),
            "loss": loss}


class ClassificationEvaluator(Evaluator):
    def __init__(self, name: str, batches: Callable[[], Iterable[dict[str, np.ndarray]]],
                 preprocess: Callable[[dict], jax.Array]):
        """batches(): a fresh pass over the split (host batches with 'mask');
        preprocess(batch) -> the model's input images (on device)."""
        self.name, self._batches, self._preprocess = name, batches, preprocess
        self._step = None

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        if self._step is None:
            def per_example(model, batch):
                return topk_metrics(model(self._preprocess(batch)), batch["label"])
            self._step = jax.jit(masked_sums(graphdef, per_example),
                                 out_shardings=replicated(mesh))
        result = run_masked_average(self._batches(), self._step, params, rest, mesh)
        return {f"{self.name}/{k}": v for k, v in result.items()}
