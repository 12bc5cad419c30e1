"""Frozen-feature probes of any image tower: DINO's weighted k-NN and a linear probe.

k-NN (DINO's eval_knn.py, as SimDINO's repository runs it): features L2-normalised; for each
test feature the k train features of largest cosine s_i (k = 20), and

    score_c = Σ_{i in top k, y_i = c} exp(s_i / T)        T = 0.07; top-1 / top-5 of score

Linear probe: multinomial logistic regression on the frozen (L2-normalised, then
train-standardised) features, full-batch Adam (lr 0.05, 500 steps, L2 penalty 1e-4), no
augmentation: a cheap, deterministic stand-in for DINO's 100-epoch SGD linear classifier,
not its number.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from crate_jax.evals.base import Evaluator
from crate_jax.evals.embedding import Batches, Embedder, Protocol, l2_normalize, label_rank
from crate_jax.whitebox.coding_rate import coding_rate

KNN_K, KNN_TEMPERATURE = 20, 0.07
LINEAR = dict(l2=1e-4, steps=500, lr=0.05)


def image_features(model: nnx.Module, images: jax.Array) -> jax.Array:
    """The probes' feature of a model: `encode_image` where the model has one (two-tower,
    masked autoencoder, SimDINO teacher), else the pooled representation an image
    classifier's head reads (`features`)."""
    if hasattr(model, "encode_image"):
        return model.encode_image(images)
    if hasattr(model, "features"):
        return model.features(images)
    raise ValueError(f"probe: {type(model).__name__} has no image tower (no encode_image or "
                     "features)")


def knn_scores(train_x, train_y, test_x, *, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
               num_classes: int) -> np.ndarray:
    """(test, classes) DINO votes Σ_top-k exp(cos/τ) (module docstring), a block of test rows
    at a time; each row's votes are scaled by exp(−max/τ), which changes no ranking and keeps
    exp finite."""
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    k = min(k, len(train_x))
    scores = np.zeros((len(test_x), num_classes), np.float64)
    rows = max(1, (1 << 24) // max(1, len(train_x)))  # ~64 MiB of similarities per block
    for start in range(0, len(test_x), rows):
        sim = test_x[start:start + rows] @ train_x.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sim, idx, axis=1).astype(np.float64) / temperature
        weights = np.exp(top - top.max(axis=1, keepdims=True))
        block = scores[start:start + rows]
        np.add.at(block, (np.repeat(np.arange(len(idx)), k), train_y[idx].ravel()),
                  weights.ravel())
    return scores


def knn_topk(train_x, train_y, test_x, test_y, *, k: int = KNN_K,
             temperature: float = KNN_TEMPERATURE, num_classes: int) -> dict[str, float]:
    """{'top1', 'top5'} of the weighted k-NN vote (a tied or NaN vote never wins)."""
    rank = label_rank(knn_scores(train_x, train_y, test_x, k=k, temperature=temperature,
                                 num_classes=num_classes), np.asarray(test_y))
    return {"top1": float(np.mean(rank < 1)), "top5": float(np.mean(rank < min(5, k)))}


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = KNN_K,
                 temperature: float = KNN_TEMPERATURE, num_classes: int) -> float:
    """Top-1 of the weighted k-NN vote."""
    return knn_topk(train_x, train_y, test_x, test_y, k=k, temperature=temperature,
                    num_classes=num_classes)["top1"]


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int,
                          l2: float = LINEAR["l2"], steps: int = LINEAR["steps"],
                          lr: float = LINEAR["lr"]) -> float:
    """Multinomial logistic regression on standardised features (full-batch Adam)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    w = jnp.zeros((xtr.shape[1], num_classes))
    b = jnp.zeros((num_classes,))
    tx = optax.adam(lr)

    def loss(params):
        logits = xtr @ params[0] + params[1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()
        return ce + l2 * jnp.sum(params[0] ** 2)

    @jax.jit
    def fit(params):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None
        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return params

    w, b = fit((w, b))
    return float(np.mean(label_rank(np.asarray(xte @ w + b), test_y) < 1))


class ProbeEvaluator(Evaluator):
    """k-NN (top-1, top-5) and linear-probe (top-1) accuracy of frozen, L2-normalised image
    features (`features(model, images)`, default `image_features`); with
    `coding_rate_eps_sq`, also their coding rate R_ε (crate_jax.whitebox.coding_rate) over the
    test split, the measure of how far the features are from collapse. `num_classes` None:
    the largest label + 1."""

    def __init__(self, name: str, train_batches: Batches, test_batches: Batches,
                 preprocess: Callable[[dict], jax.Array], num_classes: int | None = None,
                 k: int = KNN_K, coding_rate_eps_sq: float | None = None, *,
                 temperature: float = KNN_TEMPERATURE,
                 features: Callable[[nnx.Module, jax.Array], jax.Array] | None = None,
                 protocol: Protocol | None = None):
        self.name, self._train, self._test = name, train_batches, test_batches
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.coding_rate_eps_sq = coding_rate_eps_sq
        features = features or image_features
        self._embed = Embedder(lambda m, b: features(m, preprocess(b)))
        self.protocol = {"feature": "model.encode_image (or the classifier head's input)",
                         **(protocol or {}), "feature normalisation": "L2",
                         "k-NN": f"k {k}, T {temperature:g}, vote Σ exp(cos/T) over the k "
                                 "nearest train features (DINO eval_knn.py)",
                         "linear": "logistic regression on train-standardised features, "
                                   f"full-batch Adam lr {LINEAR['lr']:g}, {LINEAR['steps']} "
                                   f"steps, L2 {LINEAR['l2']:g}, no augmentation"}

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        xtr, ytr = self._embed(graphdef, params, rest, mesh, self._train(), keep=("label",))
        xte, yte = self._embed(graphdef, params, rest, mesh, self._test(), keep=("label",))
        ytr, yte = ytr["label"].astype(np.int32), yte["label"].astype(np.int32)
        xtr, xte = l2_normalize(xtr, 1e-12), l2_normalize(xte, 1e-12)
        num_classes = self.num_classes or int(max(ytr.max(), yte.max()) + 1)
        knn = knn_topk(xtr, ytr, xte, yte, k=self.k, temperature=self.temperature,
                       num_classes=num_classes)
        out = {f"{self.name}/knn_top1": knn["top1"], f"{self.name}/knn_top5": knn["top5"],
               f"{self.name}/linear_top1": linear_probe_accuracy(xtr, ytr, xte, yte,
                                                                 num_classes=num_classes),
               f"{self.name}/train_count": float(len(ytr)),
               f"{self.name}/count": float(len(yte))}
        if self.coding_rate_eps_sq is not None:  # collapse shows as a rate near 0
            out[f"{self.name}/coding_rate"] = float(coding_rate(xte, self.coding_rate_eps_sq))
        return out
