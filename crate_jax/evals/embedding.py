"""What every image-text and probe evaluator shares: sharded embedding of masked batches, the
tie-aware ranking behind every accuracy and recall, and the protocol record each evaluator
carries (so that a number always says how it was measured).

Embeddings are computed sharded like training (one jitted encoder per evaluator) over padded
batches; only the real rows (mask 1) come back to the host, in the split's order, so every
process count gives the same metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from crate_jax.models.state import merge_model
from crate_jax.parallel import batch_sharding, host_batch_to_global, replicated

Batches = Callable[[], Iterable[dict[str, np.ndarray]]]
Protocol = dict[str, Any]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    """Runs `fn(model, batch) -> (B, ...)` over masked batches and returns the real rows of the
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


def l2_normalize(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """x / (‖x‖ + eps) along the last axis, eval_in1k.py's form (eps 1e-8)."""
    x = np.asarray(x, np.float32)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + eps)


# Cosine similarities closer than this count as a tie. Two equal captions (or prompts) embed
# to the same vector only up to the rounding of the reduction order, which differs between
# meshes and process counts; without a tolerance such a tie would resolve one way on one
# process count and the other way on another.
TIE_TOLERANCE = 1e-5


def label_rank(scores: np.ndarray, labels: np.ndarray, tolerance: float = TIE_TOLERANCE
               ) -> np.ndarray:
    """0-based rank of each row's label among its scores, counting against the label every
    other class that ties it (within `tolerance`) or is NaN; a NaN label score ranks past the
    last class. So ties and NaN never count as correct."""
    label_score = np.take_along_axis(scores, labels[:, None], axis=1)
    with np.errstate(invalid="ignore"):
        rank = np.sum(~(scores < label_score - tolerance), axis=1) - 1  # -1: the label
    return np.where(np.isnan(label_score[:, 0]), scores.shape[1], rank)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int,
                  tolerance: float = TIE_TOLERANCE) -> float:
    """Fraction of rows whose label ranks in the top k (ties and NaN count against)."""
    return float(np.mean(label_rank(logits, labels, tolerance) < k))


def _mean_std_name(mean: Sequence[float], std: Sequence[float]) -> str:
    # 6 places: what a float32 normalisation read back gives (inference._normalisation)
    pair = (tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std))
    for name, (m, s) in {"ImageNet": (IMAGENET_MEAN, IMAGENET_STD),
                         "CLIP": (CLIP_MEAN, CLIP_STD)}.items():
        if pair == (tuple(round(v, 6) for v in m), tuple(round(v, 6) for v in s)):
            return f"{name} mean/std"
    return f"mean {list(pair[0])} std {list(pair[1])}"


def preprocessing_protocol(size: int, crop_fraction: float, interpolation: str,
                           mean: Sequence[float], std: Sequence[float], *,
                           generated: bool = False) -> Protocol:
    """How evaluation images were made, for a protocol record (images.resize_center_crop;
    `generated`: a synthetic set made at the size, neither resized nor cropped)."""
    short = int(size / crop_fraction + 1e-6)
    resize = {"resize": f"none (generated at {size} px)"} if generated else {
        "resize": f"short side {short} {interpolation}",
        "crop": f"centre {size} (crop fraction {crop_fraction:g})"}
    return {**resize, "normalisation": _mean_std_name(mean, std)}


def describe(protocol: Mapping[str, Any]) -> str:
    """A protocol record as one console line: 'key value; key value; ...'."""
    return "; ".join(f"{k} {v}" for k, v in protocol.items())
