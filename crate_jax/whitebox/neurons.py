"""Neuron-level interpretability of a language-model run (causal, or masked: CRATE-BERT's
bidirectional encoder): how sparse each layer's code is, which held-out text makes its most
active neurons fire, and how monosemantic they look.

    python -m crate_jax.analyze --workdir=RUN --out=DIR \
        [--num-sequences 64] [--top-neurons 12] [--snippets 8]      (the command line)

The code of a layer, one vector a_t ∈ R^C per token t (encoder `collect=True`, 'codes'):

    CRATE     (block 'crate')        the ISTA output Z' = ReLU(X·M − ηλ), C = d
    CRATE-α   (block 'crate_alpha')  the ODL sparse code A (after the last ISTA step), C = 4d
    GPT-2     (block 'vit')          the MLP's hidden activations GELU(LN(Z)·W₁ + b₁), C = 4d

A neuron is one coordinate of it. Measured over the first `num_sequences` rows of the held-out
split (data.eval_path; the training split when there is none), real tokens only:

    sparsity         the fraction of (token, neuron) entries that are inactive: = 0 for the
                     CRATE codes (ReLU), ≤ 0 for GPT-2 (GELU is negative below 0 and never
                     exactly 0 there); fraction_zero and fraction_nonpositive are given for all
    activity         of a neuron: mean_t max(a_t, 0); the `top_neurons` highest are shown
    dead_fraction    neurons never > 0 on the sample
    monosemanticity  (token concentration) for a neuron, its k = SCORE_K largest positive
                     activations; the score is the fraction of them whose current token is the
                     one most common among them, in [1/k, 1]: 1 when the neuron fires hardest
                     on a single token type. A layer's score is the mean over the neurons with
                     at least 2 positive activations (and over its top neurons); `chance` is the
                     same score for k positions drawn at random from the sample, the level a
                     neuron with no token preference reaches
    snippets         per top neuron, its `snippets` highest activations, each shown as the
                     current token (boxed) in its context, every token shaded by the neuron's
                     activation there

Writes DIR/index.html (every model and layer, linked), DIR/{model}_layer{L}.html (one page per
layer), DIR/neurons.png (sparsity and monosemanticity against depth) and DIR/neurons.json (the
summary `analyze_language_run` returns). A side-by-side run
(config.compare_with) is analysed for both models ('crate' and 'baseline').
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np

from crate_jax.whitebox import neuron_pages

SCORE_K = 20
SPARSITY_DEFINITION = {
    "crate": "fraction of exact zeros of the ISTA output (ReLU)",
    "crate_alpha": "fraction of exact zeros of the ODL sparse code A (ReLU)",
    "vit": "fraction of MLP activations ≤ 0 (GELU)",
}


@dataclasses.dataclass
class LayerStats:
    """Running statistics of one layer's code over the sample."""

    width: int
    keep: int
    total: int = 0
    zero: int = 0
    nonpositive: int = 0
    positive_sum: np.ndarray = None
    positive_count: np.ndarray = None
    top_values: np.ndarray = None  # (keep, C), descending per column after `finish`
    top_index: np.ndarray = None  # (keep, C) flat token index in the sample

    def __post_init__(self):
        self.positive_sum = np.zeros(self.width)
        self.positive_count = np.zeros(self.width, np.int64)
        self.top_values = np.full((self.keep, self.width), -np.inf, np.float32)
        self.top_index = np.zeros((self.keep, self.width), np.int64)

    def update(self, codes: np.ndarray, index: np.ndarray) -> None:
        """codes (N, C) of the real tokens with flat sample indices `index` (N,)."""
        self.total += codes.size
        self.zero += int((codes == 0).sum())
        self.nonpositive += int((codes <= 0).sum())
        positive = np.maximum(codes, 0)
        self.positive_sum += positive.sum(0)
        self.positive_count += (codes > 0).sum(0)
        values = np.concatenate([self.top_values, codes.astype(np.float32)])
        where = np.concatenate([self.top_index, np.broadcast_to(index[:, None], codes.shape)])
        pick = np.argpartition(-values, self.keep - 1, axis=0)[:self.keep]
        self.top_values = np.take_along_axis(values, pick, 0)
        self.top_index = np.take_along_axis(where, pick, 0)

    def finish(self) -> None:
        order = np.argsort(-self.top_values, axis=0, kind="stable")
        self.top_values = np.take_along_axis(self.top_values, order, 0)
        self.top_index = np.take_along_axis(self.top_index, order, 0)


def concentration(tokens: np.ndarray) -> float:
    """The fraction of `tokens` equal to their most common value."""
    _, counts = np.unique(tokens, return_counts=True)
    return float(counts.max() / len(tokens))


def neuron_scores(stats: LayerStats, tokens: np.ndarray, k: int = SCORE_K
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(score per neuron, NaN where fewer than 2 positive activations; its top token)."""
    scores = np.full(stats.width, np.nan)
    modes = np.full(stats.width, -1, np.int64)
    for n in range(stats.width):
        positive = stats.top_values[:k, n] > 0
        if positive.sum() < 2:
            continue
        current = tokens[stats.top_index[:k, n][positive]]
        values, counts = np.unique(current, return_counts=True)
        scores[n], modes[n] = counts.max() / len(current), values[counts.argmax()]
    return scores, modes


def chance_score(tokens: np.ndarray, k: int = SCORE_K, draws: int = 200,
                 seed: int = 0) -> float:
    """The token concentration of k random sample positions, averaged over `draws`."""
    rng = np.random.default_rng(seed)
    k = min(k, len(tokens))
    return float(np.mean([concentration(rng.choice(tokens, k, replace=False))
                          for _ in range(draws)]))


def _sample(run, num_sequences: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(inputs (S, L) int32, real-token mask (S, L) bool, split name) of the sample."""
    from crate_jax.data.text import LMRows
    task = run.task
    stream, split = task.eval_stream, "eval"
    if stream is None:
        stream, split = task.train_stream, "train"
    rows = LMRows(stream, task.seq_len, pad_id=task.tokenizer.pad_id, tail=True)
    if not len(rows):
        raise ValueError(f"data.{split}_path: too little text for one row of "
                         f"{task.seq_len} tokens")
    picked = [rows[i] for i in range(min(num_sequences, len(rows)))]
    inputs = np.stack([r["tokens"][:-1] for r in picked])
    real = np.stack([r["weights"] for r in picked]) > 0
    return inputs, real, split


@functools.cache
def _codes_fn():
    """model, tokens (B, L) → the codes of every layer (depth, B, L, C); one jitted function
    for both passes and every call (compiled once per model structure and shape)."""
    from flax import nnx

    def codes(model, tokens):
        if hasattr(model, "encode"):  # a masked LM: its bidirectional encoder's codes
            return model.encode(tokens, collect=True)[1]["codes"]
        return model(tokens, collect=True)[1]["codes"]
    return nnx.jit(codes)


def _measure(model, inputs: np.ndarray, real: np.ndarray, keep: int, batch: int
             ) -> list[LayerStats]:
    """One pass over the sample: every layer's statistics."""
    codes_of, stats = _codes_fn(), None
    flat = np.arange(inputs.size).reshape(inputs.shape)
    for start in range(0, len(inputs), batch):
        codes = np.asarray(codes_of(model, inputs[start:start + batch]), np.float32)
        mask = real[start:start + batch]
        if stats is None:
            stats = [LayerStats(codes.shape[-1], keep) for _ in range(codes.shape[0])]
        for layer, s in enumerate(stats):
            s.update(codes[layer][mask], flat[start:start + batch][mask])
    for s in stats:
        s.finish()
    return stats


def _columns(model, inputs: np.ndarray, neurons: list[np.ndarray], batch: int
             ) -> list[np.ndarray]:
    """Second pass: per layer the activations (S·L, n) of its chosen neurons at every token."""
    codes_of = _codes_fn()
    out = [[] for _ in neurons]
    for start in range(0, len(inputs), batch):
        codes = np.asarray(codes_of(model, inputs[start:start + batch]), np.float32)
        for layer, chosen in enumerate(neurons):
            out[layer].append(codes[layer][..., chosen].reshape(-1, len(chosen)))
    return [np.concatenate(parts) for parts in out]


def _layer_summary(stats: LayerStats, tokens: np.ndarray, block: str, top: int,
                   tok) -> tuple[dict, np.ndarray]:
    activity = stats.positive_sum / max(stats.total // stats.width, 1)
    chosen = np.argsort(-activity, kind="stable")[:top]
    scores, modes = neuron_scores(stats, tokens)
    scored = scores[~np.isnan(scores)]
    summary = dict(
        width=stats.width,
        # GELU MLPs (ViT / GPT-2, ToST) are never exactly 0: their inactive units are ≤ 0
        sparsity=(stats.nonpositive if block in ("vit", "tost") else stats.zero) / stats.total,
        fraction_zero=stats.zero / stats.total,
        fraction_nonpositive=stats.nonpositive / stats.total,
        dead_fraction=float((stats.positive_count == 0).mean()),
        monosemanticity=float(scored.mean()) if len(scored) else None,
        monosemanticity_top=float(np.nanmean(scores[chosen])) if
        (~np.isnan(scores[chosen])).any() else None,
        scored_neurons=len(scored),
        top_neurons=[dict(neuron=int(n), activity=float(activity[n]),
                          frequency=float(stats.positive_count[n]
                                          / max(stats.total // stats.width, 1)),
                          score=None if np.isnan(scores[n]) else float(scores[n]),
                          token=tok.token_text(int(modes[n])) if modes[n] >= 0 else None)
                     for n in chosen])
    return summary, chosen


def analyze_model(name: str, model: Any, run: Any, inputs: np.ndarray, real: np.ndarray,
                  out: str, *,
                  top_neurons: int, snippets: int, batch: int) -> dict:
    """The summary of one language model and its layer pages in `out`."""
    block = model.cfg.block
    tokens = inputs.reshape(-1)
    stats = _measure(model, inputs, real, max(SCORE_K, snippets), batch)
    layers, chosen = [], []
    for s in stats:
        summary, picked = _layer_summary(s, tokens, block, top_neurons, run.tokenizer)
        layers.append(summary)
        chosen.append(picked)
    columns = _columns(model, inputs, chosen, batch)
    chance = chance_score(tokens[real.reshape(-1)])
    for layer, (summary, s) in enumerate(zip(layers, stats, strict=True)):
        summary["chance"] = chance
        summary["page"] = f"{name}_layer{layer}.html"
        neuron_pages.write_layer_page(
            os.path.join(out, summary["page"]), name=name, layer=layer, summary=summary,
            stats=s, columns=columns[layer], inputs=inputs, tokenizer=run.tokenizer,
            snippets=snippets)
    return dict(block=block, width=model.cfg.width, depth=model.cfg.depth,
                sparsity_definition=SPARSITY_DEFINITION[block], layers=layers)


def analyze_language_run(run: Any, out: str, *, num_sequences: int = 64,
                         top_neurons: int = 12, snippets: int = 8) -> dict:
    """Analyse a loaded LM run (`crate_jax.generate.load_language_run(workdir, causal=False)`:
    causal, or masked with its bidirectional encoder; module docstring); writes index.html,
    one page per model and layer and neurons.json into `out`, and returns the summary."""
    for flag, value in (("num_sequences", num_sequences), ("top_neurons", top_neurons),
                        ("snippets", snippets)):
        if value < 1:
            raise ValueError(f"{flag}={value}: must be ≥ 1")
    inputs, real, split = _sample(run, num_sequences)
    os.makedirs(out, exist_ok=True)
    batch = max(1, 2048 // inputs.shape[1])  # the collected attention maps grow with L²
    summary: dict[str, Any] = dict(
        workdir=os.path.abspath(run.workdir), step=run.step, split=split,
        sequences=len(inputs), tokens=int(real.sum()), score_k=SCORE_K,
        score="token concentration of the top-k activations (module docstring)", models={})
    for name, model in run.language_models().items():
        summary["models"][name] = analyze_model(
            name, model, run, inputs, real, out, top_neurons=top_neurons, snippets=snippets,
            batch=batch)
    with open(os.path.join(out, "neurons.json"), "w") as f:
        json.dump(summary, f, indent=2)
    neuron_pages.write_index(os.path.join(out, "index.html"), summary)
    neuron_pages.write_figure(os.path.join(out, "neurons.png"), summary)
    return summary


def format_summary(summary: dict) -> str:
    """A table: model, layer, sparsity, dead fraction, monosemanticity (all / top), chance."""
    lines = [f"{'model':<9} {'layer':>5} {'sparsity':>8} {'dead':>6} {'mono':>6} "
             f"{'mono@top':>8} {'chance':>6}"]

    def fmt(x):
        return "   -  " if x is None else f"{x:6.3f}"

    for name, m in summary["models"].items():
        for i, layer in enumerate(m["layers"]):
            lines.append(f"{name:<9} {i:>5} {layer['sparsity']:8.3f} "
                         f"{layer['dead_fraction']:6.3f} {fmt(layer['monosemanticity'])} "
                         f"{fmt(layer['monosemanticity_top']):>8} {layer['chance']:6.3f}")
    return "\n".join(lines)
