"""CLIPA-style contrastive image-text training.

Per step: images cross as uint8 and are normalised on the device; CLIPA token reduction keeps a
subset of the patches (the low resolution itself comes from the data pipeline) and the text is
already reduced to its k tokens on the host; both towers encode; the InfoNCE or SigLIP loss runs
over the global batch (contrastive_loss.py). Frozen towers (config.freeze) get no gradient and
no update; a tower can start from another run's checkpoint (config.init_towers).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax.data import image_text
from crate_jax.evals import clip as clip_evals
from crate_jax.models.clip import CLIP, ClipConfig
from crate_jax.tasks import token_reduction
from crate_jax.tasks.base import Task
from crate_jax.tasks.classification import normalize
from crate_jax.tasks.contrastive_loss import contrastive_loss

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ContrastiveTask(Task):
    def model_config(self) -> ClipConfig:
        m, data = self.config.model, self.config.data
        image_overrides = {"image_size": data.image_size, **dict(m.get("image_overrides", {}))}
        text_overrides = {"context_length": data.context_length,
                          **dict(m.get("text_overrides", {}))}
        if not {"vocab_size", "eot_id", "pad_id"} <= set(text_overrides):
            tokenizer = image_text.tokenizer_for(data)
            text_overrides.setdefault("vocab_size", tokenizer.vocab_size)
            text_overrides.setdefault("eot_id", tokenizer.eot_id)
            text_overrides.setdefault("pad_id", tokenizer.pad_id)
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
        from crate_jax import models
        cfg = self.model_config()
        return models.config_for(cfg.image, **cfg.image_overrides).depth

    def preprocess(self, batch: dict) -> jax.Array:
        data = self.config.data
        return normalize(batch["image"], data.get("mean", CLIP_MEAN), data.get("std", CLIP_STD))

    def train_data(self, batch_size: int, seed: int):
        tokenizer = image_text.tokenizer_for(self.config.data)
        text = self.model_config().text_overrides
        mismatch = {k: (getattr(tokenizer, k), text[k]) for k in ("eot_id", "pad_id")
                    if getattr(tokenizer, k) != text[k]}
        if tokenizer.vocab_size > text["vocab_size"] or mismatch:
            raise ValueError(
                f"data.tokenizer has vocab_size {tokenizer.vocab_size}, eot/pad ids "
                f"{tokenizer.eot_id}/{tokenizer.pad_id}, which the text tower "
                f"(model.text_overrides: vocab_size {text['vocab_size']}, eot_id "
                f"{text['eot_id']}, pad_id {text['pad_id']}) does not match")
        return image_text.train_iterator(self.config.data, batch_size=batch_size, seed=seed)

    def loss(self, model, batch, rng):
        reduction = self.config.get("image_reduction", {})
        images = self.preprocess(batch)
        grid = self.config.data.image_size // model.image.cfg.patch_size
        keep = token_reduction.patch_keep_indices(
            jax.random.fold_in(rng, 1), images.shape[0], grid, reduction.get("keep", 1.0),
            reduction.get("strategy", "none"))
        image_emb, text_emb, scale, bias = model(images, batch["tokens"], patch_keep=keep)
        loss = contrastive_loss(image_emb, text_emb, scale, bias,
                                kind=self.config.get("loss", "infonce"))
        sim = image_emb @ text_emb.T
        accuracy = jnp.mean(jnp.argmax(sim, axis=1) == jnp.arange(sim.shape[0]))
        return loss, {"temperature_scale": scale, "batch_i2t_accuracy": accuracy}

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
                class_names, eval_classes = image_text.class_names(spec)
                out.append(clip_evals.ZeroShotEvaluator(
                    name, batches, class_names, tokenize,
                    clip_evals.read_templates(spec.get("templates")), self.preprocess,
                    eval_classes=eval_classes))
            elif spec.kind == "retrieval":
                out.append(clip_evals.RetrievalEvaluator(name, batches, self.preprocess))
            elif spec.kind == "probe":
                train = image_text.eval_batches_factory(spec, data, per_process,
                                                        split=spec.train_split)
                out.append(clip_evals.ProbeEvaluator(name, train, batches, self.preprocess,
                                                     num_classes=spec.num_classes))
            else:
                raise ValueError(f"evals.{name}.kind: {spec.kind!r}; use 'zeroshot', "
                                 "'retrieval' or 'probe'")
        return out

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        data = self.config.data
        return {"image": np.zeros((batch_size, data.image_size, data.image_size, 3), np.uint8),
                "tokens": np.zeros((batch_size, data.get("text_tokens") or data.context_length),
                                   np.int32)}
