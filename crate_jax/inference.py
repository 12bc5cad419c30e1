"""One call from a run directory to a ready model: `crate_jax.load(run_dir)`.

    import crate_jax
    clip = crate_jax.load("runs/crate_alpha_clipa_l14", tokenizer="vocab.txt")
    probs = clip.zero_shot(["cat.jpg", "dog.jpg"], ["cat", "dog", "car"])   # (2, 3)

`run_dir` is any run directory: one the trainer wrote, or one `python -m crate_jax.convert
import` wrote from a released checkpoint. The model is rebuilt from the run's config.json by
the task that trained it (so it is the model the trainer built), its parameters are read from
the latest checkpoint (or `step`), and it comes with its preprocessing: images are resized,
centre-cropped and normalised as the evaluators do; texts are tokenized with the run's
tokenizer (or `tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from crate_jax import tasks
from crate_jax.data import images as image_ops
from crate_jax.train.checkpoint import Checkpointer

__all__ = ["Loaded", "load", "read_run_config"]

DEFAULT_TEMPLATE = "a photo of a {}."


def absolute(path: str) -> str:
    """A local path made absolute (orbax needs absolute paths); gs:// and the like as given."""
    path = str(path)
    return path if "://" in path else os.path.abspath(path)


def read_run_config(run_dir: str, tokenizer: str | None = None) -> ml_collections.ConfigDict:
    """The run's config.json as a ConfigDict, with `tokenizer` (when given) as data.tokenizer."""
    path = epath.Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.json (not a run directory the trainer "
                                "or `python -m crate_jax.convert import` wrote)")
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    if tokenizer is not None:
        config.data.tokenizer = tokenizer
    return config


def _restore(run_dir: str, step: int | None, like: Any) -> dict:
    """The run's parameters, onto this process's first device."""
    checkpointer = Checkpointer(epath.Path(run_dir) / "checkpoints", async_save=False)
    try:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = checkpointer.restore_params(step, sharding)
    finally:
        checkpointer.close()
    want = jax.tree.map(lambda x: x.shape, like)
    got = jax.tree.map(lambda x: x.shape, saved)
    if want != got:
        raise ValueError(f"{run_dir}: the checkpoint's parameters do not fit the model its "
                         "config.json describes")
    return saved


@dataclasses.dataclass
class Loaded:
    """A model ready for inference with its preprocessing. `model` is the nnx module in eval
    mode; for a two-tower run `encode_image` / `encode_text` / `zero_shot` work, for a
    classifier `classify`."""

    model: nnx.Module
    config: ml_collections.ConfigDict
    task: tasks.Task

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    def pixels(self, images: Sequence[Any]) -> np.ndarray:
        """Paths, PIL images or HxWx3 uint8 arrays → a (B, S, S, 3) uint8 batch, resized and
        centre-cropped as the evaluation pipeline does."""
        from PIL import Image

        out = []
        for image in images:
            if isinstance(image, str | epath.Path):
                with epath.Path(image).open("rb") as f:
                    image = Image.open(f).convert("RGB")
            image = image_ops.to_pil(image)
            if image.size != (self.image_size, self.image_size):
                image = image_ops.resize_center_crop(
                    image, self.image_size, self.config.data.get("eval_crop_fraction", 0.875))
            out.append(np.asarray(image, np.uint8))
        return np.stack(out)

    def _image_input(self, images: Sequence[Any]) -> jax.Array:
        batch = images if isinstance(images, np.ndarray) and images.ndim == 4 else \
            self.pixels(images)
        return self.task.preprocess({"image": jnp.asarray(batch)})

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        from crate_jax.data import image_text
        from crate_jax.data.tokenizer import tokenize

        data = self.config.data
        return tokenize(image_text.tokenizer_for(data), list(texts), data.context_length)

    def encode_image(self, images: Sequence[Any]) -> np.ndarray:
        """L2-normalised image embeddings (B, embed_dim)."""
        return np.asarray(self.model.encode_image(self._image_input(images)))

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings (B, embed_dim)."""
        return np.asarray(self.model.encode_text(jnp.asarray(self.tokenize(texts))))

    def zero_shot(self, images: Sequence[Any], class_names: Sequence[str],
                  templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> np.ndarray:
        """Class probabilities (B, classes): each class embedded as the mean of its prompts."""
        prompts = [t.format(name) for name in class_names for t in templates]
        text = self.encode_text(prompts).reshape(len(class_names), len(templates), -1).mean(1)
        text /= np.linalg.norm(text, axis=-1, keepdims=True)
        logits = float(np.exp(self.model.logit_scale[...])) * self.encode_image(images) @ text.T
        return np.asarray(jax.nn.softmax(logits, axis=-1))

    def classify(self, images: Sequence[Any]) -> np.ndarray:
        """Class probabilities of an image classifier (B, classes)."""
        logits = self.model(self._image_input(images))
        return np.asarray(jax.nn.softmax(logits, axis=-1))


def load(run_dir: str, *, step: int | None = None, tokenizer: str | None = None) -> Loaded:
    """The run's model (the latest checkpoint, or `step`) with its preprocessing."""
    run_dir = absolute(run_dir)
    config = read_run_config(run_dir, tokenizer)
    task = tasks.get(config.trainer)(config)
    graphdef, abstract, rest = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))),
                                         nnx.Param, ...)
    rest = jax.jit(lambda: nnx.split(task.build_model(nnx.Rngs(0)), nnx.Param, ...)[2])()
    params = _restore(run_dir, step, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, params)
    model = nnx.merge(graphdef, abstract, rest)
    model.eval()
    return Loaded(model, config, task)
