"""Checkpoints with orbax: the train state and the data iterator's position, saved together.

One step directory holds
    state/   step, params, opt_state   (sharded arrays; every process writes its shards)
    data/    process_{i}-of-{n}.json   (each process's data iterator state; a run with another
                                        number of processes resumes from all of them)
    digest/  a checksum of every array of state/ (state_digest), checked after each restore
Saves are asynchronous; orbax writes into a temporary directory and renames it when every
item is complete, so a save cut off by a crash or SIGKILL is never listed or restored.
Retention keeps the last `keep` checkpoints plus the `keep_best` best by an eval metric.
On resume, a newest checkpoint that cannot be read (missing or cut files, arrays that fail their
checksum) is logged, moved to checkpoints/damaged/ and the one before it restored.
Restoring onto a different mesh works: arrays are restored into the shardings of the target.
The data-state handler lives in data_state.py, the damage checks and the two errors in
checkpoint_faults.py; the handler and the errors are re-exported here.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from crate_jax.models import layer_stack
from crate_jax.train.checkpoint_faults import (
    CheckpointDamagedError,
    CheckpointModelMismatchError,
    all_processes_ok,
    check_complete,
    fault_line,
    shape_differences,
)
from crate_jax.train.data_state import DataStateHandler, DataStateRestore, DataStateSave
from crate_jax.train.state_digest import compare_digests, first_non_finite, state_digest
from crate_jax.train.workdir import RunFailed, remove_partial_saves

if TYPE_CHECKING:  # the converters read checkpoints without the input pipeline's imports
    from crate_jax.data.pipeline import DataPosition

__all__ = [
    "CheckpointDamagedError",
    "CheckpointModelMismatchError",
    "Checkpointer",
    "DataStateHandler",
    "DataStateRestore",
    "DataStateSave",
]


def _int_keys(tree: Any) -> Any:
    """Digit-string dict keys back to ints: orbax restores the layer indices of
    nnx.to_pure_dict trees ('encoder/layers/0/...') as strings when no target gives them."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
            for k, v in tree.items()}


def _stacked_into(per_layer: Any, abstract: Any) -> Any:
    """A per-layer tree stacked into the layout and shardings of `abstract` (one jit, so
    every process builds only its own shards)."""
    shardings = jax.tree.map(lambda s: s.sharding, abstract)
    return jax.jit(layer_stack.stack_layers, out_shardings=shardings)(per_layer)


# orbax's replica-parallel save has each replica of a replicated array write one slice of it,
# cut on the devices by an eager slice (a program of its own per shape). For a small array the
# cutting costs more than the writing it shares out: 4 saves of 72 replicated float32 arrays of
# 0.25-384 KiB on 8 CPU devices took 2.9 CPU-s with the slicing, 0.67 without. So arrays whose
# slices would be under 1 MiB are written whole by one replica; larger ones are still split.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def use_array_handler(min_slice_bytes: int = MIN_REPLICA_SLICE_BYTES,
                      sharding_file: bool = False) -> None:
    """Registers orbax's jax.Array handler (process-wide, as orbax registers handlers):
    replica-parallel saving only for slices of at least `min_slice_bytes`, no sharding file
    unless `sharding_file` (orbax's default, for benchmarks), and orbax's other defaults.

    The sharding file (each array's saving mesh) is read only by a restore that names no
    target sharding; every restore here names one (a run resumes onto any mesh, a converter
    reads onto one device). Writing it cost a fifth of a save's CPU: 0.53 against 0.42
    CPU-s, ToST smoke state, 8 CPU devices (benchmarks/checkpoint_save_cpu.py)."""
    current = ocp.type_handlers.get_type_handler(jax.Array)
    now = [getattr(current, f"_{k}", None) for k in ("min_slice_bytes_for_replica_parallel",
                                                     "enable_write_sharding_file")]
    if now == [min_slice_bytes, sharding_file]:
        return
    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(current, "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=min_slice_bytes,
        enable_write_sharding_file=sharding_file)
    absl_logger = logging.getLogger("absl")  # orbax warns of every override; this one is meant
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


def _str_keys(tree: Any) -> Any:
    """The inverse of _int_keys: orbax names every saved key as a string."""
    if not isinstance(tree, dict):
        return tree
    return {str(k): _str_keys(v) for k, v in tree.items()}


class Checkpointer:
    """The run's checkpoints in `directory` (usually WORKDIR/checkpoints)."""

    def __init__(self, directory: str | epath.Path, *, keep: int = 2, keep_best: int = 1,
                 best_metric: str | None = None, best_mode: str = "max",
                 async_save: bool = True, remove_partial: bool = False):
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric and keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min",
                n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True,
            # the temporary folders of a save cut off by a crash or a full disk (the trainer's
            # checkpointer, once its start has passed every check: this writes)
            cleanup_tmp_directories=remove_partial)
        use_array_handler(MIN_REPLICA_SLICE_BYTES)
        self.best_metric = best_metric
        self._saving = -1  # the step of the latest save started (named if it fails)
        self.manager = ocp.CheckpointManager(
            epath.Path(directory), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler(),
                           "digest": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: DataPosition,
             metrics: dict[str, float] | None = None) -> None:
        """Start an (asynchronous) save; the arrays are copied before this returns, so the
        caller may donate them to the next step right away. A checksum of every array
        (state_digest) is saved alongside, and checked by `restore`."""
        if metrics is not None and self.best_metric not in metrics:
            metrics = None  # without the ranking metric it is kept as a "latest" only
        elif metrics is not None and not math.isfinite(float(metrics[self.best_metric])):
            # NaN compares false both ways, so BestN could rank it best; keep it as "latest"
            logging.warning("checkpoint %d: %s is %s, so it is saved without metrics and never "
                            "kept as a best checkpoint", step, self.best_metric,
                            metrics[self.best_metric])
            metrics = None
        self._saving = step
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataStateSave(data_iterator),
            digest=ocp.args.JsonSave(state_digest(state))),
            metrics=metrics, force=True)

    def save_or_fail(self, step: int, state: Any, data_iterator: DataPosition,
                     metrics: dict[str, float] | None = None) -> int:
        """save(), with a failure (a full disk: ENOSPC, here or from the previous
        asynchronous save) turned into RunFailed by `_failed`. Returns `step`."""
        try:  # the previous asynchronous save's failure is reported as that save's
            self.manager.wait_until_finished()
        except Exception as e:
            self._failed(self._saving, e)
        try:
            self.save(step, state, data_iterator, metrics=metrics)
        except Exception as e:
            self._failed(step, e)
        return step

    def _failed(self, step: int, error: BaseException) -> None:
        """Remove the partial save's temporary folders and raise one line naming the
        directory, the cause and the last complete checkpoint (the one a rerun resumes)."""
        directory = self.manager.directory
        remove_partial_saves(directory)
        good = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()
                      and (p / "state" / "_METADATA").exists()) if directory.exists() else []
        last = (f"the last good checkpoint is step {good[-1]}" if good else
                "no checkpoint was completed")
        raise RunFailed(
            f"saving the checkpoint of step {step} in {directory} failed "
            f"({fault_line(directory, error)}); {last}. Free space (or fix the cause) and "
            "rerun the same command to resume.") from error

    def restore(self, step: int, abstract_state: Any,
                data_iterator: DataPosition | None) -> Any:
        """Restore step `step` into the shardings of `abstract_state` (a tree of
        jax.ShapeDtypeStruct with .sharding) and check it against the checksum saved with it;
        then the data iterator is repositioned in place. If anything fails, the iterator is
        put back where it was and the error is raised."""
        step_dir = self.manager.directory / str(step)
        check_complete(step_dir)
        target = abstract_state
        per_layer = self._per_layer(step) and not layer_stack.has_per_layer(abstract_state)
        if per_layer:  # written before the layers were stacked: read as written, then stack
            target = layer_stack.unstack_layers(abstract_state)
        items = dict(state=ocp.args.StandardRestore(target))
        has_digest = (step_dir / "digest").exists()  # checkpoints written before it have none
        if has_digest:
            items["digest"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if has_digest:
            problem = compare_digests(restored["digest"], state_digest(restored["state"]))
            if problem:
                raise CheckpointDamagedError(f"{step_dir}: {problem}")
        bad = first_non_finite(restored["state"])
        if bad:  # never saved by the trainer (it checks first): written by another program
            raise CheckpointDamagedError(f"{step_dir}: {bad} holds a non-finite value")
        state = (_stacked_into(restored["state"], abstract_state) if per_layer
                 else restored["state"])
        if data_iterator is not None:
            before = data_iterator.get_state()
            try:
                self.manager.restore(step, args=ocp.args.Composite(
                    data=DataStateRestore(data_iterator)))
            except BaseException:
                data_iterator.set_state(before)  # a failed restore must not move the iterator
                raise
        logging.info("restored checkpoint at step %d", step)
        return state

    def restore_latest(self, abstract_state: Any,
                       data_iterator: DataPosition | None) -> tuple[int | None, Any]:
        """(step, state) of the newest checkpoint that restores and passes its checksum, or
        (None, None) when there is no checkpoint. An unreadable newer checkpoint is logged
        (which step directory, what is wrong) and moved to checkpoints/damaged/, never
        deleted. If checkpoints exist but none can be read, raises CheckpointDamagedError
        listing them and moves nothing. The trainer calls check_same_model before this (and
        before it writes anything), so checkpoints of another model are named as such."""
        self.manager.reload()
        faults: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.manager.directory / str(step)
            try:
                state = self.restore(step, abstract_state, data_iterator)
                error = None
            except Exception as e:  # any failure to read it makes it unusable; say which
                state, error = None, fault_line(step_dir, e)
            if all_processes_ok(error is None):
                for bad, _ in faults:
                    self._move_aside(bad)
                return step, state
            error = error or "another process could not read it"
            logging.warning("checkpoint %s cannot be restored (%s); trying the one before it",
                            step_dir, error)
            faults.append((step, error))
        if faults:
            raise self._none_restorable(faults)
        return None, None

    def _none_restorable(self, faults: list[tuple[int, str]]) -> CheckpointDamagedError:
        listing = "\n".join(f"  {self.manager.directory / str(s)}: {e}" for s, e in faults)
        return CheckpointDamagedError(
            f"none of the {len(faults)} checkpoints in {self.manager.directory} can be "
            f"restored; they were left in place:\n{listing}\nIf the config changed, use the "
            "original one; to start over, move the checkpoints directory away.")

    def check_any_complete(self) -> None:
        """Raise CheckpointDamagedError (as restore_latest would, but before anything is
        compiled or written) when checkpoints exist and none of them is even complete (empty
        step folders, no state/_METADATA: a cut copy); reads no array."""
        faults = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.manager.directory / str(step)
            try:
                check_complete(step_dir)
                return
            except CheckpointDamagedError as e:
                faults.append((step, fault_line(step_dir, e)))
        if faults:
            raise self._none_restorable(faults)

    def check_same_model(self, abstract_state: Any) -> None:
        """Raise CheckpointModelMismatchError, before any array is read, when the newest
        checkpoint's parameter names or shapes (from its metadata) are not the config's."""
        step = self.latest_step()
        wanted = abstract_state.get("params") if isinstance(abstract_state, Mapping) else None
        if step is None or wanted is None:
            return
        try:
            _, saved = self.saved_params(step)
        except Exception:  # no readable metadata: restore_latest reports the damage
            return
        differences = shape_differences(saved, _int_keys(dict(wanted)))
        if differences:
            listing = "\n".join(f"  {d}" for d in differences)
            raise CheckpointModelMismatchError(
                f"{self.manager.directory / str(step)} was written by another model than "
                f"this config builds:\n{listing}\nResume with the config it was trained "
                "with, or move the checkpoints directory away to start over; nothing was "
                "changed.")

    def _move_aside(self, step: int) -> None:
        """Move an unreadable step to checkpoints/damaged/<step>-<time>, out of orbax's sight
        (it is no longer listed, and a new save of the same step does not collide)."""
        source = self.manager.directory / str(step)
        target = (self.manager.directory / "damaged"
                  / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            logging.warning("moved the unreadable checkpoint %s to %s", source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self.manager.reload()

    def saved_params(self, step: int | None) -> tuple[int, dict]:
        """(step, the shapes and dtypes of that checkpoint's parameters) from its metadata,
        as a nested dict of jax.ShapeDtypeStruct in the stacked layout of the models (whichever
        layout it was written in); no array is read. None: the latest step."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        return step, layer_stack.stack_layers(self._saved_shapes(step))

    def _saved_shapes(self, step: int) -> dict:
        """The saved parameters' shapes as written (per-layer in checkpoints from before the
        layers were stacked)."""
        saved = self.manager.item_metadata(step)["state"]
        if "params" not in saved:
            raise ValueError(f"checkpoint {self.manager.directory}/{step} holds no 'params'")
        shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                              dict(saved["params"]))
        return _int_keys(shapes)

    def _per_layer(self, step: int) -> bool:
        try:
            return layer_stack.has_per_layer(self._saved_shapes(step))
        except (ValueError, KeyError, TypeError):
            return False  # no readable metadata: the restore itself reports what is wrong

    def restore_param_subset(self, step: int, target: Any) -> Any:
        """The parameter leaves named in `target` (a nested dict of jax.ShapeDtypeStruct with
        .sharding, any subset of the saved parameters), read straight into those shardings:
        every process reads only its own shards, and the rest of the state (optimizer
        moments, other parameters) is not read at all (orbax partial restore). A checkpoint
        written per layer is read per layer and stacked into `target`'s layout."""
        wanted = target
        per_layer = self._per_layer(step) and not layer_stack.has_per_layer(target)
        if per_layer:
            target = layer_stack.unstack_layers(target)
        restored = self._partial_restore(step, {"params": _str_keys(target)})
        params = _int_keys(restored["params"])
        return _stacked_into(params, wanted) if per_layer else params

    def restore_params(self, step: int | None, sharding: jax.sharding.Sharding) -> Any:
        """The parameters of a checkpoint with their saved shapes, placed with `sharding`
        (tools and tests; finetuning places each leaf with restore_param_subset)."""
        step, saved = self.saved_params(step)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                             sharding=sharding), saved)
        return self.restore_param_subset(step, target)

    def restore_batch_stats(self, step: int | None,
                            sharding: jax.sharding.Sharding) -> dict:
        """The BatchNorm running statistics ('batch_stats', models with BatchNorm such as
        ToST) of a checkpoint, placed with `sharding`; {} when it holds none."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        saved = self.manager.item_metadata(step)["state"]
        if "batch_stats" not in saved:
            return {}
        item = {"batch_stats": jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
            dict(saved["batch_stats"]))}
        return self._partial_restore(step, item)["batch_stats"]

    def _partial_restore(self, step: int, item: dict) -> dict:
        """The items of step's state named by `item` (a tree of ShapeDtypeStructs with their
        shardings); nothing else of the checkpoint is read (orbax partial restore)."""
        restore_args = jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                           dtype=s.dtype), item)
        path = ocp.step.find_step_path(self.manager.directory, ocp.step.standard_name_format(),
                                       step=step) / "state"
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                              partial_restore=True))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the last (asynchronous) save; its failure raises RunFailed (`_failed`)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self.manager.close()
            self._failed(self._saving, e)
        self.manager.close()
