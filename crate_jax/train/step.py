"""The train step every task shares: loss → gradients (optionally accumulated over
micro-batches) → optax update. A task supplies only `loss(model, batch, rng)`.

The state is a plain dict {'step', 'params', 'opt_state'}; params is the pure nested dict of
the model's nnx.Params. A model with BatchNorm (ToST's stem) adds 'batch_stats', the pure dict
of its nnx.BatchStat running statistics, which the step carries forward (and so checkpoints).
Randomness (dropout, DropPath, mixup) comes from fold_in(key(seed), step), so a resumed run
draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from crate_jax.models.state import (  # merge_model: still importable from here
    batch_stats_of,
    merge_model,
    with_batch_stats,
)

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def split_microbatches(batch: dict, accum_steps: int) -> dict:
    """(B, ...) → (accum, B/accum, ...), micro-batch i taking rows i, i+accum, ...: each device's
    contiguous block of the batch holds rows of every micro-batch, so no data moves."""
    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def split_frozen(params: dict, frozen: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) parts of the parameter dict. Each entry of `frozen` is a '/'-path:
    a top-level group ('text'), one parameter ('logit_scale') or any sub-tree
    ('image/encoder/layers/0'). Both parts keep the nesting of `params`."""
    paths = _leaf_paths(params)
    unknown = sorted(f for f in frozen if not any(p == f or p.startswith(f + "/")
                                                  for p in paths))
    if unknown:
        stacked = any(re.search(r"encoder/layers/\d+", f) for f in unknown)
        raise ValueError(f"freeze: {unknown} name no parameters; a path is a top-level group "
                         f"({sorted(params)}) or any '/'-path below one, e.g. "
                         f"{paths[0] if paths else 'text/encoder'!r}" + (
                             ". The layers are stacked (one array per parameter, leading "
                             "axis = layer), so a single layer cannot be frozen; freeze "
                             "'…/encoder/layers' or a part of every layer such as "
                             "'…/encoder/layers/attn'" if stacked else ""))
    wanted = set(frozen)

    def part(tree: dict, prefix: str) -> tuple[dict, dict]:
        trainable, fixed = {}, {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if path in wanted:
                fixed[key] = value
            elif isinstance(value, dict) and any(f.startswith(path + "/") for f in wanted):
                t, f = part(value, path + "/")
                if t:
                    trainable[key] = t
                if f:
                    fixed[key] = f
            else:
                trainable[key] = value
        return trainable, fixed

    return part(params, "")


def merge_params(a: dict, b: dict) -> dict:
    """The union of two disjoint parts of a parameter dict (the inverse of split_frozen)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_params(out[key], value) if key in out else value
    return out


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaf_paths(value, f"{prefix}{key}/")
        else:
            out.append(f"{prefix}{key}")
    return out


def group_counts(params: dict, frozen: tuple[str, ...]) -> str:
    """'image 40,352 of 40,352 · text 0 of 12,000 (frozen) · ...', counted on the trainable
    part of the parameters the train step actually updates."""
    trainable, fixed = split_frozen(params, frozen)

    def count(tree: Any) -> int:
        return sum(int(x.size) for x in jax.tree.leaves(tree))

    return " · ".join(
        f"{group} {count(trainable.get(group, {})):,} of {count(params[group]):,}"
        + (" (frozen)" if group in fixed else "") for group in params)


def all_finite(tree: Any) -> jax.Array:
    """True when no floating-point leaf of `tree` holds a NaN or an infinity: checked on the
    new state inside the step, so that a non-finite state is never saved (one read of it)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def clamp_params(params: dict, bounds: dict[str, tuple[float, float]]) -> dict:
    """Top-level parameters named in `bounds` clipped into [lo, hi] (the others as they are).

    A bound on the value, applied after the update (as CLIP clamps its temperature), rather
    than a clip in the forward pass: the gradient then always reaches the parameter, so a
    temperature that reached its bound can move back."""
    return {k: jnp.clip(v, *bounds[k]) if k in bounds else v for k, v in params.items()}


def join_microbatches(stacked: Any) -> Any:
    """(accum, B/accum, ...) → (B, ...) in the batch's own row order (the inverse of
    split_microbatches; each device's block stays where it is)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), stacked)


def feature_cached_grads(features: Callable, features_loss: Callable, params: dict,
                         batch: dict, rng: jax.Array, accum_steps: int):
    """((loss, aux), grads) of a loss that couples the examples of a batch (contrastive), over
    `accum_steps` micro-batches, equal to the whole batch's (open_clip's `accum_freq`, with
    the direct gradient of the loss's own parameters counted once):

      1. F_i = features(θ, micro-batch i) for every i, without gradients;
      2. L = features_loss(θ, [F_1 … F_k]) over the whole batch: ∂L/∂F_i, and ∂L/∂θ directly
         (the temperature and bias);
      3. ∇θ = ∂L/∂θ + Σ_i (∂F_i/∂θ)ᵀ·∂L/∂F_i, one micro-batch's backward pass at a time
         against the cached features of the others (its forward pass is run again).

    features(params, micro_batch, rng) and features_loss(params, features, rng); micro-batch
    i draws its randomness from fold_in(rng, i) in both passes, so both see the same features.
    Memory: one micro-batch's activations plus the features of the whole batch."""
    micro_batches = split_microbatches(batch, accum_steps)
    rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(accum_steps))
    cached = jax.lax.stop_gradient(jax.lax.map(
        lambda xs: features(params, xs[1], xs[0]), (rngs, micro_batches)))

    def whole_batch_loss(params, stacked):
        return features_loss(params, join_microbatches(stacked), rng)

    (loss_value, aux), (direct, d_features) = jax.value_and_grad(
        whole_batch_loss, argnums=(0, 1), has_aux=True)(params, cached)

    def backward(grads, xs):
        micro_rng, micro_batch, cotangent = xs
        _, vjp = jax.vjp(lambda p: features(p, micro_batch, micro_rng), params)
        return jax.tree.map(jnp.add, grads, vjp(cotangent)[0]), None

    grads, _ = jax.lax.scan(backward, direct, (rngs, micro_batches, d_features))
    return (loss_value, aux), grads


def averaged_grads(grad_fn: Callable, trainable: dict, batch: dict, rng: jax.Array,
                   accum_steps: int):
    """((loss, aux), grads) averaged over `accum_steps` micro-batches, one at a time:
    grad_fn(trainable, micro_batch, rng) for micro-batch i with fold_in(rng, i). The whole
    batch's update for a loss that is a mean over independent examples."""
    micro_batches = split_microbatches(batch, accum_steps)

    def accumulate(carry, xs):
        index, micro_batch = xs
        (loss_i, aux_i), grads_i = grad_fn(trainable, micro_batch,
                                           jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (loss_i, aux_i, grads_i)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    (l0, a0), g0 = jax.eval_shape(grad_fn, trainable, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
    sums, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro_batches))
    # every micro-batch loss is a mean over the same number of rows
    loss_value, aux, grads = jax.tree.map(lambda x: x / accum_steps, sums)
    return (loss_value, aux), grads


def make_train_step(loss: LossFn, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, seed: int, accum_steps: int = 1,
                    frozen: tuple[str, ...] = (),
                    bounds: dict[str, tuple[float, float]] | None = None,
                    features: tuple[Callable, Callable] | None = None,
                    after_update: Callable[[dict, jax.Array], dict] | None = None):
    """train_step(state, rest, batch) -> (state, metrics), to be jitted by the caller.

    `frozen` top-level parameter groups (e.g. a pretrained text tower) get no gradient, no
    update and no optimizer state; `tx` works on the trainable part only. Trainable
    parameters named in `bounds` (Task.param_bounds) are clipped after every update.

    With `features` = (Task.features, Task.features_loss), a batch-coupled loss, micro-batches
    accumulate by feature caching (feature_cached_grads): the update of the whole batch.
    Without, each micro-batch's loss is its own mean and the gradients are averaged: the same
    update only for a loss that is a mean over independent examples."""

    def loss_of_params(trainable, fixed, rest, batch, rng):
        model = merge_model(graphdef, merge_params(trainable, fixed), rest, train=True,
                            rng=rng)
        loss_value, aux = loss(model, batch, rng)
        # BatchNorm running statistics the forward pass updated ({} for most models)
        return loss_value, (aux, batch_stats_of(model))

    value_and_grad = jax.value_and_grad(loss_of_params, has_aux=True)

    def train_step(state: dict[str, Any], rest: nnx.State, batch: dict):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        trainable, fixed = split_frozen(state["params"], frozen)
        stats = state.get("batch_stats")  # present for models with BatchNorm (ToST)
        rest = with_batch_stats(rest, stats)
        (loss_value, aux), grads = _gradients(
            value_and_grad, graphdef, trainable, fixed, rest, batch, rng,
            accum_steps=accum_steps, features=features, has_stats=bool(stats))
        # with accumulation the running statistics are the micro-batches' mean update
        aux, new_stats = aux
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        params = merge_params(clamp_params(optax.apply_updates(trainable, updates),
                                           bounds or {}), fixed)
        if after_update is not None:  # the task's own rule for its frozen groups (EMA)
            params = after_update(params, state["step"])
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        if stats is not None:
            new_state["batch_stats"] = new_stats
        metrics = {"train/loss": loss_value, "train/grad_norm": optax.tree.norm(grads),
                   "train/state_finite": all_finite((params, opt_state, new_stats)),
                   "train/lr": schedule(state["step"]),
                   **{f"train/{k}": v for k, v in aux.items()}}
        return new_state, metrics

    return train_step


def _gradients(value_and_grad: Callable, graphdef: nnx.GraphDef, trainable: dict, fixed: dict,
               rest: nnx.State, batch: dict, rng: jax.Array, *, accum_steps: int,
               features: tuple[Callable, Callable] | None, has_stats: bool):
    """((loss, (aux, batch_stats)), grads) of the trainable parameters on `batch`, for
    value_and_grad(trainable, fixed, rest, batch, rng): in one pass, accumulated over
    micro-batches by feature caching (`features` given), or averaged over micro-batches."""

    def grad_fn(trainable, rest, batch, rng):
        return value_and_grad(trainable, fixed, rest, batch, rng)

    if accum_steps == 1:
        return grad_fn(trainable, rest, batch, rng)
    if features is None:
        return averaged_grads(
            lambda t, b, r: grad_fn(t, rest, b, r), trainable, batch, rng, accum_steps)
    if has_stats:
        raise ValueError("grad_accum_steps with feature caching: a model with "
                         "BatchNorm statistics (batch_stats) cannot be accumulated "
                         "this way; use grad_accum_steps=1")
    features_fn, features_loss_fn = features

    def model_of(trainable, rng):
        return merge_model(graphdef, merge_params(trainable, fixed), rest, train=True, rng=rng)

    (loss_value, aux), grads = feature_cached_grads(
        lambda p, b, r: features_fn(model_of(p, r), b, r),
        lambda p, f, r: features_loss_fn(model_of(p, r), f, r),
        trainable, batch, rng, accum_steps)
    return (loss_value, (aux, {})), grads


def task_forward(task: Any, config: Any, graphdef: nnx.GraphDef, frozen: tuple[str, ...]):
    """forward(trainable, fixed, rest, batch, step) → (loss, aux): the loss of `task` on the
    whole batch as the train step computes it, without gradients, micro-batches or remat
    recomputation. Its jaxpr is what model FLOPs count (perf.model_flops)."""

    def forward(trainable, fixed, rest, batch, step):
        rng = jax.random.fold_in(jax.random.key(config.seed), step)
        model = merge_model(graphdef, merge_params(trainable, fixed), rest, train=True, rng=rng)
        return task.loss(model, batch, rng)

    return forward


def task_train_step(task: Any, config: Any, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    frozen: tuple[str, ...]):
    """The train step of `task` as `config` sets it (the loop and the planner share it).

    config.grad_accum_steps > 1 on a task whose loss couples the examples of a batch
    (Task.batch_coupled: contrastive) accumulates by feature caching, which keeps the global
    batch; config.grad_accum_mode='plain' is refused there (each micro-batch would see only
    B/k negatives: another objective)."""
    accum = config.get("grad_accum_steps", 1)
    mode = config.get("grad_accum_mode", "auto")
    if mode not in ("auto", "plain", "features"):
        raise ValueError(f"grad_accum_mode={mode!r}: 'auto', 'plain' or 'features'")
    coupled = getattr(task, "batch_coupled", False)
    if accum > 1 and coupled and mode == "plain":
        raise ValueError(
            f"grad_accum_mode='plain' with grad_accum_steps={accum}: the {config.trainer} "
            "loss couples the examples of a batch, so plain accumulation would train on "
            f"micro-batches of {config.batch_size // accum} negatives instead of "
            f"{config.batch_size}; use grad_accum_mode='auto' (feature-cached accumulation, "
            "the same update as the whole batch)")
    if accum > 1 and mode == "features" and not coupled:
        raise ValueError(f"grad_accum_mode='features': the {config.trainer} loss is a mean "
                         "over independent examples; plain accumulation ('auto') is exact")
    use_features = accum > 1 and coupled
    return make_train_step(task.loss, graphdef, tx, schedule, seed=config.seed,
                           accum_steps=accum, frozen=frozen, bounds=task.param_bounds(),
                           features=(task.features, task.features_loss) if use_features
                           else None, after_update=task.after_update)
