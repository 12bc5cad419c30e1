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
from crate_jax.models.state import set_batch_stats, with_batch_stats
from crate_jax.train.checkpoint import Checkpointer
from crate_jax.train.workdir import absolute

__all__ = ["Loaded", "eval_specs", "evaluate", "load", "read_run_config"]

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


def _restore(run_dir: str, step: int | None, like: Any) -> tuple[dict, dict]:
    """The run's parameters and BatchNorm running statistics ({} for a model without
    BatchNorm), onto this process's first device."""
    checkpointer = Checkpointer(epath.Path(run_dir) / "checkpoints", async_save=False)
    try:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = checkpointer.restore_params(step, sharding)
        stats = checkpointer.restore_batch_stats(step, sharding)
    finally:
        checkpointer.close()
    want = jax.tree.map(lambda x: x.shape, like)
    got = jax.tree.map(lambda x: x.shape, saved)
    if want != got:
        raise ValueError(f"{run_dir}: the checkpoint's parameters do not fit the model its "
                         "config.json describes")
    return saved, stats


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

        crop, interpolation = image_ops.eval_resize_settings(
            self.config.data, getattr(self.task, "eval_crop_default", image_ops.DEFAULT_EVAL_CROP))
        out = []
        for image in images:
            if isinstance(image, str | epath.Path):
                with epath.Path(image).open("rb") as f:
                    image = Image.open(f).convert("RGB")
            image = image_ops.resize_center_crop(image_ops.to_pil(image), self.image_size,
                                                 crop, interpolation)
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

    def zero_shot_weights(self, class_names: Sequence[str],
                          templates: Sequence[str] | None = None) -> np.ndarray:
        """(classes, embed_dim) zero-shot weights: per class, the mean of its L2-normalised
        prompt embeddings, normalised again (eval_in1k.py's rule); `templates` default to
        OpenAI CLIP's 80 ImageNet templates, as the release evaluates."""
        from crate_jax.evals.zeroshot import class_weights, imagenet_templates

        templates = list(templates) if templates is not None else imagenet_templates()
        return class_weights(self.encode_text, list(class_names), templates)

    def zero_shot(self, images: Sequence[Any], class_names: Sequence[str],
                  templates: Sequence[str] | None = None) -> np.ndarray:
        """Class probabilities (B, classes): softmax of 100 · cos(image, zero_shot_weights),
        the logits of eval_in1k.py, on images preprocessed as the run's evaluation does."""
        from crate_jax.evals.embedding import l2_normalize
        from crate_jax.evals.zeroshot import LOGIT_SCALE

        weights = self.zero_shot_weights(class_names, templates)
        logits = LOGIT_SCALE * l2_normalize(self.encode_image(images)) @ weights.T
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
    params, stats = _restore(run_dir, step, abstract)
    model = build_loaded(make, params)
    set_batch_stats(model, stats)
    model.eval()
    return Loaded(model, config, task)


# --- the evaluators of a run (python -m crate_jax.evaluate) ------------------------------

KINDS = ("zeroshot", "retrieval", "probe")
# The published protocols' sets, each used by --data=auto when it is prepared: zero-shot
# ImageNet-1K validation; retrieval on COCO's Karpathy 5k test and Flickr30k's 1k test;
# probes (k-NN, linear) trained on ImageNet-1K train, tested on its validation split.
TFDS_DEFAULT = {"zeroshot": [("imagenet2012", "validation")],
                "retrieval": [("coco_captions", "test"), ("flickr30k", "test")],
                "probe": [("imagenet2012", "train,validation")]}


def _synthetic_spec(kind: str, num: int | None) -> dict[str, Any]:
    spec = dict(kind=kind, source="synthetic_captions", split="test",
                num_examples=num or 64)
    if kind == "probe":
        spec.update(train_split="train", holdout_pairs=0, num_classes=64)
    return spec


def _tfds_splits(name: str) -> list[str] | None:
    """The splits of the prepared TFDS dataset `name`, or None when it is not prepared."""
    from crate_jax.data.tfds_source import open_builder

    try:  # prepared in a format it cannot read: that error, not a fallback
        return sorted(open_builder(name, None).info.splits)
    except FileNotFoundError:
        return None


def _tfds_spec(kind: str, name: str, splits: str) -> tuple[str, dict[str, Any]]:
    """(evaluator name, spec) of TFDS `name` with `splits` ('SPLIT'; for probes
    'TRAIN,TEST', or 'TEST' with train 'train', or '' for train and test / validation)."""
    spec = dict(kind=kind, source="tfds", name=name)
    if kind == "probe":
        train, _, test = splits.rpartition(",")
        if not test:
            available = _tfds_splits(name) or []
            test = "test" if "test" in available or "validation" not in available else \
                "validation"
        spec.update(train_split=train or "train", split=test)
    else:
        spec["split"] = splits or {"zeroshot": "validation", "retrieval": "test"}[kind]
    return f"{kind}_{name.split('/')[0]}", spec


def _auto_specs(kind: str, own: dict, num: int | None) -> dict[str, dict]:
    mine = {n: dict(s) for n, s in own.items() if s.get("kind") == kind}
    if mine:
        return mine
    found = dict(_tfds_spec(kind, name, splits) for name, splits in TFDS_DEFAULT[kind]
                 if _tfds_splits(name) is not None)
    missing = [name for name, _ in TFDS_DEFAULT[kind] if not any(
        s["name"] == name for s in found.values())]
    if missing:
        print(f"{kind}: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
              "prepared" + ("" if found else "; using the synthetic captioned shapes"),
              flush=True)
    return found or {kind: _synthetic_spec(kind, num)}


def eval_specs(config: ml_collections.ConfigDict, kinds: list[str], data: str,
               num: int | None, *, probe_data: str | None = None) -> dict[str, dict]:
    """{name: spec} for the requested kinds (see crate_jax/evaluate.py's docstring)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"--evals: {unknown} unknown; kinds are {list(KINDS)}")
    own = dict(config.get("evals") or {}) if config.trainer == "contrastive" else {}
    specs: dict[str, dict] = {}
    for kind in kinds:
        choice = probe_data if kind == "probe" and probe_data else data
        flag = "--probe_data" if kind == "probe" and probe_data else "--data"
        if choice == "auto":
            found = _auto_specs(kind, own, num)
        elif choice == "synthetic":
            found = {kind: _synthetic_spec(kind, num)}
        elif choice.startswith("tfds:") and choice[5:].partition(":")[0]:
            name, _, splits = choice[5:].partition(":")
            found = dict([_tfds_spec(kind, name, splits)])
        else:
            raise ValueError(f"{flag}={choice!r}: use auto, synthetic or "
                             "tfds:NAME[:SPLIT] (probes: tfds:NAME[:TRAIN_SPLIT,TEST_SPLIT])")
        for spec in found.values():
            if num is not None:
                spec["num_examples"] = num
        specs.update(found)
    return specs


# The probes' feature of each trainer's model (crate_jax.evals.probe.image_features).
PROBE_FEATURES = {
    "contrastive": "image embedding (the image tower's pooled output, projected)",
    "simdino": "the teacher backbone's pooled output",
    "mae": "the encoder's pooled output of the whole image",
    "classification": "the backbone's pooled output, the head's input (for pool=cls: the "
                      "cls token after the final norm)",
}


def _normalisation(task: tasks.Task) -> tuple[list[float], list[float]]:
    """(mean, std) of the task's image normalisation, read off its preprocess: x ↦ (x/255 −
    m)/s gives −m/s at 0 and (1 − m)/s at 255, whatever config key or default set them."""
    edges = np.array([[[[0] * 3]], [[[255] * 3]]], np.uint8)
    low, high = np.asarray(task.preprocess({"image": jnp.asarray(edges)}), np.float64)[:, 0, 0]
    std = 1.0 / (high - low)
    return [round(float(v), 6) for v in -low * std], [round(float(v), 6) for v in std]


def _probe_evaluator(name: str, spec: dict, config: ml_collections.ConfigDict,
                     task: tasks.Task):
    """A ProbeEvaluator of any run's image tower on the spec's labelled images."""
    from crate_jax.data import image_text
    from crate_jax.evals.clip import ProbeEvaluator, preprocessing_protocol

    spec = ml_collections.ConfigDict(spec)
    data, default_crop = config.data, getattr(task, "eval_crop_default",
                                              image_ops.DEFAULT_EVAL_CROP)
    per_process = config.eval_batch_size // jax.process_count()

    def batches(split: str):
        return image_text.eval_batches_factory(spec, data, per_process, split,
                                               default_crop=default_crop)

    where = f"tfds {spec.name}" if spec.source == "tfds" else spec.source
    first = f" (first {spec.num_examples})" if spec.get("num_examples") else ""
    protocol = {"data": f"{where}: train {spec.train_split}{first}, test {spec.split}{first}",
                "feature": PROBE_FEATURES.get(config.trainer, "model.encode_image"),
                **preprocessing_protocol(data.image_size, *image_ops.eval_resize_settings(
                    data, default_crop), *_normalisation(task),
                    generated=spec.source == "synthetic_captions")}
    return ProbeEvaluator(name, batches(spec.train_split), batches(spec.split), task.preprocess,
                          num_classes=spec.get("num_classes"), protocol=protocol)


def evaluate(workdir: str, *, kinds: list[str] | None = None, data: str = "auto",
             tokenizer: str | None = None, step: int | None = None,
             num_examples: int | None = None, batch_size: int | None = None,
             probe_data: str | None = None) -> dict[str, Any]:
    """The metrics of the requested evaluators on the run's checkpoint, each with its
    protocol record under '{name}/protocol' (see crate_jax/evaluate.py's docstring)."""
    from crate_jax import parallel
    from crate_jax.train.finetune import _checkpointer

    workdir = absolute(workdir)
    config = read_run_config(workdir, tokenizer)
    kinds = kinds or (["zeroshot", "retrieval"] if config.trainer == "contrastive" else ["probe"])
    specs = eval_specs(config, kinds, data, num_examples, probe_data=probe_data)
    text_specs = {n: s for n, s in specs.items() if s["kind"] != "probe"}
    if config.trainer != "contrastive" and text_specs:
        raise ValueError(f"--evals: {sorted({s['kind'] for s in text_specs.values()})} need a "
                         f"two-tower (contrastive) run; {workdir} is a {config.trainer!r} run, "
                         "whose image tower --evals=probe evaluates")
    if text_specs and not config.data.get("tokenizer") and "source" not in config.data:
        raise ValueError(f"--tokenizer: {workdir} (an imported checkpoint) names no "
                         "tokenizer; pass the one its text tower was trained with (the "
                         "CRATE-α-CLIPA releases: BERT-base uncased vocab.txt, shipped as "
                         "builtin:bert_base_uncased)")
    if config.trainer == "contrastive":
        config.evals = text_specs
    batch_size = batch_size or config.get("eval_batch_size") or 64
    config.eval_batch_size = batch_size
    if "batch_size" not in config:  # an imported run has no training batch
        config.batch_size = batch_size
    task = tasks.get(config.trainer)(config)
    evaluators = task.evaluators() if text_specs else []
    evaluators += [_probe_evaluator(n, s, config, task) for n, s in specs.items()
                   if s["kind"] == "probe"]
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
            # the BatchNorm running statistics (ToST's stem) that eval mode normalises with
            rest = with_batch_stats(rest, checkpointer.restore_batch_stats(
                found, parallel.replicated(mesh)))
        finally:
            checkpointer.close()
        results: dict[str, Any] = {"step": float(found)}
        for evaluator in evaluators:
            results.update(evaluator.run(graphdef, params, rest, mesh))
            results[f"{evaluator.name}/protocol"] = dict(evaluator.protocol or {})
    return results
