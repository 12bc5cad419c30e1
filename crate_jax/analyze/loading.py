"""Runs for the analysis: a trained run's model from its workdir or a checkpoint (config.json
next to it), its random initialisation, and the images it is measured on."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from crate_jax import tasks
from crate_jax.convert.runs import read_checkpoint
from crate_jax.data import synthetic
from crate_jax.data.synthetic_scenes import ShapesScenes
from crate_jax.models.state import set_batch_stats
from crate_jax.models.tost import ToSTVision
from crate_jax.models.vision import VisionTransformer
from crate_jax.tasks.classification import IMAGENET_MEAN, IMAGENET_STD
from crate_jax.tasks.contrastive import CLIP_MEAN, CLIP_STD
from crate_jax.train.workdir import absolute

DATA_CHOICES = ("synthetic_shapes", "synthetic_segmentation", "synthetic_scenes")


@dataclasses.dataclass
class Run:
    name: str
    source: str
    config: Any  # ml_collections.ConfigDict
    model: Any  # VisionTransformer (the image tower of a CLIP model, an MAE's encoder, ...)
    step: int | None = None
    full: Any = None  # the task's whole model (an MAE with its decoder, SimDINO's pair)


def _read_config(path: epath.Path, flag: str) -> ml_collections.ConfigDict:
    if not path.exists():
        raise FileNotFoundError(f"{flag}: no config.json at {path} (a run's workdir holds the "
                                "resolved config the model is built from)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _image_tower(model, config, flag: str):
    """The image model inside a task's model: CLIP's image tower, a masked autoencoder's
    encoder ('backbone'), SimDINO's teacher backbone, or the model itself."""
    teacher = getattr(model, "teacher", None)
    tower = (getattr(model, "image", None) or getattr(model, "backbone", None)
             or getattr(teacher, "backbone", None) or model)
    if not isinstance(tower, VisionTransformer | ToSTVision):
        raise ValueError(f"{flag}: config trainer {config.get('trainer')!r} builds "
                         f"{type(model).__name__}, not an image model")
    if tower.cfg.block not in ("crate", "crate_alpha", "tost", "vit"):
        raise ValueError(f"{flag}: model block {tower.cfg.block!r} is not CRATE, CRATE-α, "
                         "ToST or ViT (the baseline, measured on its value projections); "
                         "the white-box measurements need attention subspaces and codes")
    return tower


def _task(config, flag: str):
    try:
        return tasks.get(config.trainer)(config)
    except (ValueError, AttributeError, KeyError) as e:
        raise ValueError(f"{flag}: the run's config does not describe an image model ({e})") \
            from e


@functools.lru_cache(maxsize=8)
def _initial_state(config_json: str, seed: int, flag: str):
    """(graphdef, state) of the task's freshly initialised model, initialised under one jit
    (much faster than op by op) and cached per config: a run and its random initialisation
    share it."""
    task = _task(ml_collections.ConfigDict(json.loads(config_json)), flag)
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(params=0, dropout=1)))
    graphdef, _ = nnx.split(abstract)

    def init():
        model = task.build_model(nnx.Rngs(params=seed, dropout=seed + 1))
        return nnx.state(model)

    return graphdef, jax.jit(init)()


def build_model(config, *, seed: int = 0, flag: str = "--workdir"):
    """The task's model for a run config (fresh parameters from `seed`), and its image tower."""
    graphdef, state = _initial_state(config.to_json(sort_keys=True), seed, flag)
    model = nnx.merge(graphdef, state, copy=True)  # never share Variables with the cache
    return model, _image_tower(model, config, flag)


def _with_params(model, params: dict, batch_stats: dict | None = None):
    """`model` with the checkpoint's parameters and, for models with BatchNorm (ToST), its
    running statistics (without them eval mode would use the initial 0 / 1)."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return set_batch_stats(model, batch_stats)


def load_workdir(workdir: str) -> Run:
    """The run in `workdir` (a local folder or gs://...) at its latest checkpoint."""
    path = epath.Path(absolute(workdir))
    if not path.is_dir():
        raise FileNotFoundError(f"--workdir: {workdir} does not exist")
    config = _read_config(path / "config.json", "--workdir")
    ckpt = path / "checkpoints"
    steps = [int(s.name) for s in ckpt.iterdir() if s.name.isdigit()] if ckpt.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"--workdir: {workdir} has no checkpoint in {ckpt}")
    model, tower = build_model(config, seed=int(config.get("seed", 0)), flag="--workdir")
    params, stats, _ = read_checkpoint(ckpt, missing=f"--workdir: {workdir} has no checkpoint "
                                                     f"in {ckpt}")
    _with_params(model, params, stats)
    model.eval()
    return Run(path.name, workdir, config, tower, max(steps), model)


def load_checkpoint(path: str) -> Run:
    """A run from a checkpoints directory (WORKDIR/checkpoints, latest step), a step directory
    (WORKDIR/checkpoints/STEP) or a workdir; the config is the workdir's config.json."""
    path = epath.Path(absolute(path))
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint: {path} does not exist")
    step = None
    if (path / "checkpoints").is_dir():
        directory, workdir = path / "checkpoints", path
    elif path.name.isdigit():
        directory, step = path.parent, int(path.name)
        workdir = directory.parent
    else:
        directory, workdir = path, path.parent
    config = _read_config(workdir / "config.json", "--checkpoint")
    params, stats, step = read_checkpoint(directory, step,
                                          missing=f"--checkpoint: no checkpoint step in {path}")
    model, tower = build_model(config, seed=int(config.get("seed", 0)), flag="--checkpoint")
    _with_params(model, params, stats)
    model.eval()
    return Run(f"{workdir.name}@{step}", str(path), config, tower, step, model)


def random_init(run: Run) -> Run:
    """The run's model at initialisation (its config's seed: the trained run's start point)."""
    model, tower = build_model(run.config, seed=int(run.config.get("seed", 0)))
    model.eval()
    return Run("random init", f"random init of {run.name}", run.config, tower, 0, model)


def normalization_constants(config) -> tuple[np.ndarray, np.ndarray]:
    clip = config.get("trainer") == "contrastive"
    data = config.get("data") or {}
    mean = data.get("mean") or (CLIP_MEAN if clip else IMAGENET_MEAN)
    std = data.get("std") or (CLIP_STD if clip else IMAGENET_STD)
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def load_images(data: str, image_size: int, num_images: int, seed: int = 0) -> dict:
    """{'image': uint8 (n, S, S, 3), 'mask': uint8 (n, S, S) or None} from the test split."""
    if data == "synthetic_shapes":
        source = synthetic.ShapesClassification("test", num_examples=num_images,
                                                image_size=image_size, num_classes=8, seed=seed)
    elif data == "synthetic_segmentation":
        source = synthetic.ShapesSegmentation("test", num_examples=num_images,
                                              image_size=image_size, max_objects=2, seed=seed)
    elif data == "synthetic_scenes":  # cluttered multi-object scenes (whitebox_claims)
        source = ShapesScenes("test", num_examples=num_images, image_size=image_size, seed=seed)
    else:
        raise ValueError(f"--data: unknown data {data!r}; use one of {', '.join(DATA_CHOICES)}")
    examples = [source[i] for i in range(num_images)]
    images = np.stack([e["image"] for e in examples])
    masks = np.stack([e["mask"] for e in examples]) if "mask" in examples[0] else None
    return {"image": images, "mask": masks}
