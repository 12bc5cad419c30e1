"""An evaluator run on the model at its initialisation: the baseline a trained model's figures
are read against (a randomly initialised backbone's k-NN accuracy, for example)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from crate_jax.evals.base import Evaluator
from crate_jax.parallel import replicated


class AtInitialisation(Evaluator):
    """`inner` on the parameters `task.build_model` makes from the run's seed (the state the
    run started from), computed once and reported at every evaluation under `name`."""

    def __init__(self, name: str, inner: Evaluator, task: Any):
        self.name, self.inner, self.task = name, inner, task
        self._result: dict[str, float] | None = None

    def initial_params(self, mesh: jax.sharding.Mesh) -> dict:
        seed = self.task.config.seed

        def init():
            model = self.task.build_model(nnx.Rngs(params=seed, dropout=seed + 1))
            return nnx.to_pure_dict(nnx.state(model, nnx.Param))

        return jax.jit(init, out_shardings=replicated(mesh))()

    def run(self, graphdef, params, rest, mesh) -> dict[str, float]:
        if self._result is None:
            inner = self.inner.run(graphdef, self.initial_params(mesh), rest, mesh)
            prefix = f"{self.inner.name}/"
            self._result = {f"{self.name}/{k[len(prefix):]}": v for k, v in inner.items()}
        return dict(self._result)
