"""SimDINO self-distillation (arXiv 2502.10385) as the official code runs it (RobinWu218/SimDINO,
simdino/main_dino.py `MCRLoss`; docs/design.md §1), on any registry image backbone.

For a batch of B images with G global and L local views (V = G + L; data/multicrop.py),
student features s_v = student(view v) and teacher features t_i = stop_grad(teacher(global
view i)), all L2-normalised rows (models/simdino.py):

    C   = 1/(G·V − G) · Σ_i Σ_{v ≠ i} mean_b ⟨s_v, t_i⟩        'comp_loss': every pair but a
                                                               global view with itself
    W_j = (s_j + t_j)/2   (expa_type=1, the default)   or  s_j  (expa_type=0)   (B, k)
    E   = γ · 1/G Σ_j mean_n ½ logdet(I + k/(m·N·ε) · W_{j,n}ᵀ W_{j,n})          'expa_loss'
    γ   = (k + N·m)/(k·N·m)
    loss = −coeff·C − E

N is the number of data-parallel shards of the batch (the mesh's batch axes; 1 without a mesh)
and m = B/N the rows of each. With reduce_cov=0 (the default: the official per-GPU covariance)
W_{j,n} is shard n's block of rows; with reduce_cov=1 the covariance is summed over the shards
first (the official all_reduce), i.e. one W_jᵀW_j over all B rows, with the same k/(m·N·ε).
ε enters linearly, as the official `p / (m * N * eps)`: it is the ε² of R_ε's usual form.
Config: eps (0.05, the README's training command; the argparse default is 0.5), coeff (1),
expa_type (1), reduce_cov (0).

The loss couples the rows of a batch (E), so grad_accum_steps > 1 accumulates by feature caching
(Task.batch_coupled; crate_jax/train/step.py): the features of every micro-batch are computed
first, the objective above is taken on the whole batch, and each micro-batch's backward pass
runs against it — the update of the whole batch.

DINO's prototype softmax, centring and sharpening are gone; E keeps the features from
collapsing. After every update the teacher follows the student by EMA with momentum
m(step) = 1 − (1 − m₀)·(cos(π·step/T) + 1)/2, rising from m₀ = teacher_momentum to
teacher_momentum_end (1.0) over T = optim.total_steps (DINO's schedule; like the learning
rate's, it does not move when a resumed run raises total_steps). Evaluators ('probe'): k-NN
and linear probe on the teacher backbone's pooled features, their coding rate (with ε² = eps),
and, with `random_init=True`, the same for the backbone at its initialisation (the baseline).
"""

from __future__ import annotations

import dataclasses
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
from crate_jax.parallel.sharding import split_batch_axes
from crate_jax.tasks.base import Task
from crate_jax.tasks.classification import image_preprocess, image_train_data
from crate_jax.whitebox.coding_rate import coding_rate

# Keys of an earlier objective (student-only expansion, a constant γ): refused, not ignored.
RETIRED_KEYS = {
    "coding_rate_weight": "γ is the official formula (k + N·m)/(k·N·m), not a setting",
    "eps_sq": "use eps (the official ε, which enters as k/(m·N·ε); the recipe's is 0.05)",
}


@dataclasses.dataclass(frozen=True)
class Objective:
    """The official MCRLoss settings (main_dino.py's argparse names)."""

    eps: float = 0.05  # the README's `--eps 0.05`
    coeff: float = 1.0
    expa_type: int = 1  # 1: expansion on (student + teacher)/2; 0: on the student alone
    reduce_cov: int = 0  # 0: a covariance per data shard; 1: summed over the shards first

    @classmethod
    def from_config(cls, config) -> Objective:
        """The settings of a task config; a bad or retired key raises ValueError naming it."""
        for key, why in RETIRED_KEYS.items():
            if key in config:
                raise ValueError(f"{key}: no longer a SimDINO setting; {why}")
        out = cls(**{f.name: config.get(f.name, f.default) for f in dataclasses.fields(cls)})
        if not (isinstance(out.eps, int | float) and out.eps > 0):
            raise ValueError(f"eps: must be positive, got {out.eps!r}")
        for key in ("expa_type", "reduce_cov"):
            value = getattr(out, key)
            if not isinstance(value, int) or value not in (0, 1):
                raise ValueError(f"{key}: must be 0 or 1 (as the official option), got "
                                 f"{value!r}")
        return out


def alignment(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """C: the mean over the batch and over the G·V − G (view v, global view i ≠ v) pairs of
    ⟨s_v, t_i⟩. student (B, V, k) with the G global views first, teacher (B, G, k); all rows
    unit vectors (so ⟨·,·⟩ is the cosine)."""
    g, v = teacher.shape[1], student.shape[1]
    cos = jnp.einsum("bvk,bgk->bvg", student, teacher)  # (B, V, G)
    same = jnp.zeros((v, g), bool).at[jnp.arange(g), jnp.arange(g)].set(True)
    return jnp.where(same, 0.0, cos).sum((1, 2)).mean() / (g * v - g)


def gamma(k: int, rows: int, shards: int) -> float:
    """The official balancing factor γ = (k + N·m)/(k·N·m), m rows on each of N shards."""
    return (k + shards * rows) / (k * shards * rows)


def batch_shards(batch: int) -> int:
    """N: how many data-parallel shards the current mesh splits a batch of `batch` rows into
    (1 without a mesh). Raises ValueError when they do not divide the batch."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = split_batch_axes(mesh)
    shards = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if batch % shards:
        raise ValueError(f"batch_size: the SimDINO batch of {batch} rows does not split into "
                         f"the {shards} data-parallel shards of mesh axes {axes}")
    return shards


def expansion(features: jax.Array, *, eps: float, shards: int, reduce_cov: int) -> jax.Array:
    """E for features (B, G, k) (one W_j per global view j): γ times the mean over the views
    (and, reduce_cov=0, over the N data shards, each its own block of m = B/N rows) of
    ½ logdet(I + k/(m·N·ε)·WᵀW)."""
    b, g, k = features.shape
    rows = b // shards
    views = jnp.swapaxes(features.astype(jnp.float32), 0, 1)  # (G, B, k), rows in batch order
    if reduce_cov == 0:  # shard n holds rows n·m … (n+1)·m − 1 of the batch
        views = views.reshape(g, shards, rows, k)
    rate = coding_rate(views, alpha=k / (rows * shards * eps))
    return gamma(k, rows, shards) * jnp.mean(rate)


def objective(student: jax.Array, teacher: jax.Array, settings: Objective, *,
              shards: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(−coeff·C − E, {'comp_loss': C, 'expa_loss': E}) of student (B, V, k) and teacher
    (B, G, k) features over `shards` data-parallel shards (the module docstring)."""
    g = teacher.shape[1]
    comp = alignment(student, teacher)
    own = student[:, :g]
    expanded = (own + teacher) / 2 if settings.expa_type == 1 else own
    expa = expansion(expanded, eps=settings.eps, shards=shards,
                     reduce_cov=settings.reduce_cov)
    return -settings.coeff * comp - expa, {"comp_loss": comp, "expa_loss": expa}


def teacher_momentum(step: jax.Array, start: float, end: float, total: int) -> jax.Array:
    """DINO's cosine schedule from `start` at step 0 to `end` at step `total`."""
    progress = jnp.clip(step.astype(jnp.float32) / max(total, 1), 0.0, 1.0)
    return end - (end - start) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


class SimDINOTask(Task):
    batch_coupled = True  # E is a coding rate of the whole batch (per data shard)

    def __init__(self, config):
        super().__init__(config)
        self.objective = Objective.from_config(config)

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

    def features(self, model, batch, rng):
        """{'student': (B, V, k) over every view, global first; 'teacher': (B, G, k), without
        gradient} of a batch."""
        del rng  # DropPath draws from the model's own stream
        glob, (b, g) = self._views(batch["global"])
        student = [model.student(glob).reshape(b, g, -1)]
        if "local" in batch:
            local, (_, n_local) = self._views(batch["local"])
            student.append(model.student(local).reshape(b, n_local, -1))
        teacher_branch = model.teacher
        teacher_branch.eval()  # the teacher runs without DropPath, as DINO's
        teacher = jax.lax.stop_gradient(teacher_branch(glob).reshape(b, g, -1))
        return {"student": jnp.concatenate(student, axis=1), "teacher": teacher}

    def features_loss(self, model, features, rng):
        del model, rng  # the objective has no parameters of its own
        student, teacher = features["student"], features["teacher"]
        return objective(student, teacher, self.objective,
                         shards=batch_shards(student.shape[0]))

    def loss(self, model, batch, rng):
        return self.features_loss(model, self.features(model, batch, rng), rng)

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
                coding_rate_eps_sq=self.objective.eps)
            out.append(probe)
            if spec.get("random_init", False):
                out.append(AtInitialisation(f"{name}_random_init", probe, self))
        return out

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        return multicrop.example_views(self.config.data, batch_size)
