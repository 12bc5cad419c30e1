"""A module from its split state: what the train step, the evaluators and the tasks share.

Parameters travel as the pure nested dict of a model's nnx.Params (`params`) next to the rest
of its state (`rest`: batch statistics, RNG counters); `nnx.merge(graphdef, params, rest)`
rebuilds the module. It lives here, in the models layer, so that evals and tasks need nothing
from crate_jax.train (which imports them).
"""

from __future__ import annotations

import jax
from flax import nnx


def merge_model(graphdef: nnx.GraphDef, params: dict, rest: nnx.State, *,
                train: bool, rng: jax.Array | None = None) -> nnx.Module:
    """The module for these parameters, in train or eval mode, its dropout streams seeded."""
    # copy=True: fresh Variables of this trace, so that a stream the forward pass advances
    # (DropPath's RNG counter) may be mutated inside jax.grad; reusing rest's own Variables,
    # made at the outer trace level, raises TraceContextError.
    model = nnx.merge(graphdef, params, rest, copy=True)
    if train:
        model.train()
        if rng is not None:
            nnx.reseed(model, dropout=rng)
    else:
        model.eval()
    return model


def batch_stats_of(model: nnx.Module) -> dict:
    """The model's nnx.BatchStat values (BatchNorm running statistics) as a pure nested dict;
    {} for a model without any."""
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def set_batch_stats(model: nnx.Module, stats: dict | None) -> nnx.Module:
    """`model` (changed in place) with its nnx.BatchStat values set from `stats`, a pure dict
    as a checkpoint's 'batch_stats'. Eval-mode BatchNorm (ToST's stem) normalises with these;
    without them it would use the initial 0 / 1. Nothing is done when `stats` is empty."""
    if stats:
        state = nnx.state(model, nnx.BatchStat)
        nnx.replace_by_pure_dict(state, stats)
        nnx.update(model, state)
    return model


def split_batch_stats(rest: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(the nnx.BatchStat part, everything else) of a model's non-parameter state."""
    return nnx.split_state(rest, nnx.BatchStat, ...)


def with_batch_stats(rest: nnx.State, stats: dict | None) -> nnx.State:
    """`rest` with its nnx.BatchStat values replaced by `stats` (a pure dict such as the train
    state's 'batch_stats'); `rest` itself when `stats` is None or empty."""
    if not stats:
        return rest
    batch, other = split_batch_stats(rest)
    batch = jax.tree.map(lambda x: x, batch)  # a copy: the caller's state stays as it was
    nnx.replace_by_pure_dict(batch, stats)
    return nnx.merge_state(batch, other)
