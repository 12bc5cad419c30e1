"""CLIPA-style contrastive image-text training.

Per step: images cross as uint8 and are normalised on the device; CLIPA token reduction keeps a
subset of the patches (the low resolution itself comes from the data pipeline) and the text is
already reduced to its k tokens on the host; both towers encode; the InfoNCE or SigLIP loss runs
over the global batch (contrastive_loss.py). Frozen towers (config.freeze) get no gradient and
no update; a tower can start from another run's checkpoint (config.init_towers).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import numpy as np
from flax import nnx

from crate_jax import models
from crate_jax.data import image_text
from crate_jax.data import images as image_data
from crate_jax.evals import clip as clip_evals
from crate_jax.evals.embedding import CLIP_MEAN, CLIP_STD
from crate_jax.models.clip import CLIP, ClipConfig
from crate_jax.tasks import token_reduction
from crate_jax.tasks.base import Task
from crate_jax.tasks.classification import normalize
from crate_jax.tasks.contrastive_loss import contrastive_loss

# Evaluation images: the short side resized to the image size, no margin cropped (CLIP's and
# the CRATE-α-CLIPA release's); data.eval_crop_fraction / data.eval_interpolation override it.
EVAL_CROP_DEFAULT = 1.0


def tokenizer_fields(text: str, overrides: dict) -> set[str]:
    """The text-tower fields that depend on the tokenizer, for this tower: vocab_size (unless
    its family fixes the table, as clipa-text's 32,000 rows), eot_id when it pools on the
    end-of-text token, pad_id when padding is masked or skipped by the pooling."""
    from crate_jax.models.config import TextConfig
    from crate_jax.models.registry import preset_fields

    defaults = {f.name: f.default for f in dataclasses.fields(TextConfig)
                if f.default is not dataclasses.MISSING}
    preset = preset_fields(text)
    fields = {**defaults, **preset, **overrides}
    need = set() if "vocab_size" in preset else {"vocab_size"}
    if fields["pool"] == "eot":
        need.add("eot_id")
    if fields["pool"] in ("eot", "last_token", "mean") or (
            not fields["causal"] and fields["mask_padding"]):
        need.add("pad_id")
    return need


class ContrastiveTask(Task):
    def model_config(self) -> ClipConfig:
        m, data = self.config.model, self.config.data
        image_overrides = {"image_size": data.image_size, **dict(m.get("image_overrides", {}))}
        text_overrides = {"context_length": data.context_length,
                          **dict(m.get("text_overrides", {}))}
        missing = tokenizer_fields(m.text, text_overrides) - set(text_overrides)
        if missing:  # from the tokenizer, never from constants
            tokenizer = image_text.tokenizer_for(data)
            text_overrides |= {k: getattr(tokenizer, k) for k in sorted(missing)}
        # SigLIP: scale 10, bias −10, no bound; CLIP: scale 1/0.07, kept in [1, 100]
        sigmoid = self.config.loss == "sigmoid"
        return ClipConfig(image=m.image, image_overrides=image_overrides, text=m.text,
                          text_overrides=text_overrides, embed_dim=m.embed_dim,
                          logit_scale_init=math.log(10.0) if sigmoid else math.log(1 / 0.07),
                          logit_scale_max=None if sigmoid else math.log(100.0),
                          logit_bias_init=-10.0 if sigmoid else 0.0)

    def param_bounds(self) -> dict[str, tuple[float, float]]:
        top = self.model_config().logit_scale_max
        return {} if top is None else {"logit_scale": (0.0, top)}

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        return CLIP(self.model_config(), rngs=rngs)

    def num_layers(self) -> int:
        cfg = self.model_config()
        return models.config_for(cfg.image, **cfg.image_overrides).depth

    def preprocess(self, batch: dict) -> jax.Array:
        data = self.config.data
        return normalize(batch["image"], data.get("mean", CLIP_MEAN), data.get("std", CLIP_STD))

    def train_data(self, batch_size: int, seed: int):
        tokenizer = image_text.tokenizer_for(self.config.data)
        cfg = self.model_config()
        text = models.config_for(cfg.text, **cfg.text_overrides)
        used = tokenizer_fields(cfg.text, cfg.text_overrides) - {"vocab_size"}
        mismatch = {k: (getattr(tokenizer, k), getattr(text, k)) for k in sorted(used)
                    if getattr(tokenizer, k) != getattr(text, k)}
        if tokenizer.vocab_size > text.vocab_size or mismatch:
            raise ValueError(
                f"data.tokenizer has vocab_size {tokenizer.vocab_size}"
                + "".join(f", {k} {v[0]}" for k, v in mismatch.items())
                + f", which the text tower {cfg.text} (vocab_size {text.vocab_size}"
                + "".join(f", {k} {v[1]}" for k, v in mismatch.items())
                + ") does not match; set model.text_overrides")
        return image_text.train_iterator(self.config.data, batch_size=batch_size, seed=seed)

    batch_coupled = True  # every image's loss has the whole batch's texts as negatives

    def features(self, model, batch, rng):
        """Both towers' normalised embeddings (with CLIPA patch dropping) of a batch."""
        reduction = self.config.get("image_reduction", {})
        images = self.preprocess(batch)
        grid = self.config.data.image_size // model.image.cfg.patch_size
        keep = token_reduction.patch_keep_indices(
            jax.random.fold_in(rng, 1), images.shape[0], grid, reduction.get("keep", 1.0),
            reduction.get("strategy", "none"))
        return {"image": model.encode_image(images, keep),
                "text": model.encode_text(batch["tokens"])}

    def features_loss(self, model, features, rng):
        del rng
        scale, bias = model.scale(), model.logit_bias[...]
        image_emb, text_emb = features["image"], features["text"]
        # the accuracy comes from each device's (b × B) block, never a B × B similarity
        loss, accuracy = contrastive_loss(image_emb, text_emb, scale, bias,
                                          kind=self.config.get("loss", "infonce"),
                                          with_accuracy=True)
        return loss, {"temperature_scale": scale, "batch_i2t_accuracy": accuracy}

    def loss(self, model, batch, rng):
        return self.features_loss(model, self.features(model, batch, rng), rng)

    eval_crop_default = EVAL_CROP_DEFAULT

    def eval_protocol(self, spec) -> dict:
        """The data set and image preprocessing of an evaluator spec, for its protocol."""
        data = self.config.data
        crop, interpolation = image_data.eval_resize_settings(data, EVAL_CROP_DEFAULT)
        if spec.source == "tfds":
            where = f"tfds {spec.name} {spec.get('split', 'test')}"
        else:
            where = f"{spec.source} {spec.get('split', 'test')}"
        if spec.get("num_examples"):
            where += f" (first {spec.num_examples})"
        return {"data": where, **clip_evals.preprocessing_protocol(
            data.image_size, crop, interpolation, data.get("mean", CLIP_MEAN),
            data.get("std", CLIP_STD), generated=spec.source == "synthetic_captions")}

    def _zeroshot(self, name, spec, batches, tokenize):
        if spec.source == "tfds" and spec.get("name") == "imagenet2012" \
                and not spec.get("class_names"):
            names, subset = clip_evals.imagenet_class_names(), None
            source = "OpenAI CLIP's 1,000 curated ImageNet names"
            default_templates = clip_evals.IMAGENET_TEMPLATES
        else:
            names, subset = image_text.class_names(spec)
            source = spec.get("class_names") or f"{spec.source}'s own"
            default_templates = clip_evals.SIMPLE_TEMPLATES
        templates = spec.get("templates") or default_templates
        protocol = {**self.eval_protocol(spec), "class names": source,
                    "template set": templates}
        return clip_evals.ZeroShotEvaluator(
            name, batches, names, tokenize, clip_evals.read_templates(templates),
            self.preprocess, eval_classes=subset, protocol=protocol)

    def evaluators(self):
        specs = self.config.get("evals") or {}
        data = self.config.data
        tokenizer = image_text.tokenizer_for(data)
        per_process = self.config.get("eval_batch_size", self.config.batch_size)
        per_process //= jax.process_count()

        def tokenize(texts):
            from crate_jax.data.tokenizer import tokenize as tok
            return tok(tokenizer, texts, data.context_length)

        out = []
        for name, spec in specs.items():
            try:
                batches = image_text.eval_batches_factory(spec, data, per_process)
            except FileNotFoundError as e:
                if not spec.get("optional", False):
                    raise
                logging.warning("evals.%s skipped: %s", name, e)
                continue
            if spec.kind == "zeroshot":
                out.append(self._zeroshot(name, spec, batches, tokenize))
            elif spec.kind == "retrieval":
                protocol = {**self.eval_protocol(spec),
                            "captions per image": f"the first {image_text.captions_per_image(spec)}"
                                                  " as stored"}
                out.append(clip_evals.RetrievalEvaluator(name, batches, self.preprocess,
                                                         protocol=protocol))
            elif spec.kind == "probe":
                train = image_text.eval_batches_factory(spec, data, per_process,
                                                        split=spec.train_split)
                protocol = {**self.eval_protocol(spec), "train split": spec.train_split,
                            "feature": "image embedding (the image tower's pooled output, "
                                       "projected)"}
                out.append(clip_evals.ProbeEvaluator(name, train, batches, self.preprocess,
                                                     num_classes=spec.get("num_classes"),
                                                     protocol=protocol))
            else:
                raise ValueError(f"evals.{name}.kind: {spec.kind!r}; use 'zeroshot', "
                                 "'retrieval' or 'probe'")
        return out

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        data = self.config.data
        return {"image": np.zeros((batch_size, data.image_size, data.image_size, 3), np.uint8),
                "tokens": np.zeros((batch_size, data.get("text_tokens") or data.context_length),
                                   np.int32)}
