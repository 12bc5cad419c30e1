"""The train state and its step, built once from shapes: what the trainer runs, the planner
compiles and the multi-process tests restore against.

    state = {'step': int32 (), 'params': pure nested dict of nnx.Params, 'opt_state': optax}
            (+ 'batch_stats': the nnx.BatchStat running statistics of a model with BatchNorm)

`build_train_state(config, mesh)` makes, without allocating a parameter:
    the task and its abstract model (graphdef, parameter shapes, the non-parameter state)
    parameter shardings from the logical-axis rules, and the parameters they leave
    replicated because the mesh does not divide them (named, with a mesh that would)
    the optimizer on the trainable parameters (config.freeze excluded) and its shardings
    the abstract state (jax.ShapeDtypeStruct with shardings) and the jitted train step:
        in/out shardings, the state donated
Then `init_params` materialises fresh parameters straight into their shardings, `trace`
traces the step for the global batch, and `compile` compiles that trace and counts its FLOPs:
hardware FLOPs on the same jaxpr (perf.jaxpr_flops; no second compile), model FLOPs on the
traced forward pass of the global batch (perf.model_flops; traced, never compiled).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from crate_jax import perf, tasks
from crate_jax.models.state import split_batch_stats
from crate_jax.parallel import (
    DEFAULT_RULES,
    batch_sharding,
    param_shardings,
    replicated,
    undivided_parameters,
)
from crate_jax.train import optim
from crate_jax.train.step import split_frozen, task_forward, task_train_step


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


@dataclasses.dataclass
class TrainState:
    """Everything about the train state that shapes and the mesh determine (see module)."""

    config: ml_collections.ConfigDict
    task: Any
    mesh: jax.sharding.Mesh
    rules: dict
    graphdef: nnx.GraphDef
    frozen: tuple[str, ...]
    param_shardings: Any
    state_shardings: dict
    abstract_state: dict
    abstract_rest: Any
    tx: optax.GradientTransformation
    jitted_step: Any
    undivided: list[str]

    @property
    def batch_sharding(self) -> jax.sharding.NamedSharding:
        return batch_sharding(self.mesh, self.rules)

    def example_batch(self) -> dict:
        """The global batch's shapes (config.batch_size rows), sharded over the batch axes."""
        rows = self.config.batch_size
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype,
                                           sharding=self.batch_sharding),
            self.task.example_batch(1))

    def init_params(self) -> tuple[dict, Any]:
        """(fresh parameters, the model's other state), made on their devices in one jit:
        every process creates only its own shards, nothing is gathered."""
        seed = self.config.seed

        def init():
            model = self.task.build_model(nnx.Rngs(params=seed, dropout=seed + 1))
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return nnx.to_pure_dict(params), rest

        return jax.jit(init, out_shardings=(self.param_shardings, replicated(self.mesh)))()

    def initial_batch_stats(self, rest: Any) -> dict:
        """{'batch_stats': the model's BatchNorm statistics from `rest` (init_params' second
        value), in their shardings}, the state entry a fresh run starts from; {} for a model
        without BatchNorm."""
        if "batch_stats" not in self.abstract_state:
            return {}
        stats = nnx.to_pure_dict(split_batch_stats(rest)[0])
        put = jax.jit(lambda x: x, out_shardings=self.state_shardings["batch_stats"])
        return {"batch_stats": put(stats)}

    def init_opt_state(self, params: dict) -> Any:
        """A fresh optimizer state for `params` (their trainable part), in its shardings."""
        trainable = split_frozen(params, self.frozen)[0]
        return jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(trainable)

    def trace(self) -> jax.stages.Traced:
        """The train step traced for the abstract state and the global batch."""
        return self.jitted_step.trace(self.abstract_state, self.abstract_rest,
                                      self.example_batch())

    def model_flops(self) -> float:
        """Model FLOPs of one step of the global batch (perf.model_flops): 3 × the forward
        FLOPs of the loss on the whole batch, the frozen groups' operations once."""
        forward = task_forward(self.task, self.config, self.graphdef, self.frozen)
        trainable, fixed = split_frozen(self.abstract_state["params"], self.frozen)
        traced = jax.jit(forward).trace(trainable, fixed, self.abstract_rest,
                                        self.example_batch(), self.abstract_state["step"])
        trained = [True] * len(jax.tree.leaves(trainable))
        return perf.model_flops(traced.jaxpr, trained + [False] * (
            len(traced.jaxpr.jaxpr.invars) - len(trained)))

    def compile(self, count_flops: bool = True
                ) -> tuple[jax.stages.Compiled, float, perf.StepFlops | None]:
        """(compiled step, seconds to trace and compile, the model and hardware FLOPs of one
        step of the global batch or None), the step traced once."""
        t0 = time.perf_counter()
        traced = self.trace()
        compiled = traced.lower().compile()
        seconds = time.perf_counter() - t0
        if not count_flops:
            return compiled, seconds, None
        return compiled, seconds, perf.StepFlops(model=self.model_flops(),
                                                 hardware=perf.jaxpr_flops(traced.jaxpr))


def _optimizer(config, task, abstract_params: dict, frozen: tuple[str, ...],
               p_shard: Any, mesh) -> tuple[optax.GradientTransformation, Any, Any]:
    """(tx on the trainable parameters, the abstract optimizer state, its shardings): the
    moments mirror their parameters' shardings, the counters are replicated."""
    trainable = split_frozen(abstract_params, frozen)[0]
    # outside jit: optax's init makes its small constants eagerly, on the host
    tx = optim.make_optimizer(config.optim, trainable, num_layers=task.num_layers())
    abstract_opt = jax.eval_shape(tx.init, trainable)
    opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt,
                                      split_frozen(p_shard, frozen)[0],
                                      transform_non_params=lambda _: replicated(mesh))
    return tx, abstract_opt, opt_shard


def build_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                      task: Any = None) -> TrainState:
    """The abstract train state of `config` on `mesh` and its jitted step (see the module).
    Raises ValueError naming the setting for an unknown freeze group or accumulation mode."""
    task = task if task is not None else tasks.get(config.trainer)(config)
    rules = {**DEFAULT_RULES, **dict(config.get("sharding_rules") or {})}
    # Shapes first, outside the mesh context: the parameters' out_sharding metadata holds
    # logical names, which only our rules (not nnx) translate into mesh axes.
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(params=0, dropout=1)))
    graphdef, params_state, rest = nnx.split(abstract, nnx.Param, ...)
    p_shard = param_shardings(params_state, mesh, rules)
    abstract_params = nnx.to_pure_dict(params_state)
    frozen = tuple(config.get("freeze") or ()) + tuple(task.frozen_groups())
    tx, abstract_opt, opt_shard = _optimizer(config, task, abstract_params, frozen, p_shard,
                                             mesh)
    shardings = {"step": replicated(mesh), "params": p_shard, "opt_state": opt_shard}
    abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                      "opt_state": abstract_opt}
    batch_stats = split_batch_stats(rest)[0]
    if jax.tree.leaves(batch_stats):  # BatchNorm running statistics: trained by the step
        shardings["batch_stats"] = param_shardings(batch_stats, mesh, rules)
        abstract_state["batch_stats"] = nnx.to_pure_dict(batch_stats)
    abstract_state = _with_shardings(abstract_state, shardings)
    abstract_rest = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), rest)
    step_fn = task_train_step(task, config, graphdef, tx, optim.make_schedule(config.optim),
                              frozen)
    jitted = jax.jit(step_fn,
                     in_shardings=(shardings, replicated(mesh), batch_sharding(mesh, rules)),
                     out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    return TrainState(config, task, mesh, rules, graphdef, frozen, p_shard, shardings,
                      abstract_state, abstract_rest, tx, jitted,
                      undivided_parameters(params_state, mesh, rules))
