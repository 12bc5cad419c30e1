"""The train step every task shares: loss → gradients (optionally accumulated over
micro-batches) → optax update. A task supplies only `loss(model, batch, rng)`.

The state is a plain dict {'step', 'params', 'opt_state'}; params is the pure nested dict of
the model's nnx.Params. Randomness (dropout, DropPath, mixup) comes from
fold_in(key(seed), step), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def merge_model(graphdef: nnx.GraphDef, params: dict, rest: nnx.State, *,
                train: bool, rng: jax.Array | None = None) -> nnx.Module:
    """The module for these parameters, in train or eval mode, its dropout streams seeded."""
    model = nnx.merge(graphdef, params, rest)
    if train:
        model.train()
        if rng is not None:
            nnx.reseed(model, dropout=rng)
    else:
        model.eval()
    return model


def split_microbatches(batch: dict, accum_steps: int) -> dict:
    """(B, ...) → (accum, B/accum, ...), micro-batch i taking rows i, i+accum, ...: each device's
    contiguous block of the batch holds rows of every micro-batch, so no data moves."""
    def split(x):
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def split_frozen(params: dict, frozen: tuple[str, ...]) -> tuple[dict, dict]:
    """(trainable, frozen) top-level parts of the parameter dict."""
    unknown = sorted(set(frozen) - set(params))
    if unknown:
        raise ValueError(f"freeze: {unknown} are not top-level parameter groups; the groups are "
                         f"{sorted(params)}")
    return ({k: v for k, v in params.items() if k not in frozen},
            {k: v for k, v in params.items() if k in frozen})


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


def make_train_step(loss: LossFn, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, seed: int, accum_steps: int = 1,
                    frozen: tuple[str, ...] = (),
                    bounds: dict[str, tuple[float, float]] | None = None):
    """train_step(state, rest, batch) -> (state, metrics), to be jitted by the caller.

    `frozen` top-level parameter groups (e.g. a pretrained text tower) get no gradient, no
    update and no optimizer state; `tx` works on the trainable part only. Trainable
    parameters named in `bounds` (Task.param_bounds) are clipped after every update."""

    def loss_of_params(trainable, fixed, rest, batch, rng):
        model = merge_model(graphdef, {**trainable, **fixed}, rest, train=True, rng=rng)
        return loss(model, batch, rng)

    value_and_grad = jax.value_and_grad(loss_of_params, has_aux=True)

    def train_step(state: dict[str, Any], rest: nnx.State, batch: dict):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        trainable, fixed = split_frozen(state["params"], frozen)

        def grad_fn(trainable, rest, batch, rng):
            return value_and_grad(trainable, fixed, rest, batch, rng)

        if accum_steps == 1:
            (loss_value, aux), grads = grad_fn(trainable, rest, batch, rng)
        else:
            micro_batches = split_microbatches(batch, accum_steps)

            def accumulate(carry, xs):
                index, micro_batch = xs
                (loss_i, aux_i), grads_i = grad_fn(trainable, rest, micro_batch,
                                                   jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (loss_i, aux_i, grads_i)), None

            first = jax.tree.map(lambda x: x[0], micro_batches)
            (l0, a0), g0 = jax.eval_shape(grad_fn, trainable, rest, first, rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
            sums, _ = jax.lax.scan(accumulate, zeros,
                                   (jnp.arange(accum_steps), micro_batches))
            # every micro-batch loss is a mean over the same number of rows
            loss_value, aux, grads = jax.tree.map(lambda x: x / accum_steps, sums)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        params = {**clamp_params(optax.apply_updates(trainable, updates), bounds or {}),
                  **fixed}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        metrics = {"train/loss": loss_value, "train/grad_norm": optax.tree.norm(grads),
                   "train/state_finite": all_finite((params, opt_state)),
                   "train/lr": schedule(state["step"]),
                   **{f"train/{k}": v for k, v in aux.items()}}
        return new_state, metrics

    return train_step
