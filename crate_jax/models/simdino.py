"""SimDINO's student and teacher ("Simplifying DINO via Coding Rate Regularization",
arXiv 2502.10385; docs/design.md §1, "Other members of the family").

    f = backbone(x)                                 pooled features (B, d): any registry image
                                                    model without head (CRATE, CRATE-α, ViT)
    z = h(f) / ‖h(f)‖₂,  h = Linear∘GELU∘Linear∘GELU∘Linear      (B, k), DINO's projection
                                                    head without its prototype layer
    student θ_s: every view (global and local);  teacher θ_t: the global views only,
    θ_t ← m·θ_t + (1 − m)·θ_s after every step (the task's EMA, momentum schedule in the config)

The teacher starts as an exact copy of the student. Its parameters sit under 'teacher' in the
parameter tree, with the same logical axes as the student's, so they are sharded like them and
saved in every checkpoint; the optimizer never sees them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from crate_jax.models.layers import Dense, normal, zeros


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadConfig:
    hidden: int = 2048  # DINO's head
    dim: int = 256  # the bottleneck the loss compares

    def __post_init__(self):
        for name in ("hidden", "dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"head.{name}: must be positive, got {getattr(self, name)}")


def l2_normalize(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


class ProjectionHead(nnx.Module):
    """z = normalize(W₃·GELU(W₂·GELU(W₁f + b₁) + b₂) + b₃); truncated-normal-like N(0, 0.02)
    kernels and zero biases as DINO initialises its head."""

    def __init__(self, width: int, cfg: HeadConfig, *, rngs: nnx.Rngs):
        kw = dict(kernel_init=normal(0.02), bias_init=zeros, rngs=rngs)
        self.fc1 = Dense(width, cfg.hidden, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.hidden, cfg.hidden, axes=("mlp", None), **kw)
        self.fc3 = Dense(cfg.hidden, cfg.dim, axes=(None, None), **kw)

    def __call__(self, features: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.fc1(features.astype(jnp.float32)), approximate=False)
        x = jax.nn.gelu(self.fc2(x), approximate=False)
        return l2_normalize(self.fc3(x))


class Branch(nnx.Module):
    """A backbone and its head: images (B, S, S, C), any S the patch divides → z (B, k)."""

    def __init__(self, backbone: nnx.Module, head: ProjectionHead):
        self.backbone, self.head = backbone, head

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.backbone(images, any_size=True))


class SimDINOModel(nnx.Module):
    """`student` and `teacher` Branches of the same architecture (see the module docstring).
    `__call__(images)` and `encode_image` use the teacher's backbone, the network DINO
    evaluates; the white-box tools see `teacher.backbone` as the image model."""

    def __init__(self, make_backbone: Any, head: HeadConfig, *, rngs: nnx.Rngs):
        backbone = make_backbone(rngs)
        self.cfg = backbone.cfg
        self.student = Branch(backbone, ProjectionHead(backbone.cfg.width, head, rngs=rngs))
        self.teacher = nnx.clone(self.student)

    def __call__(self, images: jax.Array, *, collect: bool = False):
        return self.teacher.backbone(images, collect=collect)

    def encode_image(self, images: jax.Array) -> jax.Array:
        return l2_normalize(self.teacher.backbone(images))


def ema(teacher: Any, student: Any, momentum: jax.Array) -> Any:
    """θ_t ← m·θ_t + (1 − m)·θ_s, leaf by leaf, in the teacher's dtype."""
    return jax.tree.map(lambda t, s: (momentum * t + (1 - momentum) * s).astype(t.dtype),
                        teacher, student)
