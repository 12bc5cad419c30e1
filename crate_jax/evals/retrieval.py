"""Image↔text retrieval as CLIP papers report it (COCO 5k Karpathy test, Flickr30k 1k test):

    sim_ij = ⟨u_i, v_j⟩          u_i the i-th image's embedding, v_j the j-th caption's
    image→text R@k: some caption of image i is among its k most similar captions
    text→image R@k: caption j's image is among its k most similar images

Each image is embedded once, with its first K captions (captions_per_image; fewer where an
image has fewer) embedded in the same batch row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.evals.base import Evaluator
from crate_jax.evals.embedding import TIE_TOLERANCE, Batches, Embedder, Protocol


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
    """Batches hold one row per image: 'image' (B, S, S, 3), 'tokens' (B, K, L) its first K
    captions (padded), 'caption_mask' (B, K) which of them are real, and 'mask'."""

    def __init__(self, name: str, batches: Batches, preprocess: Callable[[dict], jax.Array],
                 *, protocol: Protocol | None = None):
        self.name, self._batches = name, batches
        self.protocol = {**(protocol or {}), "embedding": "each image once, each caption once",
                         "image→text hit": "any of the image's captions in the top k",
                         "metrics": "R@1/5/10 both ways"}

        def embed(model, batch):
            tokens = batch["tokens"]
            b, k, length = tokens.shape
            text = model.encode_text(tokens.reshape(b * k, length)).reshape(b, -1)
            return jnp.concatenate([model.encode_image(preprocess(batch)), text], axis=-1)
        self._embed = Embedder(embed)

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        both, extra = self._embed(graphdef, params, rest, mesh, self._batches(),
                                  keep=("caption_mask",))
        caption_mask = extra["caption_mask"] > 0  # (N, K)
        n, k = caption_mask.shape
        dim = both.shape[1] // (k + 1)
        images = both[:, :dim]
        captions = both[:, dim:].reshape(n, k, dim)[caption_mask]  # image-major, stored order
        caption_image = np.nonzero(caption_mask)[0]
        result = retrieval_recall(images @ captions.T, caption_image)
        return {**{f"{self.name}/{key}": v for key, v in result.items()},
                f"{self.name}/images": float(n), f"{self.name}/captions": float(len(captions))}
