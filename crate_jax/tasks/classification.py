"""Supervised image classification.

Loss: softmax cross-entropy with label smoothing ε (targets (1 − ε)·onehot + ε/C), or, for
multi-label data (`loss='sigmoid'`, labels as a multi-hot 'labels' array or single 'label'),
the sigmoid cross-entropy summed over classes. Mixup/CutMix (config.mixup, config.cutmix: the
Beta α of each, 0 = off; config.mix_switch_prob) mix the images and the targets on the device,
within each device's shard of the batch. Evaluation: top-1 / top-5 over the whole validation split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from crate_jax import config_utils, models
from crate_jax.data import images as image_data
from crate_jax.data import pipeline
from crate_jax.evals.classification import ClassificationEvaluator
from crate_jax.parallel import DEFAULT_RULES
from crate_jax.tasks import mixing
from crate_jax.tasks.base import Task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """uint8 (B, H, W, 3) on the device → float32 (x/255 − mean)/std."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def image_preprocess(data, batch: dict) -> jax.Array:
    """A host batch's uint8 images, normalised with data.mean / data.std (ImageNet's by
    default): every image task's model input."""
    return normalize(batch["image"], data.get("mean", IMAGENET_MEAN),
                     data.get("std", IMAGENET_STD))


def image_train_data(data, batch_size: int, seed: int, transform):
    """The grain training iterator over data.train_split with a per-example `transform`."""
    return pipeline.train_iterator(
        image_data.image_source(data, data.train_split), batch_size=batch_size, seed=seed,
        transform=transform, num_workers=data.get("num_workers", 0))


class ClassificationTask(Task):
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        cfg = self.config.model
        overrides = config_utils.model_overrides(cfg)
        overrides.setdefault("num_classes", self.config.data.num_classes)
        overrides.setdefault("image_size", self.config.data.image_size)
        return models.create(cfg.name, rngs=rngs, **overrides)

    def num_layers(self) -> int:
        return models.config_for(self.config.model.name,
                                 **config_utils.model_overrides(self.config.model)).depth

    def preprocess(self, batch: dict) -> jax.Array:
        return image_preprocess(self.config.data, batch)

    def train_data(self, batch_size: int, seed: int):
        data = self.config.data
        return image_train_data(data, batch_size, seed, image_data.train_transform(data))

    def targets(self, batch: dict) -> jax.Array:
        num_classes = self.config.data.num_classes
        if "labels" in batch:  # multi-hot
            return batch["labels"].astype(jnp.float32)
        return jax.nn.one_hot(batch["label"], num_classes)

    def batch_axes(self) -> tuple[str, ...]:
        """The mesh axes the batch is split over (config.sharding_rules, else the defaults)."""
        rules = {**DEFAULT_RULES, **dict(self.config.get("sharding_rules") or {})}
        axes = rules["batch"]
        return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)

    def loss(self, model, batch, rng):
        cfg = self.config
        images = self.preprocess(batch)
        targets = self.targets(batch)
        images, targets = mixing.mix_sharded(
            rng, images, targets, batch_axes=self.batch_axes(),
            mixup_alpha=cfg.get("mixup", 0.0), cutmix_alpha=cfg.get("cutmix", 0.0),
            switch_prob=cfg.get("mix_switch_prob", 0.5))
        logits = model(images)
        if cfg.get("loss", "softmax") == "sigmoid":
            loss = optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1).mean()
        else:
            smoothing = cfg.get("label_smoothing", 0.0)
            smoothed = targets * (1 - smoothing) + smoothing / targets.shape[-1]
            loss = optax.softmax_cross_entropy(logits, smoothed).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
        return loss, {"accuracy": accuracy}

    def evaluators(self):
        data = self.config.data
        if not data.get("eval_split"):
            return []
        source = image_data.image_source(data, data.eval_split)
        transform = image_data.eval_transform(data)
        batch_size = self.config.get("eval_batch_size", self.config.batch_size)
        per_process = batch_size // jax.process_count()
        return [ClassificationEvaluator(
            "val", lambda: pipeline.eval_batches(source, batch_size=per_process,
                                                 transform=transform),
            self.preprocess)]

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.data.image_size
        return {"image": np.zeros((batch_size, size, size, 3), np.uint8),
                "label": np.zeros((batch_size,), np.int32)}
