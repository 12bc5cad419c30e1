"""Evaluators for image-text models: zero-shot classification, image↔text retrieval, and a
linear probe and k-NN classifier on frozen image features.

Embeddings are computed sharded like training (one jitted encoder per evaluator) over padded
batches; only the real rows (mask 1) come back to the host, in the split's order, so every
process count gives the same metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from crate_jax.models.state import merge_model
from crate_jax.parallel import batch_sharding, host_batch_to_global, replicated
from crate_jax.tasks.base import Evaluator
from crate_jax.whitebox.coding_rate import coding_rate

Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


def read_templates(path: str | None = None) -> list[str]:
    """Prompt templates, one per line with '{}' for the class name ('#' lines are comments)."""
    text = (open(path).read() if path else
            resources.files("crate_jax.evals").joinpath("data/templates.txt").read_text())
    templates = [t.strip() for t in text.splitlines() if t.strip() and not t.startswith("#")]
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates file {path or 'data/templates.txt'}: every line needs '{{}}'")
    return templates


def imagenet_class_names() -> list[str]:
    text = resources.files("crate_jax.evals").joinpath("data/imagenet1k_classes.tsv").read_text()
    return [line.split("\t")[1] for line in text.splitlines() if not line.startswith("#")]


def replicated_batch_to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global arrays, split over the batch axes, from a host batch every process holds whole
    (class prompts): each process fills its own devices' rows from its copy, so the global
    batch is the host batch once, not once per process."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        out[key] = jax.make_array_from_callback(value.shape, sharding,
                                                lambda index, v=value: v[index])
    return out


class Embedder:
    """Runs `fn(model, batch) -> (B, e)` over masked batches and returns the real rows of the
    whole split in example order, with the batch entries named in `keep` (labels, ids)
    alongside.

    Batches are either each process's own rows, dealt as `pipeline.eval_batches` deals them
    (process p of P holds examples p, p + P, p + 2P, ...), or, with `shared=True`, the same
    whole batch on every process. Either way the rows come back in the order of the split,
    whatever the process count, so metrics that depend on the order (ties, summation order)
    match a 1-process run."""

    def __init__(self, fn: Callable[[nnx.Module, dict], jax.Array]):
        self.fn = fn
        self._jitted = None

    def _compile(self, graphdef, mesh, keep: Sequence[str]):
        def run(params, rest, batch):
            out = {k: batch[k] for k in (*keep, "mask", "row_index")}
            out["embedding"] = self.fn(merge_model(graphdef, params, rest, train=False), batch)
            return out
        return jax.jit(run, out_shardings=replicated(mesh))

    def __call__(self, graphdef, params, rest, mesh, batches: Iterable[dict],
                 keep: Sequence[str] = (), *,
                 shared: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if self._jitted is None:
            self._jitted = self._compile(graphdef, mesh, keep)
        process, count = (0, 1) if shared else (jax.process_index(), jax.process_count())
        to_global = replicated_batch_to_global if shared else host_batch_to_global
        parts: dict[str, list[np.ndarray]] = {k: [] for k in (*keep, "row_index", "embedding")}
        seen = 0
        for batch in batches:
            rows = len(batch["mask"])
            # the example index of each row in the split, carried through the device
            index = (np.arange(seen, seen + rows) * count + process).astype(np.int32)
            seen += rows
            batch = to_global({**batch, "row_index": index}, mesh)
            out = jax.device_get(self._jitted(params, rest, batch))
            real = out["mask"] > 0
            for k in parts:
                parts[k].append(np.asarray(out[k])[real])
        order = np.argsort(np.concatenate(parts.pop("row_index")), kind="stable")
        embeddings = np.concatenate(parts.pop("embedding"))[order]
        return embeddings, {k: np.concatenate(v)[order] for k, v in parts.items()}


# Cosine similarities closer than this count as a tie. Two equal captions (or prompts) embed
# to the same vector only up to the rounding of the reduction order, which differs between
# meshes and process counts; without a tolerance such a tie would resolve one way on one
# process count and the other way on another.
TIE_TOLERANCE = 1e-5


def label_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each row's label among its scores (cosine similarities), counting
    against the label every other class that ties it (within TIE_TOLERANCE) or is NaN; a NaN
    label score ranks past the last class. So ties and NaN never count as correct."""
    label_score = np.take_along_axis(scores, labels[:, None], axis=1)
    with np.errstate(invalid="ignore"):
        rank = np.sum(~(scores < label_score - TIE_TOLERANCE), axis=1) - 1  # -1: the label
    return np.where(np.isnan(label_score[:, 0]), scores.shape[1], rank)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label ranks in the top k (ties and NaN count against)."""
    return float(np.mean(label_rank(logits, labels) < k))


class ZeroShotEvaluator(Evaluator):
    """Top-1/top-5 of argmax_c ⟨u, w_c⟩ with the class embedding
    w_c = normalize(mean over templates of normalize(v(template(c))))."""

    def __init__(self, name: str, batches: Batches, class_names: Sequence[str],
                 tokenize: Callable[[list[str]], np.ndarray], templates: Sequence[str],
                 preprocess: Callable[[dict], jax.Array], *, text_batch: int = 256,
                 eval_classes: Sequence[int] | None = None):
        """eval_classes: the classes scored (default all); images keep their global labels."""
        self.name, self._batches, self.class_names = name, batches, list(class_names)
        self.tokenize, self.templates, self.text_batch = tokenize, list(templates), text_batch
        self.eval_classes = None if eval_classes is None else np.asarray(eval_classes)
        self._images = Embedder(lambda m, b: m.encode_image(preprocess(b)))
        self._texts = Embedder(lambda m, b: m.encode_text(b["tokens"]))

    def class_embeddings(self, graphdef, params, rest, mesh) -> np.ndarray:
        """(C, e) for the scored classes (all, or eval_classes)."""
        names = (self.class_names if self.eval_classes is None
                 else [self.class_names[i] for i in self.eval_classes])
        prompts = [t.format(c) for c in names for t in self.templates]
        tokens = self.tokenize(prompts)
        n_dev = mesh.size
        size = -(-self.text_batch // n_dev) * n_dev

        def batches():
            for i in range(0, len(tokens), size):
                chunk = tokens[i:i + size]
                mask = np.zeros(size, np.float32)
                mask[:len(chunk)] = 1
                pad = np.zeros((size - len(chunk), tokens.shape[1]), tokens.dtype)
                yield {"tokens": np.concatenate([chunk, pad]), "mask": mask}

        # every process holds all the prompts: one global batch of them, not one per process
        emb, _ = self._texts(graphdef, params, rest, mesh, batches(), shared=True)
        emb = emb.reshape(len(names), len(self.templates), -1)
        emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
        mean = emb.mean(1)
        return mean / np.linalg.norm(mean, axis=-1, keepdims=True)

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        classes = self.class_embeddings(graphdef, params, rest, mesh)
        images, extra = self._images(graphdef, params, rest, mesh, self._batches(),
                                     keep=("label",))
        labels = extra["label"].astype(np.int64)
        logits = images @ classes.T
        if self.eval_classes is not None:
            lookup = {c: i for i, c in enumerate(self.eval_classes.tolist())}
            labels = np.array([lookup[int(c)] for c in labels])
        return {f"{self.name}/top1": topk_accuracy(logits, labels, 1),
                f"{self.name}/top5": topk_accuracy(logits, labels, min(5, logits.shape[1])),
                f"{self.name}/count": float(len(labels))}


def _positive_rank(sim: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per row, the position of the best-scoring positive column, counting against it every
    negative column that ties it (within TIE_TOLERANCE) or is NaN; rows whose positives are
    all NaN rank past the end."""
    with np.errstate(invalid="ignore"):
        best = np.max(np.where(positive & ~np.isnan(sim), sim, -np.inf), axis=1, initial=-np.inf)
        rank = np.sum(~positive & ~(sim < best[:, None] - TIE_TOLERANCE), axis=1)
    usable = np.any(positive & ~np.isnan(sim), axis=1)
    return np.where(usable, rank, sim.shape[1])


def retrieval_recall(sim: np.ndarray, caption_image: np.ndarray,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """sim (images, captions); caption_image[j] = the image caption j describes.

    image→text R@k: some caption of the image is among its k best captions.
    text→image R@k: the caption's image is among its k best images.
    Ties and NaN similarities count against (a constant or NaN model scores 0)."""
    n_img = sim.shape[0]
    positive = caption_image[None, :] == np.arange(n_img)[:, None]  # (images, captions)
    rank_i2t = _positive_rank(sim, positive)
    rank_t2i = _positive_rank(sim.T, positive.T)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(rank_i2t < k))
        out[f"t2i_R@{k}"] = float(np.mean(rank_t2i < k))
    return out


class RetrievalEvaluator(Evaluator):
    """Batches hold 'image', 'tokens', 'mask' and 'image_id' (captions of one image share it)."""

    def __init__(self, name: str, batches: Batches, preprocess: Callable[[dict], jax.Array]):
        self.name, self._batches = name, batches
        self._embed = Embedder(lambda m, b: jnp.concatenate(
            [m.encode_image(preprocess(b)), m.encode_text(b["tokens"])], axis=-1))

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        both, extra = self._embed(graphdef, params, rest, mesh, self._batches(),
                                  keep=("image_id",))
        half = both.shape[1] // 2
        image_ids = extra["image_id"]
        unique, first = np.unique(image_ids, return_index=True)
        images = both[first, :half]
        captions = both[:, half:]
        caption_image = np.searchsorted(unique, image_ids)
        result = retrieval_recall(images @ captions.T, caption_image)
        return {f"{self.name}/{k}": v for k, v in result.items()}


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int) -> float:
    """Weighted k-NN on cosine similarity: class score Σ_top-k exp(sim/τ)."""
    sim = test_x @ train_x.T
    idx = np.argsort(-sim, axis=1)[:, :k]
    top = np.take_along_axis(sim, idx, axis=1) / temperature
    weights = np.exp(top - top.max(axis=1, keepdims=True))  # the same vote, without overflow
    scores = np.zeros((len(test_x), num_classes))
    np.add.at(scores, (np.repeat(np.arange(len(test_x)), idx.shape[1]), train_y[idx].ravel()),
              weights.ravel())
    return float(np.mean(label_rank(scores, test_y) < 1))  # a tied or NaN vote never wins


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int,
                          l2: float = 1e-4, steps: int = 500, lr: float = 0.05) -> float:
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
    """k-NN and linear-probe accuracy of frozen, normalised image features; with
    `coding_rate_eps_sq`, also their coding rate R_ε (crate_jax.whitebox.coding_rate) over the
    test split, the measure of how far the features are from collapse."""

    def __init__(self, name: str, train_batches: Batches, test_batches: Batches,
                 preprocess: Callable[[dict], jax.Array], num_classes: int, k: int = 20,
                 coding_rate_eps_sq: float | None = None):
        self.name, self._train, self._test = name, train_batches, test_batches
        self.num_classes, self.k = num_classes, k
        self.coding_rate_eps_sq = coding_rate_eps_sq
        self._embed = Embedder(lambda m, b: m.encode_image(preprocess(b)))

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        xtr, ytr = self._embed(graphdef, params, rest, mesh, self._train(), keep=("label",))
        xte, yte = self._embed(graphdef, params, rest, mesh, self._test(), keep=("label",))
        ytr, yte = ytr["label"].astype(np.int32), yte["label"].astype(np.int32)
        out = {
            f"{self.name}/knn_top1": knn_accuracy(xtr, ytr, xte, yte, k=self.k,
                                                  num_classes=self.num_classes),
            f"{self.name}/linear_top1": linear_probe_accuracy(xtr, ytr, xte, yte,
                                                              num_classes=self.num_classes),
        }
        if self.coding_rate_eps_sq is not None:  # collapse shows as a rate near 0
            out[f"{self.name}/coding_rate"] = float(coding_rate(xte, self.coding_rate_eps_sq))
        return out
