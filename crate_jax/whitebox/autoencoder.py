"""The white-box measurements of a CRATE masked autoencoder's decoder, and the figure that
puts them after the encoder's.

The CRATE decoder undoes the encoder's steps (models/autoencoder.py): where the encoder's
compression term Rᶜ falls layer by layer, the decoder's should rise again as it expands the
tokens back towards pixels. Rᶜ at decoder point ℓ = 0 … L is measured on the tokens entering
decoder layer ℓ (ℓ = L: leaving the last one), projected the way decoder layer min(ℓ, L − 1)'s
MSSA projects them, LN(Z)·U, with the normalisation and ε of the encoder's measurement
(coding_rate.py). The decoder has no sparse code, so no sparsity is reported for it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.whitebox.coding_rate import compression_per_head, summarize
from crate_jax.whitebox.plots import pyplot


def measure_decoder(model: Any, images: jax.Array, *, normalization: str = "reference",
                    eps: float | None = None) -> dict[str, jax.Array]:
    """{'compression': (B, L+1), 'compression_heads': (B, L+1, K)} of a CRATE-MAE's
    decoder on normalised images (nothing masked)."""
    points = model.decoder_points(images)
    depth = model.decoder.depth
    heads = [compression_per_head(model.decoder.layer(min(j, depth - 1)).attn.project(z),
                                  normalization, eps) for j, z in enumerate(points)]
    heads = jnp.stack(heads, axis=1)
    return {"compression": heads.sum(-1), "compression_heads": heads}


def has_crate_decoder(model: Any) -> bool:
    from crate_jax.models.autoencoder import CrateDecoder, MaskedAutoencoder
    return isinstance(model, MaskedAutoencoder) and isinstance(model.decoder, CrateDecoder)


def decoder_summary(per_image: dict[str, np.ndarray]) -> dict[str, Any]:
    out = summarize(per_image)
    out["points"] = list(range(len(out["compression_mean"])))
    return out


def plot_autoencoder(summaries: list[dict], path: str, *, normalization: str) -> None:
    """Rᶜ through the encoder (points 0 … L) and on through the decoder (L … 2L), one curve
    per run that has a CRATE decoder."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for s in summaries:
        enc, dec = s["compression_mean"], s["decoder"]["compression_mean"]
        x_enc = list(range(len(enc)))
        x_dec = [len(enc) - 1 + i for i in range(len(dec))]
        line, = ax.plot(x_enc, enc, marker="o", markersize=3.5, label=f"{s['name']} encoder")
        ax.plot(x_dec, dec, marker="s", markersize=3.5, linestyle="--", color=line.get_color(),
                label=f"{s['name']} decoder")
        ax.axvline(len(enc) - 1, color="0.7", linewidth=0.8)
    ax.set_title(f"Compression $R^c$ through encoder and decoder ({normalization})")
    ax.set_xlabel("point (encoder 0 … L, then decoder)")
    ax.set_ylabel("$R^c$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
