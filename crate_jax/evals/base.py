"""What every evaluator gives the training loop and `python -m crate_jax.evaluate`: a name, a
`run` on the current parameters, and the protocol its numbers follow. Tasks list their
evaluators; evaluators never look at tasks."""

from __future__ import annotations

import abc
from typing import Any

import jax
from flax import nnx


class Evaluator(abc.ABC):
    """Runs periodically on the current parameters; returns metrics named '{name}/...'.
    An evaluator that writes files (figures) writes them into `output_dir`, which the training
    loop sets to the workdir once it exists (None: write nothing). `protocol` records how its
    numbers are measured (data set, split, preprocessing, rule), so that crate_jax.evaluate
    reports every number with it."""

    name: str
    output_dir: str | None = None
    protocol: dict[str, Any] | None = None

    @abc.abstractmethod
    def run(self, graphdef: nnx.GraphDef, params: dict, rest: nnx.State,
            mesh: jax.sharding.Mesh) -> dict[str, float]: ...
