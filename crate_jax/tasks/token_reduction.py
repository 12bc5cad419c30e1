"""CLIPA image-token reduction on the device: which patches each image keeps.

Resizing to a low resolution is the other (and CLIPA's best) way; it happens in the data
pipeline. The strategies here pick k of the N = g×g patches per image and return their
indices (B, k), sorted, for `VisionTransformer(..., patch_keep=...)`:

    random  a uniformly random subset of k patches
    grid    every s-th row and column (s = round(1/√keep)), at a random offset per image
    block   a random contiguous rectangle of ≈ keep·N patches
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

STRATEGIES = ("none", "random", "grid", "block")


def num_kept(grid: int, keep: float, strategy: str) -> int:
    if strategy == "grid":
        stride = max(1, round(1 / math.sqrt(keep)))
        return (grid // stride) ** 2
    if strategy == "block":
        side = max(1, round(grid * math.sqrt(keep)))
        return side * side
    return max(1, round(grid * grid * keep))


def check_reduction(grid: int, keep: float, strategy: str, tolerance: float = 0.15) -> None:
    """Refuse a `keep` that `strategy` cannot honour on a g×g grid: the fraction of patches it
    really keeps must be within `tolerance` (relative) of `keep`. For example 'grid' keeps
    1/s² of the patches (s = round(1/√keep)), so keep=0.5 would keep all of them."""
    kept = num_kept(grid, keep, strategy) / (grid * grid)
    if abs(kept - keep) > tolerance * keep:
        raise ValueError(
            f"image_reduction: strategy {strategy!r} with keep={keep} keeps {kept:.3f} of the "
            f"{grid}×{grid} patches, not {keep}; choose a keep it can honour (grid: 1/s², e.g. "
            "0.25 or 0.111) or strategy 'random'")


def patch_keep_indices(rng: jax.Array, batch: int, grid: int, keep: float,
                       strategy: str) -> jax.Array | None:
    """(batch, k) int32 indices of the kept patches, or None for 'none' / keep ≥ 1."""
    if strategy not in STRATEGIES:
        raise ValueError(f"image_reduction.strategy: {strategy!r} not in {list(STRATEGIES)}")
    if strategy == "none" or keep >= 1.0:
        return None
    if not 0.0 < keep < 1.0:
        raise ValueError(f"image_reduction.keep: must be in (0, 1], got {keep}")
    check_reduction(grid, keep, strategy)
    n = grid * grid
    if strategy == "random":
        k = num_kept(grid, keep, strategy)
        scores = jax.random.uniform(rng, (batch, n))
        return jnp.sort(jnp.argsort(scores, axis=1)[:, :k], axis=1).astype(jnp.int32)
    if strategy == "grid":
        stride = max(1, round(1 / math.sqrt(keep)))
        side = grid // stride
        offsets = jax.random.randint(rng, (batch, 2), 0, stride)
        rows = offsets[:, :1] + stride * jnp.arange(side)[None]
        cols = offsets[:, 1:] + stride * jnp.arange(side)[None]
    else:  # block
        side = max(1, round(grid * math.sqrt(keep)))
        starts = jax.random.randint(rng, (batch, 2), 0, grid - side + 1)
        rows = starts[:, :1] + jnp.arange(side)[None]
        cols = starts[:, 1:] + jnp.arange(side)[None]
    return (rows[:, :, None] * grid + cols[:, None, :]).reshape(batch, -1).astype(jnp.int32)
