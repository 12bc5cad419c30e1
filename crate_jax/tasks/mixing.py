"""Mixup and CutMix on the device, on a normalised image batch and soft labels.

Mixup:  x̃ = λ·x + (1 − λ)·x[perm],            ỹ = λ·y + (1 − λ)·y[perm],  λ ~ Beta(α, α)
CutMix: a box of area (1 − λ) from x[perm] pasted into x,  ỹ weighted by the true box area.
With both enabled, each batch uses one of them, CutMix with probability `switch_prob`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float):
    k_lam, k_perm = jax.random.split(rng)
    lam = jax.random.beta(k_lam, alpha, alpha)
    perm = jax.random.permutation(k_perm, images.shape[0])
    mixed = lam * images + (1 - lam) * images[perm]
    return mixed.astype(images.dtype), lam * labels + (1 - lam) * labels[perm]


def cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float):
    k_lam, k_perm, k_y, k_x = jax.random.split(rng, 4)
    _, height, width, _ = images.shape
    lam = jax.random.beta(k_lam, alpha, alpha)
    cut = jnp.sqrt(1.0 - lam)
    h, w = jnp.floor(cut * height), jnp.floor(cut * width)
    cy = jax.random.uniform(k_y, maxval=height)
    cx = jax.random.uniform(k_x, maxval=width)
    y0, y1 = jnp.clip(cy - h / 2, 0, height), jnp.clip(cy + h / 2, 0, height)
    x0, x1 = jnp.clip(cx - w / 2, 0, width), jnp.clip(cx + w / 2, 0, width)
    ys = jnp.arange(height)[:, None] + 0.5
    xs = jnp.arange(width)[None, :] + 0.5
    box = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    perm = jax.random.permutation(k_perm, images.shape[0])
    mixed = jnp.where(box[None, :, :, None], images[perm], images)
    kept = 1.0 - box.mean()  # the exact fraction of pixels left from the original
    return mixed, kept * labels + (1 - kept) * labels[perm]


def mix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, mixup_alpha: float,
        cutmix_alpha: float, switch_prob: float = 0.5):
    """Apply mixup and/or cutmix (alphas of 0 switch one off)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, labels
    if cutmix_alpha <= 0:
        return mixup(rng, images, labels, mixup_alpha)
    if mixup_alpha <= 0:
        return cutmix(rng, images, labels, cutmix_alpha)
    k_choice, k_mix = jax.random.split(rng)
    return jax.lax.cond(jax.random.uniform(k_choice) < switch_prob,
                        lambda: cutmix(k_mix, images, labels, cutmix_alpha),
                        lambda: mixup(k_mix, images, labels, mixup_alpha))
