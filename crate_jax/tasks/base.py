"""What a task gives the shared training loop (crate_jax/train/loop.py).

A task owns its model, its data, its loss and its evaluators; it never runs the loop itself.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from crate_jax.data.pipeline import DataIterator
from crate_jax.evals.base import Evaluator

__all__ = ["Evaluator", "Task"]


class Task(abc.ABC):
    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A freshly initialised model (called under jit and nnx.eval_shape)."""

    @abc.abstractmethod
    def train_data(self, batch_size: int, seed: int) -> DataIterator:
        """An endless iterator of this process's host batches (dicts of NumPy arrays) with
        get_state() / set_state() for checkpointing."""

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: dict[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss (mean over the batch) and scalar metrics, traced inside the train step."""

    def preprocess(self, batch: dict) -> jax.Array:
        """The model's input from a host batch (uint8 images → normalised floats), as the
        loss and the evaluators feed it (crate_jax.load uses it too)."""
        raise NotImplementedError(f"{type(self).__name__} has no image preprocessing")

    # A loss that couples the examples of a batch (contrastive) sets batch_coupled and splits
    # its loss into features and features_loss, for feature-cached gradient accumulation.
    batch_coupled: bool = False

    def features(self, model: nnx.Module, batch: dict, rng: jax.Array) -> Any:
        """Per-example features (a pytree of (B, ...) arrays) the batch loss is computed on."""
        raise NotImplementedError(f"{type(self).__name__} has no per-example features")

    def features_loss(self, model: nnx.Module, features: Any,
                      rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The loss over a whole batch of `features` (with the model's own parameters, e.g. a
        temperature): loss(model, batch) = features_loss(model, features(model, batch))."""
        raise NotImplementedError(f"{type(self).__name__} has no per-example features")

    def frozen_groups(self) -> tuple[str, ...]:
        """Parameter paths the optimizer never updates, whatever config.freeze says: state the
        task updates itself in `after_update` (an EMA teacher)."""
        return ()

    def after_update(self, params: dict, step: jax.Array) -> dict:
        """The parameters after the optimizer's update of `step` (0-based), traced inside the
        train step: a task's own update rule for its frozen groups. Default: unchanged."""
        return params

    def evaluators(self) -> list[Evaluator]:
        return []

    def num_layers(self) -> int | None:
        """Depth for layer-wise learning-rate decay (None: the task has no single depth)."""
        return None

    def param_bounds(self) -> dict[str, tuple[float, float]]:
        """Top-level parameters kept in [lo, hi] after every update (e.g. a temperature)."""
        return {}

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A host batch of the right shapes and dtypes (for ahead-of-time compilation)."""
        it = self.train_data(batch_size, seed=0)
        return next(it)
