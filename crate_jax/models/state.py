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
