"""CRATE, CRATE-α, ViT and text towers in Flax NNX.

    from crate_jax import models
    model = models.create("crate-alpha-b/16", num_classes=1000)
    models.count_params(model)  # 72_328_936
"""

from crate_jax.models.config import TextConfig, TowerConfig, VisionConfig
from crate_jax.models.encoder import INTERMEDIATE_KEYS, Encoder, Layer
from crate_jax.models.registry import (
                                       available,
                                       build,
                                       config_for,
                                       count_params,
                                       create,
                                       flat_params,
)
from crate_jax.models.text import TextTransformer
from crate_jax.models.vision import VisionTransformer

__all__ = [
    "INTERMEDIATE_KEYS", "Encoder", "Layer", "TextConfig", "TextTransformer", "TowerConfig",
    "VisionConfig", "VisionTransformer", "available", "build", "config_for", "count_params",
    "create", "flat_params",
]
