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
from crate_jax.convert.importers import build_loaded
from crate_jax.data import images as image_ops
from crate_jax.train.checkpoint import Checkpointer

__all__ = ["Loaded", "eval_specs", "evaluate", "load", "read_run_config"]

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

    def make() -> nnx.Module:
        return task.build_model(nnx.Rngs(0))

    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(make), nnx.Param))
    model = build_loaded(make, _restore(run_dir, step, abstract))
    model.eval()
    return Loaded(model, config, task)


# --- the evaluators of a run (python -m crate_jax.evaluate) ------------------------------

TFDS_DEFAULT = {"zeroshot": ("imagenet2012", "validation"), "retrieval": ("coco_captions", "val")}
KINDS = ("zeroshot", "retrieval", "probe")


def _synthetic_spec(kind: str, num: int | None) -> dict[str, Any]:
    spec = dict(kind=kind, source="synthetic_captions", split="test",
                num_examples=num or 64)
    if kind == "probe":
        spec.update(train_split="train", holdout_pairs=0, num_classes=64)
    return spec


def _tfds_prepared(name: str, split: str) -> bool:
    from crate_jax.data.images import image_source

    try:
        image_source(ml_collections.ConfigDict(dict(source="tfds", name=name)), split)
    except (FileNotFoundError, ValueError):
        return False
    return True


def eval_specs(config: ml_collections.ConfigDict, kinds: list[str], data: str,
               num: int | None) -> dict[str, dict]:
    """{name: spec} for the requested kinds (see the module docstring)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"--evals: {unknown} unknown; kinds are {list(KINDS)}")
    own = dict(config.get("evals") or {})
    specs = {}
    for kind in kinds:
        if data == "auto":
            mine = [(n, dict(s)) for n, s in own.items() if s.get("kind") == kind]
            if mine:
                specs.update(mine)
                continue
            name, split = TFDS_DEFAULT.get(kind, (None, None))
            if name and _tfds_prepared(name, split):
                specs[kind] = dict(kind=kind, source="tfds", name=name, split=split)
            else:
                print(f"{kind}: {name or 'no TFDS set'} is not prepared; using the synthetic "
                      "captioned shapes", flush=True)
                specs[kind] = _synthetic_spec(kind, num)
        elif data == "synthetic":
            specs[kind] = _synthetic_spec(kind, num)
        elif data.startswith("tfds:"):
            name, _, split = data[5:].partition(":")
            specs[kind] = dict(kind=kind, source="tfds", name=name,
                               split=split or TFDS_DEFAULT.get(kind, ("", "validation"))[1])
        else:
            raise ValueError(f"--data={data!r}: use auto, synthetic or tfds:NAME[:SPLIT]")
        if num is not None:
            specs[kind]["num_examples"] = num
    return specs


def evaluate(workdir: str, *, kinds: list[str], data: str = "auto",
             tokenizer: str | None = None, step: int | None = None,
             num_examples: int | None = None,
             batch_size: int | None = None) -> dict[str, float]:
    """The metrics of the run's evaluators on its checkpoint (see the module docstring)."""
    from crate_jax import parallel
    from crate_jax.train.finetune import _checkpointer

    workdir = absolute(workdir)
    config = read_run_config(workdir, tokenizer)
    if config.trainer == "contrastive":
        if not config.data.get("tokenizer") and "source" not in config.data:
            raise ValueError(f"--tokenizer: {workdir} (an imported checkpoint) names no "
                             "tokenizer; pass the one its text tower was trained with (the "
                             "CRATE-α-CLIPA releases: BERT-base uncased vocab.txt)")
        config.evals = eval_specs(config, kinds, data, num_examples)
    batch_size = batch_size or config.get("eval_batch_size") or 64
    config.eval_batch_size = batch_size
    if "batch_size" not in config:  # an imported run has no training batch
        config.batch_size = batch_size
    task = tasks.get(config.trainer)(config)
    mesh = parallel.make_mesh({"fsdp": -1})
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    shardings = parallel.param_shardings(abstract_params, mesh)
    with jax.set_mesh(mesh):
        rest = jax.jit(lambda: nnx.split(task.build_model(nnx.Rngs(0)), nnx.Param, ...)[2],
                       out_shardings=parallel.replicated(mesh))()
        checkpointer, _ = _checkpointer(workdir)
        try:
            found, _ = checkpointer.saved_params(step)
            target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                    sharding=s),
                                  nnx.to_pure_dict(abstract_params), shardings)
            params = checkpointer.restore_param_subset(found, target)
        finally:
            checkpointer.close()
        results: dict[str, float] = {"step": float(found)}
        for evaluator in task.evaluators():
            results.update(evaluator.run(graphdef, params, rest, mesh))
    return results
