"""Masked autoencoding (CRATE-MAE, ViT-MAE) on images without labels.

    m, visible = random_mask(rng, B, N, r)       r = config.mask_ratio (0.75); hides
                                                 N − int(N·(1 − r)) patches of each image
    Ŷ = model.reconstruct(x, m, visible)         (B, N, P²·C)
    Y = patchify(x)                              normalised-image units; with
        config.norm_pix_loss each patch is standardised, (Y − mean_p)/√(var_p + 1e-6),
        var_p torch's unbiased variance (ddof 1) as the official code takes it
    loss = Σ_i m_i · mean_j (Ŷ_ij − Y_ij)² / Σ_i m_i     masked patches of the whole batch

Mask tokens in or out of the encoder is the model's `mask_in_encoder` (config.model.overrides).
Evaluators (config.evals): 'reconstruction' (held-out masked-patch loss, next to predicting each
image's mean colour, and the figure input | masked input | reconstruction written to
WORKDIR/reconstruction.png) and 'probe' (k-NN and linear probe on the frozen encoder's pooled
features). Labels, when the data has them, are used by the probe only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax import config_utils, models
from crate_jax.data import images as image_data
from crate_jax.data import pipeline
from crate_jax.evals.clip import ProbeEvaluator
from crate_jax.evals.reconstruction import ReconstructionEvaluator, with_index
from crate_jax.models.autoencoder import hidden_count, random_mask
from crate_jax.models.layers import patchify
from crate_jax.tasks.base import Task
from crate_jax.tasks.classification import image_preprocess, image_train_data

MASK_STREAM = 0x4D41  # folded into the step's key: the mask draws apart from dropout's


def patch_targets(images: jax.Array, patch: int, norm_pix: bool) -> jax.Array:
    """(B, N, P²·C) pixel targets of normalised images, per-patch standardised if norm_pix
    (with the unbiased variance, ddof 1, plus 1e-6: torch's Tensor.var, as MAE takes it)."""
    target = patchify(images.astype(jnp.float32), patch)
    if norm_pix:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    return target


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """The official loss: the per-patch MSE (mean over a patch's P²·C values) summed over
    the hidden patches of the whole batch, divided by their number."""
    per_patch = jnp.square(pred - target).mean(-1)
    weights = mask.astype(jnp.float32)
    return (per_patch * weights).sum() / jnp.maximum(weights.sum(), 1.0)


class MAETask(Task):
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        cfg = self.config.model
        overrides = config_utils.model_overrides(cfg)
        overrides.setdefault("image_size", self.config.data.image_size)
        if not models.registry.is_autoencoder(cfg.name):
            raise ValueError(f"model.name: {cfg.name!r} is not a masked autoencoder; the 'mae' "
                             "trainer takes 'crate-mae-<size>/<patch>' or "
                             "'vit-mae-<size>/<patch>'")
        num_patches = models.registry.mae_config_for(cfg.name, **overrides).encoder.num_patches
        hidden_count(self.config.get("mask_ratio", 0.75), num_patches)  # checked before a run
        return models.create(cfg.name, rngs=rngs, **overrides)

    def num_layers(self) -> int:
        overrides = config_utils.model_overrides(self.config.model)
        overrides.setdefault("image_size", self.config.data.image_size)
        return models.registry.mae_config_for(self.config.model.name, **overrides).encoder.depth

    def preprocess(self, batch: dict) -> jax.Array:
        return image_preprocess(self.config.data, batch)

    def train_data(self, batch_size: int, seed: int):
        data = self.config.data
        return image_train_data(data, batch_size, seed, image_data.train_transform(data))

    def reconstruction(self, model, images: jax.Array, mask: jax.Array, visible: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
        """(prediction, target), both (B, N, P²·C)."""
        patch = model.cfg.encoder.patch_size
        pred = model.reconstruct(images, mask, visible)
        return pred, patch_targets(images, patch, self.config.get("norm_pix_loss", False))

    def loss(self, model, batch, rng):
        images = self.preprocess(batch)
        enc = model.cfg.encoder
        mask, visible = random_mask(jax.random.fold_in(rng, MASK_STREAM), images.shape[0],
                                    enc.num_patches, self.config.get("mask_ratio", 0.75))
        pred, target = self.reconstruction(model, images, mask, visible)
        loss = mae_loss(pred, target, mask)
        return loss, {"visible_mse": (jnp.square(pred - target).mean(-1) * ~mask).sum()
                      / jnp.maximum((~mask).sum(), 1)}

    def evaluators(self):
        data, specs = self.config.data, self.config.get("evals") or {}
        per_process = self.config.get("eval_batch_size", self.config.batch_size)
        per_process //= jax.process_count()
        eval_transform = image_data.eval_transform(data)

        def batches(split: str, num: int | None):
            source = image_data.image_source(data, split)
            if num:
                source = pipeline.first_examples(source, num)
            return lambda: pipeline.eval_batches(with_index(source), batch_size=per_process,
                                                 transform=_keep_index(eval_transform))

        out = []
        for name, spec in specs.items():
            kind = spec.get("kind")
            test = batches(spec.get("split", data.eval_split), spec.get("num_examples"))
            if kind == "reconstruction":
                out.append(ReconstructionEvaluator(
                    name, test, self.preprocess, self.reconstruction,
                    mask_ratio=self.config.get("mask_ratio", 0.75),
                    norm_pix=self.config.get("norm_pix_loss", False),
                    figure_images=spec.get("figure_images", 8)))
            elif kind == "probe":
                train = batches(spec.get("train_split", data.train_split),
                                spec.get("num_train_examples"))
                out.append(ProbeEvaluator(name, train, test, self.preprocess,
                                          num_classes=spec.num_classes))
            else:
                raise ValueError(f"evals.{name}.kind: {kind!r}; the 'mae' trainer has "
                                 "'reconstruction' and 'probe'")
        return out

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.data.image_size
        return {"image": np.zeros((batch_size, size, size, 3), np.uint8),
                "label": np.zeros((batch_size,), np.int32)}


def _keep_index(transform):
    def apply(example: dict) -> dict:
        return {**transform(example), "index": np.int32(example["index"])}
    return apply
