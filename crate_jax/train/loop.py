"""The training loop every task runs on, top to bottom.

    mesh, task, abstract model → shardings from the logical-axis rules
    init params + optimizer state directly into their shardings (one jit, nothing gathered)
    finetune: load another run's parameters and adapt them (new head, resized posemb / stem)
    resume: the latest complete checkpoint in WORKDIR/checkpoints (state + data position)
    loop: host batch → global array → jitted step (donated state) → log / eval / save
    SIGTERM or a preemption notice: save, then return cleanly
    a non-finite loss: stop with the step; the last good checkpoint stays untouched
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx

from crate_jax import perf, tasks
from crate_jax.models.resize import adapt_for_finetune
from crate_jax.parallel import (
    DEFAULT_RULES,
    batch_sharding,
    host_batch_to_global,
    make_mesh,
    maybe_initialize_distributed,
    param_shardings,
    replicated,
)
from crate_jax.parallel.sharding import data_parallel_size
from crate_jax.train import optim
from crate_jax.train.checkpoint import Checkpointer
from crate_jax.train.metrics import MetricWriter, Throughput, progress_line
from crate_jax.train.step import make_train_step, split_frozen

# Settings that may change when a run resumes; any other difference is an error.
RESUME_SAFE_KEYS = ("log_every", "eval_every", "save_every", "profile", "wandb_project",
                    "data.num_workers", "checkpoint.keep", "checkpoint.async_save",
                    "eval_batch_size")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_workdir_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """Save the resolved config on the first start; on a restart, refuse a different one."""
    path = workdir / "config.json"
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    if path.exists():
        saved = _flatten(json.loads(path.read_text()))
        new = _flatten(resolved)
        differs = sorted(k for k in set(saved) | set(new)
                         if saved.get(k) != new.get(k)
                         and not any(k == s or k.startswith(s + ".") for s in RESUME_SAFE_KEYS))
        if differs:
            details = "; ".join(f"{k}: {saved.get(k)!r} → {new.get(k)!r}" for k in differs[:8])
            raise ValueError(f"workdir {workdir} holds a run with a different config ({details}). "
                             "Use a new --workdir, or the original settings to resume.")
    elif jax.process_index() == 0:
        path.write_text(json.dumps(resolved, indent=2, sort_keys=True))


def _check_batch(config, mesh) -> int:
    """The per-process batch size, after checking that everything divides it."""
    batch, dp = config.batch_size, data_parallel_size(mesh, config.get("sharding_rules") or
                                                      DEFAULT_RULES)
    accum = config.get("grad_accum_steps", 1)
    for divisor, what in ((dp, f"the {dp} data-parallel devices (mesh data × fsdp)"),
                          (jax.process_count(), f"the {jax.process_count()} processes"),
                          (accum * dp, f"grad_accum_steps={accum} × {dp} devices")):
        if batch % divisor:
            raise ValueError(f"batch_size={batch} is not divisible by {what}")
    return batch // jax.process_count()


class _StopSignal:
    """Turns SIGTERM (preemption on most clusters) into a flag the loop checks every step."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            logging.warning("signal %d: will save a checkpoint and stop", signum)
            self.received = True
        if jax.process_count() > 1:
            # jax.distributed's preemption notifier owns SIGTERM: every process then stops at
            # the same step (reached_preemption_sync_point). A handler of ours would replace it,
            # and a process stopping alone deadlocks the others at the next collective.
            return self
        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        if self.received:
            return True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            with contextlib.suppress(Exception):  # no preemption service: only SIGTERM counts
                return bool(multihost_utils.reached_preemption_sync_point(step))
        return False


def _check_finite(metrics: dict, step: int, checkpointer: Checkpointer) -> None:
    loss = float(metrics["train/loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss {loss} at step {step}; stopping. The last good checkpoint "
            f"(step {checkpointer.latest_step()}) is intact.")


def _finetune_params(config, params, shardings, mesh) -> dict:
    """Parameters from config.init_from (another run's workdir or checkpoint directory),
    adapted to this model: fresh head, position embedding and patch stem resized."""
    source = epath.Path(config.init_from)
    directory = source / "checkpoints" if (source / "checkpoints").exists() else source
    loaded = Checkpointer(directory, async_save=False).restore_params(
        config.get("init_step"), replicated(mesh))
    adapted, notes = adapt_for_finetune(
        jax.device_get(loaded), jax.device_get(params),
        reinit_head=config.get("reinit_head", True))
    for note in notes:
        logging.info("finetune: %s", note)
    return jax.device_put(adapted, shardings)


def _load_towers(specs, params, shardings, mesh) -> dict:
    """Copy whole top-level parameter groups (e.g. 'text', 'text_proj') from other runs:
    config.init_towers = [{'from': RUN_OR_CHECKPOINT_DIR, 'keys': ['text', 'text_proj']}]."""
    params = dict(params)
    for spec in specs:
        source = epath.Path(spec["from"])
        directory = source / "checkpoints" if (source / "checkpoints").exists() else source
        loaded = jax.device_get(Checkpointer(directory, async_save=False).restore_params(
            spec.get("step"), replicated(mesh)))
        for key in spec["keys"]:
            if key not in loaded:
                raise ValueError(f"init_towers: {directory} has no parameter group {key!r}; "
                                 f"it has {sorted(loaded)}")
            want = jax.tree.map(lambda x: x.shape, params[key])
            got = jax.tree.map(lambda x: x.shape, loaded[key])
            if want != got:
                raise ValueError(f"init_towers: {key!r} from {directory} has other shapes than "
                                 "this model's (a different size or context length)")
            params[key] = jax.device_put(loaded[key], shardings[key])
            logging.info("init_towers: %s loaded from %s", key, directory)
    return params


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (or resume) the task in `config` in `workdir`; returns the final metrics."""
    maybe_initialize_distributed()
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_workdir_config(config, workdir)
    task = tasks.get(config.trainer)(config)
    mesh = make_mesh(config.get("mesh", {"fsdp": -1}))
    rules = {**DEFAULT_RULES, **dict(config.get("sharding_rules") or {})}
    local_batch = _check_batch(config, mesh)
    total_steps = config.total_steps

    # Abstract shapes first, outside the mesh context: the parameters' out_sharding metadata
    # holds logical names, which only our rules (not nnx) translate into mesh axes.
    abstract = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
    p_shard = param_shardings(abstract_params, mesh, rules)

    with jax.set_mesh(mesh):
        # --- parameters and optimizer state, created in place ---

        def init():
            model = task.build_model(nnx.Rngs(params=config.seed, dropout=config.seed + 1))
            _, params, rest = nnx.split(model, nnx.Param, ...)
            return nnx.to_pure_dict(params), rest

        params, rest = jax.jit(init, out_shardings=(p_shard, replicated(mesh)))()
        frozen = tuple(config.get("freeze") or ())
        trainable, _ = split_frozen(params, frozen)
        tx = optim.make_optimizer(config.optim, trainable, num_layers=task.num_layers())
        abstract_opt = jax.eval_shape(tx.init, trainable)
        opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt,
                                          split_frozen(p_shard, frozen)[0],
                                          transform_non_params=lambda _: replicated(mesh))
        state_shard = {"step": replicated(mesh), "params": p_shard, "opt_state": opt_shard}

        checkpointer = Checkpointer(
            workdir / "checkpoints", keep=config.checkpoint.get("keep", 2),
            keep_best=config.checkpoint.get("keep_best", 1),
            best_metric=config.checkpoint.get("best_metric"),
            best_mode=config.checkpoint.get("best_mode", "max"),
            async_save=config.checkpoint.get("async_save", True))
        start = checkpointer.latest_step()
        if start is None and config.get("init_from"):
            params = _finetune_params(config, params, p_shard, mesh)
        if start is None and config.get("init_towers"):
            params = _load_towers(config.init_towers, params, p_shard, mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_shard)(split_frozen(params, frozen)[0])
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}

        train_iter = task.train_data(local_batch, seed=config.seed)
        if start is not None:
            abstract_state = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                state, state_shard)
            state = checkpointer.restore(start, abstract_state, train_iter)
            print(f"resumed from step {start} in {workdir}", flush=True)
        start = int(start or 0)

        # --- the step, compiled ahead of time ---
        schedule = optim.make_schedule(config.optim)
        step_fn = make_train_step(task.loss, graphdef, tx, schedule, seed=config.seed,
                                  accum_steps=config.get("grad_accum_steps", 1), frozen=frozen)
        b_shard = batch_sharding(mesh, rules)
        train_step = jax.jit(step_fn, in_shardings=(state_shard, replicated(mesh), b_shard),
                             out_shardings=(state_shard, replicated(mesh)),
                             donate_argnums=(0,))
        example = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((config.batch_size, *x.shape[1:]), x.dtype,
                                           sharding=b_shard),
            task.example_batch(local_batch))
        t0 = time.perf_counter()
        train_step = train_step.lower(state, rest, example).compile()
        compile_s = time.perf_counter() - t0
        flops = 0.0
        if config.get("measure_flops", True):
            def forward_loss(params, rest, batch):
                model = nnx.merge(graphdef, params, rest)
                model.eval()
                return task.loss(model, batch, jax.random.key(0))[0]
            flops = 3 * perf.compiled_flops(forward_loss, state["params"], rest, example)

        writer = MetricWriter(workdir, tensorboard=config.get("tensorboard", True),
                              wandb_project=config.get("wandb_project"),
                              config=config.to_dict())
        throughput = Throughput(batch_size=config.batch_size, flops_per_step=flops,
                                total_steps=total_steps, start_step=start)
        if jax.process_index() == 0:
            name = config.model.get("name") or f"{config.model.image} + {config.model.text}"
            print(f"{config.trainer}: {name}, "
                  f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, mesh "
                  f"{dict(mesh.shape)}, batch {config.batch_size}, steps {start}→{total_steps}, "
                  f"compiled in {compile_s:.1f}s, {flops / config.batch_size / 3e9:.2f} "
                  "forward GFLOPs/example", flush=True)

        evaluators = task.evaluators()
        final: dict[str, float] = {}
        profile = config.get("profile") or {}
        profile_start = profile.get("start_step", -1)
        profile_stop = profile_start + profile.get("num_steps", 0)
        log_every, eval_every = config.get("log_every", 50), config.get("eval_every", 0)
        save_every = config.checkpoint.get("every", 1000)

        def evaluate(step: int) -> dict[str, float]:
            results: dict[str, float] = {}
            for evaluator in evaluators:
                results.update(evaluator.run(graphdef, state["params"], rest, mesh))
            writer.write(step, results)
            if jax.process_index() == 0:
                print(f"eval @ {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                                                     if not k.endswith("/count")), flush=True)
            return results

        pending = None  # the previous step's metrics, checked after the next step is queued
        try:
            with _StopSignal() as stop:
                for step in range(start, total_steps):
                    if step == profile_start:
                        jax.profiler.start_trace(str(workdir / "profile"))
                    batch = host_batch_to_global(next(train_iter), mesh, rules)
                    state, metrics = train_step(state, rest, batch)
                    if pending is not None:
                        _check_finite(pending[1], pending[0], checkpointer)
                    pending = (step + 1, metrics)
                    done = step + 1
                    if done == profile_stop:
                        jax.block_until_ready(state)
                        jax.profiler.stop_trace()
                    if done % log_every == 0 or done == total_steps:
                        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        _check_finite(values, done, checkpointer)
                        values.update(throughput.measure(done))
                        if hasattr(train_iter, "metrics"):  # bad-data counts, for example
                            values.update(train_iter.metrics())
                        writer.write(done, values)
                        if jax.process_index() == 0:
                            print(progress_line(done, total_steps, values), flush=True)
                    eval_now = bool(evaluators) and (
                        (eval_every and done % eval_every == 0) or done == total_steps)
                    results = evaluate(done) if eval_now else None
                    if results:
                        final = results
                    stopping = stop.should_stop(done)
                    if done % save_every == 0 or done == total_steps or stopping:
                        _check_finite(jax.device_get(metrics), done, checkpointer)
                        checkpointer.save(done, state, train_iter, metrics=results)
                    if stopping:
                        print(f"stopping at step {done} after a termination signal; "
                              "checkpoint saved", flush=True)
                        break
            if not final and evaluators and start >= total_steps:
                final = evaluate(total_steps)  # a finished run, started again: report it
        finally:
            checkpointer.close()
            writer.close()
        final = {k: float(v) for k, v in final.items()}
        final["step"] = float(int(jax.device_get(state["step"])))
        return final


def final_params(workdir: str) -> dict[str, np.ndarray]:
    """The parameters of the latest checkpoint of a run, as NumPy (for tests and tools)."""
    checkpointer = Checkpointer(epath.Path(workdir) / "checkpoints", async_save=False)
    devices = jax.local_devices()[:1]
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    return jax.device_get(checkpointer.restore_params(None, sharding))
