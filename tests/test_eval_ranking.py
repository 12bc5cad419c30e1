"""Ranking that cannot be fooled: ties and NaN count against the example in top-k accuracy
(classification and zero-shot), retrieval recall, k-NN and the linear probe; a NaN model scores
0 and its loss stays NaN. Checked against a plain NumPy loop over classes."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax.evals import clip as clip_evals
from crate_jax.evals.classification import topk_metrics


def reference_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Correct iff fewer than k other classes score >= the label (NaN anywhere counts
    against; a NaN label is never correct). A loop, independent of the vectorised code."""
    out = np.zeros(len(labels), bool)
    for i, (row, label) in enumerate(zip(logits, labels, strict=True)):
        target = row[label]
        if math.isnan(target):
            continue
        beaten_by = sum(1 for c, v in enumerate(row)
                        if c != label and (math.isnan(v) or v >= target))
        out[i] = beaten_by < k
    return out


def _cases():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    logits[np.arange(0, 64, 3), labels[::3]] = logits[np.arange(0, 64, 3), (labels[::3] + 1) % 10]
    logits[5] = 0.0  # all tied
    logits[7, 2] = np.nan  # a NaN rival
    logits[9, labels[9]] = np.nan  # a NaN label logit
    logits[11, (labels[11] + 4) % 10] = np.inf
    logits[13] = np.arange(10, dtype=np.float32)  # clean, label's rank known
    labels[13] = 9
    return logits, labels


def test_topk_metrics_matches_reference_with_ties_and_nan():
    logits, labels = _cases()
    out = {k: np.asarray(v) for k, v in topk_metrics(jnp.asarray(logits),
                                                      jnp.asarray(labels)).items()}
    np.testing.assert_array_equal(out["top1"], reference_correct(logits, labels, 1))
    np.testing.assert_array_equal(out["top5"], reference_correct(logits, labels, 5))
    assert out["top1"][5] == 0 and out["top1"][9] == 0 and out["top5"][9] == 0
    assert out["top1"][13] == 1 and out["top1"][0] == 0  # row 0's label is tied by construction
    ref_loss = np.log(np.sum(np.exp(logits[13].astype(np.float64)))) - logits[13, 9]
    np.testing.assert_allclose(out["loss"][13], ref_loss, rtol=1e-5)
    assert np.isnan(out["loss"][7]) and np.isnan(out["loss"][9])


def test_nan_model_scores_zero_and_its_loss_is_nan():
    logits = jnp.full((4, 6), jnp.nan)
    out = topk_metrics(logits, jnp.array([0, 1, 2, 5]))
    assert float(out["top1"].sum()) == 0 and float(out["top5"].sum()) == 0
    assert np.all(np.isnan(np.asarray(out["loss"])))
    # a constant model (every logit tied) scores nothing either
    assert float(topk_metrics(jnp.zeros((4, 6)), jnp.array([0, 1, 2, 5]))["top1"].sum()) == 0
    assert clip_evals.topk_accuracy(np.full((4, 3), np.nan), np.array([0, 1, 2, 0]), 3) == 0


@pytest.mark.parametrize("k", [1, 2, 5])
def test_zero_shot_topk_matches_reference(k):
    logits, labels = _cases()
    expected = float(np.mean(reference_correct(logits, labels, k)))
    assert clip_evals.topk_accuracy(logits, labels, k) == pytest.approx(expected)


def reference_recall(sim: np.ndarray, positive: np.ndarray, k: int) -> float:
    """Row i is a hit iff fewer than k negatives score >= its best finite positive."""
    hits = []
    for row, pos in zip(sim, positive, strict=True):
        scores = [v for v, p in zip(row, pos, strict=True) if p and not math.isnan(v)]
        if not scores:
            hits.append(False)
            continue
        best = max(scores)
        rivals = sum(1 for v, p in zip(row, pos, strict=True)
                     if not p and (math.isnan(v) or v >= best))
        hits.append(rivals < k)
    return float(np.mean(hits))


def test_retrieval_recall_matches_reference_with_ties_and_nan():
    rng = np.random.default_rng(1)
    caption_image = rng.integers(0, 8, 20)
    caption_image[:8] = np.arange(8)  # every image has a caption
    sim = np.round(rng.normal(size=(8, 20)), 1)  # rounding makes ties
    sim[2, 5] = np.nan
    sim[3, caption_image == 3] = np.nan  # image 3: every own caption NaN
    positive = caption_image[None, :] == np.arange(8)[:, None]
    out = clip_evals.retrieval_recall(sim, caption_image, ks=(1, 3, 5))
    for k in (1, 3, 5):
        assert out[f"i2t_R@{k}"] == pytest.approx(reference_recall(sim, positive, k))
        assert out[f"t2i_R@{k}"] == pytest.approx(reference_recall(sim.T, positive.T, k))
    constant = clip_evals.retrieval_recall(np.zeros((8, 20)), caption_image, ks=(1,))
    assert constant == {"i2t_R@1": 0.0, "t2i_R@1": 0.0}


def test_probes_never_score_a_nan_model():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    x = np.full((60, 6), np.nan)
    assert clip_evals.knn_accuracy(x[:40], y[:40], x[40:], y[40:], num_classes=4) == 0
    assert clip_evals.linear_probe_accuracy(x[:40], y[:40], x[40:], y[40:],
                                            num_classes=4, steps=5) == 0


def test_near_ties_from_rounding_count_as_ties():
    """Two equal captions embed to the same vector only up to rounding, which differs with the
    process count: a negative within TIE_TOLERANCE of the positive counts against, whichever
    side of it the rounding put it."""
    from crate_jax.evals.clip import TIE_TOLERANCE, label_rank, retrieval_recall

    for delta in (-0.3 * TIE_TOLERANCE, 0.0, 0.3 * TIE_TOLERANCE):
        scores = np.array([[0.5, 0.5 + delta, 0.1]], np.float32)
        assert label_rank(scores, np.array([0]))[0] == 1
        sim = np.array([[0.5, 0.5 + delta], [0.1, 0.9]], np.float32)
        assert retrieval_recall(sim, np.array([0, 1]), ks=(1,))["i2t_R@1"] == 0.5
    clear = np.array([[0.5, 0.5 - 10 * TIE_TOLERANCE, 0.1]], np.float32)
    assert label_rank(clear, np.array([0]))[0] == 0
