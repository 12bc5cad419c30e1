"""BERT's masked-language-model corruption of one row, on the host with the example's own RNG.

For a row with candidate positions C (every token that is not special: [PAD], [CLS], [SEP] /
EOS, [MASK]):

    k      = min(max_predictions, max(1, round(mask_prob · |C|)))     (0 when C is empty)
    P      = k positions drawn from C without replacement              (BERT: 15 %)
    each p ∈ P independently: 80 % → [MASK], 10 % → a uniformly random non-special id,
                              10 % → unchanged
    loss   over P only: the targets are the original ids at P

The predictions have a fixed size M = max_predictions (static shapes for the jitted step):
`mlm_positions`, `mlm_ids` (the original ids) and `mlm_weights` (1 for the k real predictions,
0 for the padding). Training draws with grain's per-example RNG (seeded by the example's place in
the global order, so a resumed run draws the same masks); evaluation with a fixed
default_rng([seed, row index]) per row, the same every time.
"""

from __future__ import annotations

import math

import numpy as np

MASK, RANDOM, KEEP = 0, 1, 2  # what happens to a chosen position


def default_max_predictions(seq_len: int, mask_prob: float) -> int:
    """⌈mask_prob · seq_len⌉: 20 for 128 tokens at 15 % (BERT's max_predictions_per_seq 20;
    BERT uses 80 at 512, the configs say so)."""
    return max(1, math.ceil(mask_prob * seq_len))


class BertMasker:
    """mask(example, rng) → the example with masked 'tokens' and the prediction arrays."""

    def __init__(self, *, vocab_size: int, special_ids: tuple[int, ...], mask_id: int,
                 mask_prob: float = 0.15, max_predictions: int = 20,
                 split: tuple[float, float] = (0.8, 0.1)):
        if not 0 < mask_prob < 1:
            raise ValueError(f"data.mask_prob={mask_prob}: must be in (0, 1)")
        if max_predictions < 1:
            raise ValueError(f"data.max_predictions={max_predictions}: must be ≥ 1")
        self.special = np.asarray(sorted(special_ids), np.int32)
        self.replacements = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), self.special)
        self.mask_id, self.mask_prob, self.max_predictions = mask_id, mask_prob, max_predictions
        self.split = split

    def choose(self, tokens: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
        """(sorted chosen positions, what happens at each: MASK / RANDOM / KEEP)."""
        candidates = np.flatnonzero(~np.isin(tokens, self.special))
        if not len(candidates):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        k = min(self.max_predictions, max(1, round(self.mask_prob * len(candidates))))
        chosen = np.sort(rng.choice(candidates, size=k, replace=False))
        u = rng.random(k)
        to_mask, to_random = self.split
        kind = np.where(u < to_mask, MASK, np.where(u < to_mask + to_random, RANDOM, KEEP))
        return chosen, kind

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        tokens = np.asarray(example["tokens"], np.int32)
        chosen, kind = self.choose(tokens, rng)
        inputs = tokens.copy()
        inputs[chosen[kind == MASK]] = self.mask_id
        randoms = chosen[kind == RANDOM]
        inputs[randoms] = rng.choice(self.replacements, size=len(randoms))
        m = self.max_predictions
        positions, ids, weights = (np.zeros(m, np.int32), np.zeros(m, np.int32),
                                   np.zeros(m, np.float32))
        positions[:len(chosen)], ids[:len(chosen)], weights[:len(chosen)] = (
            chosen, tokens[chosen], 1.0)
        out = {k: v for k, v in example.items() if k != "index"}
        out.update(tokens=inputs, mlm_positions=positions, mlm_ids=ids, mlm_weights=weights)
        return out

    def fixed(self, seed: int):
        """The evaluation transform: each row masked with default_rng([seed, its index])."""
        def apply(example: dict) -> dict:
            return self(example, np.random.default_rng([seed, int(example["index"])]))
        return apply
