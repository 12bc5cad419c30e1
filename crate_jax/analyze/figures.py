"""The analysis figures: the layer-wise curves, attention maps over the images, the PCA of the
patch features and the segmentation panels (matplotlib through crate_jax.whitebox.plots)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from crate_jax.whitebox.plots import pyplot


def _plt():
    return pyplot()


def plot_layerwise(summaries: list[dict], path: str, *, normalization: str) -> None:
    plt = _plt()
    fig, (ax_c, ax_s) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(summaries):
        is_random = s["name"].startswith("random init")
        style = dict(color="0.45" if is_random else colors[i % len(colors)],
                     linestyle="--" if is_random else "-", marker="o", markersize=3.5)
        for ax, x, key in ((ax_c, s["points"], "compression"), (ax_s, s["layers"], "sparsity")):
            mean, std = np.asarray(s[f"{key}_mean"]), np.asarray(s[f"{key}_std"])
            ax.plot(x, mean, label=s["name"], **style)
            ax.fill_between(x, mean - std, mean + std, color=style["color"], alpha=0.2,
                            linewidth=0)
    ax_c.set_title(f"Compression $R^c(Z^\\ell; U^\\ell)$ ({normalization})")
    ax_c.set_xlabel("layer index ℓ (0 = embedding)")
    ax_c.set_ylabel("$R^c$")
    ax_s.set_title("Sparsity of the codes (fraction of zeros)")
    ax_s.set_xlabel("layer index ℓ")
    ax_s.set_ylabel("sparsity")
    for ax in (ax_c, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _resize_map(values: np.ndarray, size: int, bilinear: bool = True) -> np.ndarray:
    img = Image.fromarray(np.asarray(values, np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.BILINEAR if bilinear else Image.NEAREST))


def plot_attention(images: np.ndarray, cls_attention: np.ndarray, grid: tuple[int, int],
                   path: str, *, title: str) -> None:
    """cls_attention (n, K, N): rows = heads, columns = images."""
    plot_attention_rows(images, [("head ", cls_attention)], grid, path, title=title)


def plot_attention_rows(images: np.ndarray, groups: list[tuple[str, np.ndarray]],
                        grid: tuple[int, int], path: str, *, title: str) -> None:
    """One row per head of every (label, maps (n, K, N)) group, labelled label + head index,
    one column per image; each map min-max scaled and upsampled over its image."""
    plt = _plt()
    n, size = len(images), images.shape[1]
    rows = [(f"{label}{k}", maps[:, k]) for label, maps in groups for k in range(maps.shape[1])]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.4 * len(rows) + 0.4),
                             squeeze=False)
    for r, (label, maps) in enumerate(rows):
        for j in range(n):
            amap = maps[j].reshape(grid)
            amap = (amap - amap.min()) / max(float(np.ptp(amap)), 1e-12)
            ax = axes[r, j]
            ax.imshow(images[j])
            ax.imshow(_resize_map(amap, size), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """Features (n, N, d) → the first three principal components (fitted jointly on every
    patch) scaled to [0, 1] per component: (n, N, 3)."""
    n, m, d = features.shape
    x = features.reshape(-1, d).astype(np.float64)
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = comps.min(0), comps.max(0)
    rgb = (comps - lo) / np.maximum(hi - lo, 1e-12)
    return rgb.reshape(n, m, 3)


def plot_pca(images: np.ndarray, features: np.ndarray, grid: tuple[int, int], path: str, *,
             title: str) -> None:
    plt = _plt()
    n, size = len(images), images.shape[1]
    rgb = pca_rgb(features).reshape(n, *grid, 3)
    factor = size // grid[0]
    fig, axes = plt.subplots(2, n, figsize=(1.4 * n, 3.2), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
        axes[1, j].imshow(np.repeat(np.repeat(rgb[j], factor, 0), factor, 1))
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("PCA 1-3", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _overlay(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    palette = np.array([[0, 0, 0], [255, 64, 64], [64, 160, 255], [255, 220, 0], [0, 220, 120],
                        [220, 80, 255], [255, 140, 0], [0, 230, 230]], np.float32)
    out = image.astype(np.float32).copy()
    fg = label > 0
    colour = palette[1 + (label[fg] - 1) % (len(palette) - 1)]
    out[fg] = 0.45 * out[fg] + 0.55 * colour
    return out.astype(np.uint8)


def _label_map(masks: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    label = np.zeros(shape, np.int32)
    for i, m in enumerate(masks, start=1):
        label[np.asarray(m, bool) & (label == 0)] = i
    return label


def plot_segmentation(images: np.ndarray, gt: np.ndarray, predictions: dict[str, list],
                      path: str) -> None:
    plt = _plt()
    n = len(images)
    rows = [("image", None), ("ground truth", None), *predictions.items()]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.45 * len(rows)), squeeze=False)
    for j in range(n):
        shape = images[j].shape[:2]
        panels = [images[j], _overlay(images[j], gt[j])]
        panels += [_overlay(images[j], _label_map(p[j], shape)) for p in predictions.values()]
        for i, panel in enumerate(panels):
            axes[i, j].imshow(panel)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for i, (name, _) in enumerate(rows):
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("MaskCut on the last layer's patch features", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
