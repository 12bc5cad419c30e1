"""The static HTML pages of crate_jax/whitebox/neurons.py (an index and one page per layer) and
its figure.

Plain HTML and inline CSS, no script and nothing fetched, so the folder can be opened from disk
or served as it is. In a snippet each token's background is the neuron's activation there
relative to its largest one on the sample; the token whose activation is listed is boxed.
Newlines show as ↵ and tabs as →, so a snippet stays one line.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

BEFORE, AFTER = 24, 6  # context tokens shown around a snippet's token

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; }
th { text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.neuron { margin: 1.5em 0; } .meta { color: #555; font-size: 90%; }
.snip { font-family: ui-monospace, monospace; white-space: pre; margin: 2px 0; }
.tok { border-radius: 2px; } .cur { outline: 2px solid #c00; font-weight: bold; }
.act { display: inline-block; width: 5em; color: #555; }
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _shown(text: str) -> str:
    return html.escape(text.replace("\n", "↵").replace("\t", "→").replace("\r", ""))


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def snippet_html(inputs: np.ndarray, activations: np.ndarray, row: int, pos: int,
                 peak: float, tokenizer: Any) -> str:
    """One snippet: the tokens around (row, pos), each shaded by its activation / peak."""
    start, stop = max(0, pos - BEFORE), min(inputs.shape[1], pos + AFTER + 1)
    spans = []
    for t in range(start, stop):
        level = float(np.clip(activations[row, t] / peak, 0, 1)) if peak > 0 else 0.0
        cls = "tok cur" if t == pos else "tok"
        spans.append(f"<span class='{cls}' style='background: rgba(255,120,0,{level:.2f})' "
                     f"title='{activations[row, t]:.3f}'>"
                     f"{_shown(tokenizer.token_text(int(inputs[row, t])))}</span>")
    return (f"<div class='snip'><span class='act'>{activations[row, pos]:.3f}</span>"
            + "".join(spans) + "</div>")


def write_layer_page(path: str, *, name: str, layer: int, summary: dict, stats: Any,
                     columns: np.ndarray, inputs: np.ndarray, tokenizer: Any,
                     snippets: int) -> None:
    """The page of one layer: its figures and, per top neuron, its top snippets.
    columns (S·L, n): the top neurons' activations at every sample token."""
    seq_len = inputs.shape[1]
    parts = [f"<p><a href='index.html'>index</a></p><h1>{html.escape(name)} · layer {layer}"
             "</h1>",
             f"<p class='meta'>code width {summary['width']} · sparsity "
             f"{_fmt(summary['sparsity'])} · dead {_fmt(summary['dead_fraction'])} · "
             f"monosemanticity {_fmt(summary['monosemanticity'])} (top neurons "
             f"{_fmt(summary['monosemanticity_top'])}, chance {_fmt(summary['chance'])})</p>"]
    for j, neuron in enumerate(summary["top_neurons"]):
        n = neuron["neuron"]
        acts = columns[:, j].reshape(-1, seq_len)
        peak = float(stats.top_values[0, n])
        token = "" if neuron["token"] is None else f" · top token “{_shown(neuron['token'])}”"
        parts.append(f"<div class='neuron'><h3>neuron {n}</h3><p class='meta'>activity "
                     f"{neuron['activity']:.4f} · active on {100 * neuron['frequency']:.1f} % "
                     f"of tokens · score {_fmt(neuron['score'])}{token}</p>")
        for k in range(min(snippets, stats.top_values.shape[0])):
            if not stats.top_values[k, n] > 0:
                break
            flat = int(stats.top_index[k, n])
            parts.append(snippet_html(inputs, acts, flat // seq_len, flat % seq_len, peak,
                                      tokenizer))
        parts.append("</div>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page(f"{name} layer {layer}", "\n".join(parts)))


def write_index(path: str, summary: dict) -> None:
    """index.html: per model a table of its layers, each linked to its page."""
    parts = ["<h1>Neurons of the sparse codes</h1>",
             f"<p class='meta'>{html.escape(summary['workdir'])} · step {summary['step']} · "
             f"{summary['sequences']} {html.escape(summary['split'])} sequences, "
             f"{summary['tokens']:,} tokens · score: {html.escape(summary['score'])}, "
             f"k = {summary['score_k']}</p>"]
    for name, model in summary["models"].items():
        parts.append(f"<h2>{html.escape(name)} ({html.escape(model['block'])}, width "
                     f"{model['width']}, depth {model['depth']})</h2><p class='meta'>sparsity: "
                     f"{html.escape(model['sparsity_definition'])}</p><table><tr><th>layer</th>"
                     "<th>code width</th><th>sparsity</th><th>dead</th><th>monosemanticity"
                     "</th><th>top neurons</th><th>chance</th></tr>")
        for i, layer in enumerate(model["layers"]):
            cells = [layer["width"], _fmt(layer["sparsity"]), _fmt(layer["dead_fraction"]),
                     _fmt(layer["monosemanticity"]), _fmt(layer["monosemanticity_top"]),
                     _fmt(layer["chance"])]
            parts.append(f"<tr><td><a href='{html.escape(layer['page'])}'>layer {i}</a></td>"
                         + "".join(f"<td class='n'>{c}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page("neurons", "\n".join(parts)))


def write_figure(path: str, summary: dict) -> None:
    """neurons.png: sparsity and monosemanticity (with the chance level) against depth, one
    curve a model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, model in summary["models"].items():
        layers = model["layers"]
        depth = range(len(layers))
        label = f"{name} ({model['block']})"
        left.plot(depth, [x["sparsity"] for x in layers], marker="o", label=label)
        right.plot(depth, [np.nan if x["monosemanticity"] is None else x["monosemanticity"]
                           for x in layers], marker="o", label=label)
        chance = layers[0]["chance"]
    right.axhline(chance, color="gray", linestyle="--", label="chance")
    left.set(xlabel="layer", ylabel="sparsity of the code", ylim=(0, 1))
    right.set(xlabel="layer", ylabel=f"token concentration (top {summary['score_k']})",
              ylim=(0, 1))
    for ax in (left, right):
        ax.set_xticks(list(depth))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
