"""Held-out masked-patch reconstruction: the loss, a baseline, and a figure.

Every held-out example gets the same mask at every evaluation and on any number of processes:
its mask is drawn from fold_in(key(EVAL_MASK_SEED), example index). Reported per split:

    {name}/mse              masked-patch MSE of the model (the training target's units)
    {name}/mean_colour_mse  the same for predicting each image's mean colour everywhere (in
                            normalised-image units; with norm_pix_loss the model's targets are
                            per-patch standardised, where predicting the patch mean scores ≈ 1)
    {name}/count            examples

and, when the loop gave the evaluator an output folder, `reconstruction.png` there (process 0):
rows input | masked input | reconstruction (visible patches as given, hidden ones predicted).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

import einops
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from crate_jax.evals.base import Evaluator
from crate_jax.evals.classification import masked_sums, run_masked_average
from crate_jax.models.autoencoder import random_mask
from crate_jax.models.layers import patchify
from crate_jax.models.state import merge_model
from crate_jax.parallel import host_batch_to_global, replicated
from crate_jax.whitebox.plots import pyplot

EVAL_MASK_SEED = 20_240_201


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example mean over the masked patches of the per-patch MSE, (B,)."""
    per_patch = jnp.square(pred - target).mean(-1)
    weights = mask.astype(jnp.float32)
    return (per_patch * weights).sum(-1) / jnp.maximum(weights.sum(-1), 1.0)


def mean_colour_mse(images: jax.Array, patch: int, mask: jax.Array) -> jax.Array:
    """The same masked-patch MSE for predicting each image's mean colour everywhere (B,)."""
    x = images.astype(jnp.float32)
    mean = jnp.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
    return masked_mse(patchify(mean, patch), patchify(x, patch), mask)


class _WithIndex:
    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return {**self.source[index], "index": np.int32(index)}


def with_index(source):
    """The source with each example's index in it ('index'), for per-example eval masks."""
    return _WithIndex(source)


def eval_masks(index: jax.Array, num_patches: int, ratio: float) -> tuple[jax.Array, jax.Array]:
    """(mask (B, N), visible (B, M)) of held-out examples `index` (B,), one draw each."""
    def one(i):
        mask, visible = random_mask(jax.random.fold_in(jax.random.key(EVAL_MASK_SEED), i), 1,
                                    num_patches, ratio)
        return mask[0], visible[0]
    return jax.vmap(one)(index)


def unpatchify(patches: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """(B, N, P²·C) → (B, H, W, C), the inverse of layers.patchify."""
    return einops.rearrange(patches, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c", h=grid[0],
                            w=grid[1], p1=patch, p2=patch)


class ReconstructionEvaluator(Evaluator):
    """See the module docstring. `reconstruction(model, images, mask, visible)` returns
    (prediction, target) as the task's loss computes them."""

    def __init__(self, name: str, batches: Callable[[], Iterable[dict]],
                 preprocess: Callable[[dict], jax.Array], reconstruction: Callable, *,
                 mask_ratio: float, norm_pix: bool = False, figure_images: int = 8):
        self.name, self._batches, self._preprocess = name, batches, preprocess
        self._reconstruction, self.mask_ratio = reconstruction, mask_ratio
        self.norm_pix = norm_pix
        self.figure_images = figure_images
        self.output_dir: str | None = None  # set by the training loop
        self._step = self._figure = None

    def _masked(self, model, batch):
        images = self._preprocess(batch)
        cfg = model.cfg.encoder
        mask, visible = eval_masks(batch["index"], cfg.num_patches, self.mask_ratio)
        pred, target = self._reconstruction(model, images, mask, visible)
        return images, mask, pred, target

    def _compile(self, graphdef, mesh):
        def per_example(model, batch):
            images, mask, pred, target = self._masked(model, batch)
            return {"mse": masked_mse(pred, target, mask),
                    "mean_colour_mse": mean_colour_mse(images, model.cfg.encoder.patch_size,
                                                       mask)}

        def figure(params, rest, batch):
            model = merge_model(graphdef, params, rest, train=False)
            images, mask, pred, _ = self._masked(model, batch)
            patch = model.cfg.encoder.patch_size
            pixels = patchify(images.astype(jnp.float32), patch)
            # per-patch standardised predictions back in pixel units, with the patch's stats
            # (the unbiased variance, as the loss's targets take it)
            mean = pixels.mean(-1, keepdims=True)
            std = jnp.sqrt(pixels.var(-1, keepdims=True, ddof=1) + 1e-6)
            if self.norm_pix:
                pred = pred * std + mean
            return {"pixels": pixels, "pred": pred, "mask": mask}

        self._step = jax.jit(masked_sums(graphdef, per_example), out_shardings=replicated(mesh))
        self._figure = jax.jit(figure, out_shardings=replicated(mesh))

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        if self._step is None:
            self._compile(graphdef, mesh)
        result = run_masked_average(self._batches(), self._step, params, rest, mesh)
        if self.output_dir is not None and self.figure_images:
            first = next(iter(self._batches()))
            out = jax.device_get(self._figure(params, rest, host_batch_to_global(first, mesh)))
            if jax.process_index() == 0:
                model = merge_model(graphdef, params, rest, train=False)
                self.write_figure(out, model.cfg.encoder, first["mask"])
        return {f"{self.name}/{k}": v for k, v in result.items()}

    def write_figure(self, out: dict, cfg, real: np.ndarray) -> str:
        """input | masked | reconstruction for the first real examples, written atomically."""
        n = int(min(self.figure_images, (np.asarray(real) > 0).sum()))
        pixels, pred, mask = (np.asarray(out[k])[:n] for k in ("pixels", "pred", "mask"))
        hidden = mask[..., None]
        masked = np.where(hidden, np.nan, pixels)
        pasted = np.where(hidden, pred, pixels)
        rows = [unpatchify(x, cfg.grid, cfg.patch_size) for x in (pixels, masked, pasted)]
        lo, hi = np.nanmin(rows[0]), np.nanmax(rows[0])
        plt = pyplot()
        fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.4), squeeze=False)
        for r, (row, title) in enumerate(zip(rows, ("input", "masked", "reconstruction"),
                                             strict=True)):
            for c in range(n):
                image = np.nan_to_num((row[c] - lo) / max(hi - lo, 1e-6), nan=0.5)
                axes[r, c].imshow(np.clip(image, 0, 1))
                axes[r, c].set_xticks([])
                axes[r, c].set_yticks([])
            axes[r, 0].set_ylabel(title)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        # A reader never sees half a figure: an object store (gs://) writes whole objects, so
        # the figure goes straight to its name (a rename there is a copy and a delete); a local
        # file is written beside it, then put over the previous evaluation's in one step.
        path = epath.Path(self.output_dir) / "reconstruction.png"
        if "://" in str(path):
            path.write_bytes(buffer.getvalue())
        else:
            tmp = path.parent / "reconstruction.png.tmp"
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(path)
        return str(path)
