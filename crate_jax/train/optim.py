"""Optimizers and learning-rate schedules for the trainer.

    make_schedule(cfg)                      linear warmup, then cosine / linear decay or constant
    make_optimizer(cfg, params, L)          clip → AdamW | LAMB | Lion (lr injected) → layer decay
    decay_mask(params), layer_ids(params)   path-based rules on the pure parameter dict

Parameters are the pure nested dict `nnx.to_pure_dict(nnx.state(model, nnx.Param))`, or any
nesting of such trees (CLIP towers under 'image' / 'text'); the rules look only at the key path
and the leaf's shape, so abstract (ShapeDtypeStruct) parameters work too.

The optimizer state is `(clip, InjectStatefulHyperparamsState(inner_state=...), layer decay)`
whatever the options (a disabled step is `optax.identity()`, state EmptyState), so its structure
does not change when clipping or layer decay are toggled; `learning_rate(opt_state)` reads the
rate the last update used. The moments mirror `params`, so `optax.tree_map_params` works.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from crate_jax.models import layer_stack

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "lamb", "lion")
_DEFAULT_B2 = {"adamw": 0.999, "lamb": 0.999, "lion": 0.99}

# Leaves under any of these keys are never weight-decayed (besides biases and ndim < 2 leaves).
NO_DECAY_KEYS = frozenset(
    {"cls", "posemb", "pos_embedding", "token_embedding", "logit_scale", "gamma"})
# Leaves under any of these keys are "before the first layer" for layer-wise lr decay.
EMBEDDING_KEYS = frozenset({"stem", "cls", "posemb", "token_embedding", "pos_embedding"})


# --- config access ---------------------------------------------------------------------------

def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = cfg.get(name, None)
    return default if value is None else value


def _number(cfg: Any, name: str, default: float | None = None, *,
            positive: bool = False) -> float:
    value = _get(cfg, name, default)
    if value is None:
        raise ValueError(f"optimizer config field {name!r} is required")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"optimizer config field {name!r} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"optimizer config field {name!r} must be {bound}, got {value!r}")
    return float(value)


# --- schedule --------------------------------------------------------------------------------

def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup warmup_init_lr → lr over warmup_steps, then cosine or linear decay to
    end_lr at total_steps (or constant lr). Fields: lr, total_steps, warmup_steps (0),
    schedule ('cosine'), end_lr (0), warmup_init_lr (0)."""
    kind = _get(cfg, "schedule", "cosine")
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer config field 'schedule' must be one of {SCHEDULES}, "
                         f"got {kind!r}")
    lr = _number(cfg, "lr")
    total = _number(cfg, "total_steps", positive=True)
    warmup = _number(cfg, "warmup_steps", 0)
    end = _number(cfg, "end_lr", 0.0)
    init = _number(cfg, "warmup_init_lr", 0.0)
    if warmup > total:
        raise ValueError(f"optimizer config field 'warmup_steps' ({warmup}) must not exceed "
                         f"total_steps ({total})")

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = init + (lr - init) * step / max(warmup, 1)
        frac = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if kind == "cosine":
            decay = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif kind == "linear":
            decay = lr + (end - lr) * frac
        else:
            decay = jnp.full_like(step, lr)
        return jnp.where(step < warmup, warm, decay)

    return schedule


def current_lr(cfg: ml_collections.ConfigDict, step: int) -> float:
    """The scheduled learning rate at `step`."""
    return float(make_schedule(cfg)(step))


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate injected into the last update (schedule(0) before the first one)."""
    injected = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, injected))
             if isinstance(s, injected)]
    if len(found) != 1:
        raise ValueError(f"expected one injected-hyperparameter state, found {len(found)}")
    return found[0].hyperparams["learning_rate"]


# --- path rules ------------------------------------------------------------------------------

def _names(path: tuple) -> tuple:
    """Key path → plain names (str or int); an nnx.Variable's trailing '.value' is dropped."""
    if path and getattr(path[-1], "name", None) in ("value", "raw_value"):
        path = path[:-1]
    out = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                out.append(getattr(key, attr))
                break
        else:
            out.append(str(key))
    return tuple(out)


def _ndim(leaf: Any) -> int:
    shape = getattr(leaf, "shape", None)
    return len(shape) if shape is not None else jnp.ndim(leaf)


def _as_int(key: Any) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None


def decay_mask(params: Any) -> Any:
    """True for every matrix/kernel leaf (ndim >= 2); False for biases, LayerNorm, cls, position
    and token embeddings, logit_scale, LayerScale gamma and every leaf with ndim < 2."""

    def decayed(path: tuple, leaf: Any) -> bool:
        names = _names(path)
        # a stacked leaf's layer axis is not one of a matrix's
        ndim = _ndim(leaf) - layer_stack.is_stacked_path(names)
        if ndim < 2 or any(n in NO_DECAY_KEYS for n in names if isinstance(n, str)):
            return False
        return not (names and isinstance(names[-1], str) and names[-1].endswith("bias"))

    return jax.tree_util.tree_map_with_path(decayed, params)


def layer_ids(params: Any, num_layers: int) -> Any:
    """Depth of each leaf for layer-wise lr decay: embeddings and stem 0, `encoder/layers/i`
    i + 1, everything else (final norm, head, projections, logit_scale) num_layers + 1.
    A stacked leaf ('encoder/layers/attn/proj', (L, ...)) gets the array 1 … L, shaped to
    broadcast over its layer axis. Each tower ('image', 'text', ...) counts its own layers."""
    if (isinstance(num_layers, bool) or not isinstance(num_layers, numbers.Integral)
            or num_layers < 0):
        raise ValueError(f"num_layers must be an int >= 0, got {num_layers!r}")
    num_layers = int(num_layers)

    def layer_id(path: tuple, leaf: Any) -> int | np.ndarray:
        names = _names(path)
        if layer_stack.is_stacked_path(names):
            depth = leaf.shape[0]
            if depth > num_layers:
                raise ValueError(f"{'/'.join(map(str, names))}: {depth} stacked layers but "
                                 f"num_layers={num_layers}")
            return np.arange(1, depth + 1).reshape((depth,) + (1,) * (_ndim(leaf) - 1))
        for a, b, c in zip(names, names[1:], names[2:], strict=False):
            index = _as_int(c)
            if a == "encoder" and b == "layers" and index is not None:
                if index >= num_layers:
                    raise ValueError(f"{'/'.join(map(str, names))}: layer {index} but "
                                     f"num_layers={num_layers}")
                return index + 1
        if any(n in EMBEDDING_KEYS for n in names if isinstance(n, str)):
            return 0
        return num_layers + 1

    return jax.tree_util.tree_map_with_path(layer_id, params)


def layer_scales(params: Any, num_layers: int, layer_decay: float) -> Any:
    """layer_decay ** (num_layers + 1 - layer_id) per leaf (Python floats; float32 arrays
    for stacked layer leaves)."""
    def scale(i):
        if isinstance(i, np.ndarray):
            return (layer_decay ** (num_layers + 1 - i)).astype(np.float32)
        return float(layer_decay ** (num_layers + 1 - i))

    return jax.tree.map(scale, layer_ids(params, num_layers))


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by the matching leaf of a fixed tree of scales (stateless)."""

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: optax.EmptyState, params: Any = None):
        del params
        scaled = jax.tree.map(lambda s, u: u if isinstance(s, float) and s == 1.0 else u * s,
                              scales, updates)
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)


# --- optimizer -------------------------------------------------------------------------------

def _mu_dtype(cfg: Any) -> jnp.dtype | None:
    value = _get(cfg, "mu_dtype")
    if value is None:
        return None
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"optimizer config field 'mu_dtype' must be None or a float dtype "
                         f"such as 'bfloat16', got {value!r}")
    return dtype


def _beta(cfg: Any, name: str, default: float) -> float:
    value = _number(cfg, name, default)
    if value >= 1:
        raise ValueError(f"optimizer config field {name!r} must be in [0, 1), got {value!r}")
    return value


def make_optimizer(cfg: ml_collections.ConfigDict, params: Any,
                   num_layers: int | None = None) -> optax.GradientTransformation:
    """chain(clip_by_global_norm | identity, inject_hyperparams(opt)(lr=schedule),
    layer-decay scales | identity). opt is AdamW, LAMB or Lion with decoupled weight decay on
    decay_mask(params). Fields: name, the schedule fields, b1, b2, eps, weight_decay, mu_dtype,
    clip_norm, layer_decay (needs num_layers)."""
    name = _get(cfg, "name", "adamw")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer config field 'name' must be one of {OPTIMIZERS}, "
                         f"got {name!r}")
    schedule = make_schedule(cfg)
    b1 = _beta(cfg, "b1", 0.9)
    b2 = _beta(cfg, "b2", _DEFAULT_B2[name])
    eps = _number(cfg, "eps", 1e-8)
    weight_decay = _number(cfg, "weight_decay", 0.0)
    mu_dtype = _mu_dtype(cfg)
    clip_norm = _get(cfg, "clip_norm")
    if clip_norm is not None:
        clip_norm = _number(cfg, "clip_norm", positive=True)
    layer_decay = _get(cfg, "layer_decay")
    if layer_decay is not None:
        layer_decay = _number(cfg, "layer_decay", positive=True)
        if layer_decay > 1:
            raise ValueError(f"optimizer config field 'layer_decay' must be in (0, 1], "
                             f"got {layer_decay!r}")
        if num_layers is None:
            raise ValueError("optimizer config field 'layer_decay' needs num_layers "
                             "(pass make_optimizer(..., num_layers=depth))")
    mask = decay_mask(params)

    def inner(learning_rate: jax.Array) -> optax.GradientTransformation:
        if name == "adamw":
            return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
                               weight_decay=weight_decay, mask=mask)
        if name == "lamb":  # optax.lamb's chain, plus mu_dtype
            return optax.chain(
                optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
                optax.add_decayed_weights(weight_decay, mask),
                optax.scale_by_trust_ratio(),
                optax.scale_by_learning_rate(learning_rate),
            )
        return optax.lion(learning_rate, b1=b1, b2=b2, mu_dtype=mu_dtype,
                          weight_decay=weight_decay, mask=mask)

    factory: Callable[..., optax.GradientTransformation] = optax.inject_hyperparams(
        inner, hyperparam_dtype=jnp.float32)
    clip = optax.identity() if clip_norm is None else optax.clip_by_global_norm(clip_norm)
    scaled = (optax.identity() if layer_decay is None
              else scale_by_tree(layer_scales(params, num_layers, layer_decay)))
    return optax.chain(clip, factory(learning_rate=schedule), scaled)
