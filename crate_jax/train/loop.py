"""The training loop every task runs on, top to bottom.

    checks: config values, task, mesh, batch divisibility, the model (abstractly), the data
            sources, the saved config of a run to resume; all before anything is written
    init params into their shardings (one jit, nothing gathered); compile the step once
    workdir: config.json, checkpoints, metrics (only now is anything written)
    finetune: load another run's parameters and adapt them (new head, resized posemb / stem)
    resume: the newest readable checkpoint in WORKDIR/checkpoints (state + data position)
    loop: host batch → global array → jitted step (donated state) → log / eval / save
    SIGTERM at any moment: save what can be saved, then return cleanly
    a non-finite loss or state: stop with the step and the parameter; nothing non-finite is
    ever saved, so the last checkpoint stays good
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from crate_jax import config_check
from crate_jax.models import layer_stack
from crate_jax.models.state import with_batch_stats
from crate_jax.parallel import (
    DEFAULT_RULES,
    format_undivided,
    host_batch_to_global,
    make_mesh,
    maybe_initialize_distributed,
)
from crate_jax.parallel.sharding import data_parallel_size
from crate_jax.perf import StepFlops, planned_peak_bytes
from crate_jax.train import logfile, signals
from crate_jax.train import workdir as workdir_files
from crate_jax.train.checkpoint import Checkpointer
from crate_jax.train.finetune import check_init_from, finetune_params, load_towers
from crate_jax.train.lock import WorkdirLock
from crate_jax.train.metrics import MetricWriter, Throughput, progress_line
from crate_jax.train.run_config import (  # noqa: F401 (RESUME_SAFE_KEYS: part of this API)
    RESUME_SAFE_KEYS,
    check_workdir_config,
    save_workdir_config,
)
from crate_jax.train.state import TrainState, build_train_state
from crate_jax.train.step import group_counts


def _check_batch(config, mesh, rules) -> int:
    """The per-process batch size, after checking that everything divides it."""
    batch, dp = config.batch_size, data_parallel_size(mesh, rules)
    accum = config.get("grad_accum_steps", 1)
    for divisor, what in ((dp, f"the {dp} data-parallel devices (mesh dcn × data × fsdp)"),
                          (jax.process_count(), f"the {jax.process_count()} processes"),
                          (accum * dp, f"grad_accum_steps={accum} × {dp} devices")):
        if batch % divisor:
            raise ValueError(f"batch_size={batch} is not divisible by {what}")
    return batch // jax.process_count()


class _StopSignal:
    """Whether to stop now: a SIGTERM seen by crate_jax.train.signals (one process), or, with
    several processes, jax.distributed's preemption sync point, which every process reaches
    at the same step."""

    def __init__(self):
        self._local = jax.process_count() == 1
        if self._local and not signals.installed():
            signals.install()  # train_and_evaluate called from Python rather than main

    def should_stop(self, step: int) -> bool:
        if self._local:
            return signals.received()
        from jax.experimental import multihost_utils
        with contextlib.suppress(Exception):  # no preemption service: only SIGTERM counts
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return False


def _first_non_finite(tree: Any) -> str | None:
    """The path of the first leaf of `tree` holding a NaN or an infinity, or None; for a
    stacked layer parameter also the first layer that holds one."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        finite = jnp.isfinite(leaf)
        if bool(finite.all()):
            continue
        names = [getattr(k, "key", getattr(k, "idx", k)) for k in path]
        where = "/".join(map(str, names))
        if layer_stack.is_stacked_path(names) and leaf.ndim:
            layer = int(jnp.argmin(finite.reshape(leaf.shape[0], -1).all(axis=1)))
            where += f" (layer {layer})"
        return where
    return None


def _check_finite(metrics: dict, step: int, state: dict, last_saved: int | None) -> None:
    """Stop at a non-finite loss or a non-finite new state (params, optimizer moments), naming
    the step, the first bad parameter and the last good checkpoint."""
    values = jax.device_get({k: metrics[k] for k in ("train/loss", "train/state_finite")
                             if k in metrics})
    loss, finite = float(values["train/loss"]), bool(values.get("train/state_finite", True))
    if math.isfinite(loss) and finite:
        return
    where = _first_non_finite(state["params"])
    where = (f"parameter {where}" if where else
             f"optimizer state {_first_non_finite(state['opt_state']) or '(none found)'}")
    if last_saved is not None:
        advice = (f"The last good checkpoint is step {last_saved}; it holds no non-finite "
                  "value. To resume from it with a lower optim.lr or a higher optim.eps, rerun "
                  "the command with the new values and --config.resume_overrides=optim.lr,"
                  "optim.eps (or check the data and rerun it unchanged).")
    else:
        advice = ("No checkpoint was saved before it, so the workdir takes a changed config: "
                  "rerun the command with a lower optim.lr or a higher optim.eps (or check "
                  "the data).")
    raise FloatingPointError(
        f"non-finite {'loss ' + str(loss) if not math.isfinite(loss) else 'state'} at step "
        f"{step} (first non-finite: {where}); stopping. {advice}")


@dataclasses.dataclass
class _Run:
    """Everything the loop needs, built before the first step."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    state: TrainState  # the abstract state, its shardings, the optimizer and the step
    local_batch: int
    resolved: dict
    stop: _StopSignal
    rest: Any = None
    train_step: Any = None
    train_iter: Any = None
    evaluators: list = dataclasses.field(default_factory=list)
    checkpointer: Checkpointer | None = None
    writer: MetricWriter | None = None
    lock: WorkdirLock | None = None

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.state.mesh


def _setup(config: ml_collections.ConfigDict, workdir: epath.Path) -> _Run:
    """Every check that needs no parameters: values, task, mesh, batch, the model's shapes,
    the saved config of a run to resume. Nothing is written."""
    config_check.validate(config)
    workdir_files.check_writable(workdir)
    if jax.process_index() == 0:  # another trainer in this workdir: refused, named (process
        WorkdirLock(str(workdir)).check()  # 0 only: the others would see their own run's lock)
    mesh = make_mesh(config.get("mesh", {"fsdp": -1}))
    rules = {**DEFAULT_RULES, **dict(config.get("sharding_rules") or {})}
    local_batch = _check_batch(config, mesh, rules)
    state = build_train_state(config, mesh)
    if state.undivided and jax.process_index() == 0:
        logging.warning("%s", format_undivided(state.undivided))
    resolved = check_workdir_config(config, workdir)
    if (workdir / "checkpoints").exists():  # a resume: the checkpoints hold this model?
        checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
        try:
            checkpointer.check_any_complete()
            checkpointer.check_same_model(state.abstract_state)
        finally:
            checkpointer.close()
    elif config.get("init_from"):
        check_init_from(config, state.abstract_state["params"])  # a fresh start only
    return _Run(config, workdir, state, local_batch, resolved, _StopSignal())


def _initial_state(run: _Run, params: dict) -> tuple[dict, int]:
    """The state to start from: the newest readable checkpoint, or fresh (finetuned or
    tower-loaded) parameters with a new optimizer state."""
    config, built = run.config, run.state
    fresh = run.checkpointer.latest_step() is None
    if config.get("init_from") and fresh:
        params = finetune_params(config, params, built.param_shardings, run.mesh)
    if config.get("init_towers") and fresh:
        params = load_towers(config.init_towers, params, built.param_shardings)
    loaded = config.get("init_from") or config.get("init_towers")
    frozen = tuple(config.get("freeze") or ())
    if frozen and not loaded and fresh:
        logging.warning("freeze: %s stay at their random initialisation (no init_towers or "
                        "init_from loads them)", ", ".join(frozen))
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": built.init_opt_state(params), **built.initial_batch_stats(run.rest)}
    start, restored = run.checkpointer.restore_latest(built.abstract_state, run.train_iter)
    if start is None:
        return state, 0
    print(f"resumed from step {start} in {run.workdir}", flush=True)
    return restored, int(start)


def _evaluate(run: _Run, state: dict, step: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for evaluator in run.evaluators:
        rest = with_batch_stats(run.rest, state.get("batch_stats"))  # BatchNorm's, if any
        results.update(evaluator.run(run.state.graphdef, state["params"], rest, run.mesh))
    run.writer.write(step, results)
    if jax.process_index() == 0:
        print(f"eval @ {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                                             if not k.endswith("/count")), flush=True)
    return results


def _train(run: _Run, state: dict, start: int, throughput: Throughput
           ) -> tuple[dict, dict[str, float]]:
    """Steps start → total_steps with logging, evaluation and checkpoints; returns the final
    state and the last evaluation's metrics."""
    config = run.config
    total = config.total_steps
    log_every, eval_every = config.get("log_every", 50), config.get("eval_every", 0)
    save_every = config.checkpoint.get("every", 1000)
    profile = config.get("profile") or {}
    profile_start = profile.get("start_step", -1)
    profile_stop = profile_start + profile.get("num_steps", 0)
    final: dict[str, float] = {}
    last_saved = run.checkpointer.latest_step()
    pending = None  # the previous step's metrics, checked after the next step is queued
    for step in range(start, total):
        if step == profile_start:
            jax.profiler.start_trace(str(run.workdir / "profile"))
        batch = host_batch_to_global(next(run.train_iter), run.mesh, run.state.rules)
        state, metrics = run.train_step(state, run.rest, batch)
        if pending is not None:
            _check_finite(pending[1], pending[0], state, last_saved)
        done, pending = step + 1, (step + 1, metrics)
        if done == profile_stop:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        if done % log_every == 0 or done == total:
            _check_finite(metrics, done, state, last_saved)
            values = {k: float(v) for k, v in jax.device_get(metrics).items()
                      if k != "train/state_finite"}
            values.update(throughput.measure(done))
            if hasattr(run.train_iter, "metrics"):  # bad-data counts, for example
                values.update(run.train_iter.metrics())
            run.writer.write(done, values)
            if jax.process_index() == 0:
                print(progress_line(done, total, values), flush=True)
        results = None
        if run.evaluators and ((eval_every and done % eval_every == 0) or done == total):
            results = final = _evaluate(run, state, done)
        stopping = run.stop.should_stop(done)
        if done % save_every == 0 or done == total or stopping:
            _check_finite(metrics, done, state, last_saved)
            last_saved = run.checkpointer.save_or_fail(done, state, run.train_iter, results)
        if stopping:
            print(f"stopping at step {done} after a termination signal; checkpoint saved",
                  flush=True)
            break
    return state, final


def _header(run: _Run, params: dict, start: int, compile_s: float,
            flops: StepFlops | None, memory: int | None) -> None:
    if jax.process_index() != 0:
        return
    config = run.config
    name = config.model.get("name") or f"{config.model.image} + {config.model.text}"
    gflops = (f", per example and step {flops.model / config.batch_size / 1e9:.3g} model "
              f"GFLOPs, {flops.hardware / config.batch_size / 1e9:.3g} hardware GFLOPs"
              if flops else "")
    print(f"{config.trainer}: {name}, {sum(x.size for x in jax.tree.leaves(params)):,} "
          f"parameters, mesh {dict(run.mesh.shape)}, batch {config.batch_size}, steps "
          f"{start}→{config.total_steps}, compiled in {compile_s:.1f}s{gflops}"
          + ("" if memory is None else f", step memory {memory / 2**20:,.1f} MiB per device "
             "(XLA's plan)"), flush=True)
    if run.state.frozen:
        print("trainable parameters by group: " + group_counts(params, run.state.frozen),
              flush=True)


def _open_outputs(run: _Run) -> None:
    """Create the workdir: config.json, the log file, the checkpointer, the metric writers."""
    config, workdir = run.config, run.workdir
    if jax.process_index() == 0:  # one trainer per workdir, for as long as this one runs
        run.lock = WorkdirLock(str(workdir))
        run.lock.acquire()
    save_workdir_config(run.resolved, workdir)
    logfile.attach(str(workdir), jax.process_index())
    for evaluator in run.evaluators:  # figures go next to the checkpoints
        evaluator.output_dir = str(workdir)
    run.checkpointer = Checkpointer(
        workdir / "checkpoints", keep=config.checkpoint.get("keep", 2),
        keep_best=config.checkpoint.get("keep_best", 1),
        best_metric=config.checkpoint.get("best_metric"),
        best_mode=config.checkpoint.get("best_mode", "max"),
        async_save=config.checkpoint.get("async_save", True), remove_partial=True)
    run.writer = MetricWriter(workdir, tensorboard=config.get("tensorboard", True),
                              wandb_project=config.get("wandb_project"), config=config.to_dict())


def _close_outputs(run: _Run) -> None:
    """Finish the last save, close the metric writers, then release the lock (whatever of
    them _open_outputs got to open)."""
    try:
        if run.checkpointer is not None:
            run.checkpointer.close()
        if run.writer is not None:
            run.writer.close()
    finally:
        if run.lock is not None:
            run.lock.release()


def _run_from(run: _Run, params: dict, compile_s: float, flops: StepFlops | None
              ) -> tuple[dict, dict[str, float]]:
    """Resume or start, then train to total_steps; (final state, last evaluation)."""
    config = run.config
    state, start = _initial_state(run, params)
    memory = planned_peak_bytes(run.train_step)
    _header(run, params, start, compile_s, flops, memory)
    if run.stop.should_stop(start):
        print(f"stopping at startup after a termination signal; nothing new to save "
              f"(the same command resumes from step {start})", flush=True)
        return state, {}
    throughput = Throughput(batch_size=config.batch_size, flops=flops,
                            total_steps=config.total_steps, start_step=start,
                            memory_bytes=memory)
    state, final = _train(run, state, start, throughput)
    if not final and run.evaluators and start >= config.total_steps:
        final = _evaluate(run, state, start)  # a finished run, started again
    return state, final


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (or resume) the task in `config` in `workdir`; returns the final metrics.

    Every check (config, mesh, batch, model, data sources, a saved config to resume) and the
    compile happen before the workdir is written, so a failed start leaves it as it was."""
    maybe_initialize_distributed()
    workdir = epath.Path(workdir_files.absolute(workdir))
    run = _setup(config, workdir)
    with jax.set_mesh(run.mesh):
        params, run.rest = run.state.init_params()
        run.train_iter = run.state.task.train_data(run.local_batch, seed=config.seed)
        try:  # the data's worker threads and processes end with the run, however it ends
            run.evaluators = run.state.task.evaluators()
            run.train_step, compile_s, flops = run.state.compile(
                config.get("measure_flops", True))
            if jax.process_count() == 1 and signals.received():  # during checks or compile
                print("stopping at startup after a termination signal; nothing was written",
                      flush=True)
                return {}
            # --- nothing was written before this point ---
            try:
                _open_outputs(run)
                state, final = _run_from(run, params, compile_s, flops)
            finally:
                _close_outputs(run)
        finally:
            if hasattr(run.train_iter, "close"):
                run.train_iter.close()
        final = {k: float(v) for k, v in final.items()}
        final["step"] = float(int(jax.device_get(state["step"])))
        return final


def final_params(workdir: str) -> dict[str, np.ndarray]:
    """The parameters of the latest checkpoint of a run, as NumPy (for tests and tools)."""
    checkpointer = Checkpointer(epath.Path(workdir_files.absolute(workdir)) / "checkpoints",
                                async_save=False)
    devices = jax.local_devices()[:1]
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    return jax.device_get(checkpointer.restore_params(None, sharding))
