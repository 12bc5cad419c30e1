"""Zero-shot classification of a two-tower model, as the CRATE-α-CLIPA release evaluates it
(torch_inference/eval_in1k.py of the CRATE-α repository, OpenAI CLIP's notebook rule):

    v_{c,t} = text(template_t(c)) / (‖·‖ + 1e-8)            every prompt embedding normalised
    w_c     = mean_t v_{c,t} / ‖mean_t v_{c,t}‖               averaged, normalised again
    u       = image(x) / (‖·‖ + 1e-8)
    logits  = 100 · ⟨u, w_c⟩                                  top-1 and top-5 of these

ImageNet-1K uses OpenAI CLIP's 1,000 curated class names and 80 templates
(data/imagenet_zeroshot.json, the lists eval_in1k.py imports); the synthetic captioned shapes
use their own class names and the 12 simple templates of data/templates.txt.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from importlib import resources

import jax
import numpy as np

from crate_jax.evals.base import Evaluator
from crate_jax.evals.embedding import (
    TIE_TOLERANCE,
    Batches,
    Embedder,
    Protocol,
    l2_normalize,
    topk_accuracy,
)

# Template sets by name: a spec's `templates` is one of these or a file (one per line, '{}').
IMAGENET_TEMPLATES = "openai_imagenet_80"
SIMPLE_TEMPLATES = "simple_12"
LOGIT_SCALE = 100.0  # eval_in1k.py's fixed multiplier (not the model's learned temperature)


@functools.lru_cache(maxsize=1)
def _imagenet_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    text = resources.files("crate_jax.evals").joinpath("data/imagenet_zeroshot.json").read_text()
    lists = json.loads(text)
    return tuple(lists["classnames"]), tuple(lists["templates"])


def imagenet_class_names() -> list[str]:
    """OpenAI CLIP's 1,000 curated ImageNet-1K class names, in label order."""
    return list(_imagenet_lists()[0])


def imagenet_templates() -> list[str]:
    """OpenAI CLIP's 80 ImageNet prompt templates."""
    return list(_imagenet_lists()[1])


def read_templates(path: str | None = None) -> list[str]:
    """Prompt templates: a set by name (IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, the default) or
    a file, one template per line with '{}' for the class name ('#' lines are comments)."""
    if path == IMAGENET_TEMPLATES:
        return imagenet_templates()
    if path in (None, SIMPLE_TEMPLATES):
        text = resources.files("crate_jax.evals").joinpath("data/templates.txt").read_text()
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    templates = [t.strip() for t in text.splitlines() if t.strip() and not t.startswith("#")]
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates file {path or 'data/templates.txt'}: every line needs '{{}}'")
    return templates


def class_weights(encode: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                  templates: Sequence[str], *, classes_per_call: int = 100) -> np.ndarray:
    """(C, e) zero-shot weights w_c (module docstring) from `encode(prompts) -> (n, e)`,
    `classes_per_call` classes' prompts at a time (80,000 prompt embeddings of a large text
    tower need not sit on the host at once)."""
    out = []
    for start in range(0, len(class_names), classes_per_call):
        names = class_names[start:start + classes_per_call]
        prompts = [t.format(c) for c in names for t in templates]
        emb = np.asarray(encode(prompts), np.float32).reshape(len(names), len(templates), -1)
        mean = l2_normalize(emb).mean(1)
        out.append(mean / np.linalg.norm(mean, axis=-1, keepdims=True))
    return np.concatenate(out)


class ZeroShotEvaluator(Evaluator):
    """Top-1/top-5 of 100 · ⟨u, w_c⟩ (module docstring) over the split; `protocol` records
    the data set, class-name source and preprocessing, to which the rule is added."""

    def __init__(self, name: str, batches: Batches, class_names: Sequence[str],
                 tokenize: Callable[[list[str]], np.ndarray], templates: Sequence[str],
                 preprocess: Callable[[dict], jax.Array], *, text_batch: int = 2048,
                 eval_classes: Sequence[int] | None = None, protocol: Protocol | None = None):
        """eval_classes: the classes scored (default all); images keep their global labels."""
        self.name, self._batches, self.class_names = name, batches, list(class_names)
        self.tokenize, self.templates, self.text_batch = tokenize, list(templates), text_batch
        self.eval_classes = None if eval_classes is None else np.asarray(eval_classes)
        self._images = Embedder(lambda m, b: m.encode_image(preprocess(b)))
        self._texts = Embedder(lambda m, b: m.encode_text(b["tokens"]))
        scored = len(self.class_names if eval_classes is None else self.eval_classes)
        self.protocol = {**(protocol or {}), "classes": scored, "templates": len(self.templates),
                         "class embedding": "mean of L2-normalised prompt embeddings, "
                                            "renormalised",
                         "logits": f"{LOGIT_SCALE:g}·cos", "metrics": "top-1, top-5"}

    def _encoder(self, graphdef, params, rest, mesh) -> Callable[[list[str]], np.ndarray]:
        full = -(-self.text_batch // mesh.size) * mesh.size

        def encode(prompts: list[str]) -> np.ndarray:
            tokens = self.tokenize(prompts)
            # fewer prompts than a full batch: one batch just big enough (a multiple of the
            # device count), not a full one that is mostly padding (64 classes × 12 templates
            # ran 2,048 rows for 768 prompts); at most two batch shapes are compiled either way
            size = min(full, -(-len(tokens) // mesh.size) * mesh.size)

            def batches():
                for i in range(0, len(tokens), size):
                    chunk = tokens[i:i + size]
                    mask = np.zeros(size, np.float32)
                    mask[:len(chunk)] = 1
                    pad = np.zeros((size - len(chunk), tokens.shape[1]), tokens.dtype)
                    yield {"tokens": np.concatenate([chunk, pad]), "mask": mask}

            # every process holds all the prompts: one global batch of them, not one per process
            return self._texts(graphdef, params, rest, mesh, batches(), shared=True)[0]
        return encode

    def class_embeddings(self, graphdef, params, rest, mesh) -> np.ndarray:
        """(C, e) for the scored classes (all, or eval_classes)."""
        names = (self.class_names if self.eval_classes is None
                 else [self.class_names[i] for i in self.eval_classes])
        return class_weights(self._encoder(graphdef, params, rest, mesh), names, self.templates)

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        classes = self.class_embeddings(graphdef, params, rest, mesh)
        images, extra = self._images(graphdef, params, rest, mesh, self._batches(),
                                     keep=("label",))
        labels = extra["label"].astype(np.int64)
        logits = LOGIT_SCALE * (l2_normalize(images) @ classes.T)
        if self.eval_classes is not None:
            lookup = {c: i for i, c in enumerate(self.eval_classes.tolist())}
            labels = np.array([lookup[int(c)] for c in labels])
        tolerance = LOGIT_SCALE * TIE_TOLERANCE  # a tolerance on cosines, scaled as they are
        return {f"{self.name}/top1": topk_accuracy(logits, labels, 1, tolerance),
                f"{self.name}/top5": topk_accuracy(logits, labels, min(5, logits.shape[1]),
                                                   tolerance),
                f"{self.name}/count": float(len(labels))}
