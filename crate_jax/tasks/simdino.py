"""SimDINO self-distillation (arXiv 2502.10385) on any registry image backbone.

For a batch of B images with G global and L local views (data/multicrop.py), student features
s_v = student(view v) and teacher features t_i = stop_grad(teacher(global view i)), all
L2-normalised (models/simdino.py):

    align = 1/(G(G−1) + G·L) · Σ_i Σ_{v ≠ i} ½‖s_v − t_i‖²        (= 1 − ⟨s_v, t_i⟩), batch mean
    R     = 1/G · Σ_j R_ε(S_j),  R_ε(Z) = ½ logdet(I + k/(B ε²) ZᵀZ)  S_j (B, k): the student's
                                                                       features of global view j
    loss  = align − γ·R                                γ = config.coding_rate_weight, ε² = eps_sq

DINO's prototype softmax, centring and sharpening are gone; the coding-rate term keeps the
features from collapsing. After every update the teacher follows the student by EMA with
momentum m(step) = 1 − (1 − m₀)·(cos(π·step/T) + 1)/2, rising from m₀ = teacher_momentum to
teacher_momentum_end (1.0) over T = optim.total_steps (DINO's schedule; like the learning
rate's, it does not move when a resumed run raises total_steps). Evaluators ('probe'): k-NN
and linear probe on the teacher backbone's pooled features, their coding rate, and, with
`random_init=True`, the same for the backbone at its initialisation (the baseline).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crate_jax import config_utils, models
from crate_jax.data import images as image_data
from crate_jax.data import multicrop, pipeline
from crate_jax.evals.baseline import AtInitialisation
from crate_jax.evals.clip import ProbeEvaluator
from crate_jax.models.simdino import HeadConfig, SimDINOModel, ema
from crate_jax.tasks.base import Task
from crate_jax.tasks.classification import image_preprocess, image_train_data
from crate_jax.whitebox.coding_rate import coding_rate

DEFAULT_EPS_SQ = 0.5


def alignment(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Mean over the batch of Σ_i Σ_{v ≠ i} ½‖s_v − t_i‖² / #pairs. student (B, V, k) with
    the G global views first, teacher (B, G, k); all rows unit vectors."""
    g = teacher.shape[1]
    cos = jnp.einsum("bvk,bgk->bvg", student, teacher)  # (B, V, G)
    half_sq = 1.0 - cos  # ½‖a − b‖² for unit vectors
    same = jnp.zeros(cos.shape[1:], bool).at[jnp.arange(g), jnp.arange(g)].set(True)
    pairs = student.shape[1] * g - g
    return jnp.where(same, 0.0, half_sq).sum((1, 2)).mean() / pairs


def teacher_momentum(step: jax.Array, start: float, end: float, total: int) -> jax.Array:
    """DINO's cosine schedule from `start` at step 0 to `end` at step `total`."""
    progress = jnp.clip(step.astype(jnp.float32) / max(total, 1), 0.0, 1.0)
    return end - (end - start) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


class SimDINOTask(Task):
    def _backbone_overrides(self) -> dict:
        overrides = config_utils.model_overrides(self.config.model)
        overrides.setdefault("image_size", self.config.data.image_size)
        overrides["num_classes"] = 0
        return overrides

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        name = self.config.model.name
        head = HeadConfig(**dict(self.config.get("head") or {}))
        overrides = self._backbone_overrides()
        return SimDINOModel(lambda r: models.create(name, rngs=r, **overrides), head,
                            rngs=rngs)

    def num_layers(self) -> int:
        return models.config_for(self.config.model.name, **self._backbone_overrides()).depth

    def frozen_groups(self) -> tuple[str, ...]:
        return ("teacher",)

    def after_update(self, params: dict, step: jax.Array) -> dict:
        c = self.config
        m = teacher_momentum(step + 1, c.get("teacher_momentum", 0.996),
                             c.get("teacher_momentum_end", 1.0),
                             c.optim.get("total_steps", c.total_steps))
        return {**params, "teacher": ema(params["teacher"], params["student"], m)}

    def preprocess(self, batch: dict) -> jax.Array:
        return image_preprocess(self.config.data, batch)

    def _views(self, views: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        """uint8 (B, V, S, S, 3) → normalised (B·V, S, S, 3)."""
        b, v = views.shape[:2]
        flat = self.preprocess({"image": views.reshape(b * v, *views.shape[2:])})
        return flat, (b, v)

    def train_data(self, batch_size: int, seed: int):
        data = self.config.data
        return image_train_data(data, batch_size, seed, multicrop.multicrop_transform(data))

    def loss(self, model, batch, rng):
        c = self.config
        glob, (b, g) = self._views(batch["global"])
        student = [model.student(glob).reshape(b, g, -1)]
        if "local" in batch:
            local, (_, n_local) = self._views(batch["local"])
            student.append(model.student(local).reshape(b, n_local, -1))
        teacher_branch = model.teacher
        teacher_branch.eval()  # the teacher runs without DropPath, as DINO's
        teacher = jax.lax.stop_gradient(teacher_branch(glob).reshape(b, g, -1))
        student_views = jnp.concatenate(student, axis=1)
        align = alignment(student_views, teacher)
        rate = jnp.mean(coding_rate(jnp.swapaxes(student[0], 0, 1),
                                    c.get("eps_sq", DEFAULT_EPS_SQ)))
        loss = align - c.get("coding_rate_weight", 1.0) * rate
        return loss, {"align": align, "coding_rate": rate}

    def evaluators(self):
        data, specs = self.config.data, self.config.get("evals") or {}
        per_process = self.config.get("eval_batch_size", self.config.batch_size)
        per_process //= jax.process_count()
        transform = image_data.eval_transform(data)

        def batches(split: str, num: int | None):
            source = image_data.image_source(data, split)
            if num:
                source = pipeline.first_examples(source, num)
            return lambda: pipeline.eval_batches(source, batch_size=per_process,
                                                 transform=transform)

        out = []
        for name, spec in specs.items():
            if spec.get("kind") != "probe":
                raise ValueError(f"evals.{name}.kind: {spec.get('kind')!r}; the 'simdino' "
                                 "trainer has 'probe'")
            probe = ProbeEvaluator(
                name, batches(spec.get("train_split", data.train_split),
                              spec.get("num_train_examples")),
                batches(spec.get("split", data.eval_split), spec.get("num_examples")),
                self.preprocess, num_classes=spec.num_classes,
                coding_rate_eps_sq=self.config.get("eps_sq", DEFAULT_EPS_SQ))
            out.append(probe)
            if spec.get("random_init", False):
                out.append(AtInitialisation(f"{name}_random_init", probe, self))
        return out

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return multicrop.example_views(self.config.data, batch_size)
