"""Checkpoints with orbax: the train state and the data iterator's position, saved together.

One step directory holds
    state/   step, params, opt_state   (sharded arrays; every process writes its shards)
    data/    process_{i}-of-{n}.json   (each process's data iterator state)
Saves are asynchronous; orbax writes into a temporary directory and renames it when every
item is complete, so a save cut off by a crash or SIGKILL is never listed or restored.
Retention keeps the last `keep` checkpoints plus the `keep_best` best by an eval metric.
Restoring onto a different mesh works: arrays are restored into the shardings of the target.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from crate_jax.parallel.mesh import process_files_suffix


class DataStateHandler(ocp.CheckpointHandler):
    """Saves `iterator.get_state()` (a JSON-able dict) per process, and restores it with
    `iterator.set_state(...)`. Works for any iterator with those two methods."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        state = args.iterator.get_state()
        (directory / f"process_{process_files_suffix()}.json").write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: DataStateRestore) -> Any:
        path = directory / f"process_{process_files_suffix()}.json"
        if not path.exists():
            raise FileNotFoundError(
                f"checkpoint {directory.parent} has no data state for this process ({path.name}); "
                "it was written by a run with a different number of processes")
        args.iterator.set_state(json.loads(path.read_text()))
        return args.iterator

    def structure(self, directory: epath.Path) -> None:
        return None

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    iterator: Any


def _int_keys(tree: Any) -> Any:
    """Digit-string dict keys back to ints: orbax restores the layer indices of
    nnx.to_pure_dict trees ('encoder/layers/0/...') as strings when no target gives them."""
    if not isinstance(tree, dict):
        return tree
    return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
            for k, v in tree.items()}


class Checkpointer:
    """The run's checkpoints in `directory` (usually WORKDIR/checkpoints)."""

    def __init__(self, directory: str | epath.Path, *, keep: int = 2, keep_best: int = 1,
                 best_metric: str | None = None, best_mode: str = "max",
                 async_save: bool = True):
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric and keep_best:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min",
                n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True)
        self.best_metric = best_metric
        self.manager = ocp.CheckpointManager(
            epath.Path(directory), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataStateHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any,
             metrics: dict[str, float] | None = None) -> None:
        """Start an (asynchronous) save; the arrays are copied before this returns, so the
        caller may donate them to the next step right away."""
        if metrics is not None and self.best_metric not in metrics:
            metrics = None  # without the ranking metric it is kept as a "latest" only
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataStateSave(data_iterator)),
            metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restore step `step` into the shardings of `abstract_state` (a tree of
        jax.ShapeDtypeStruct with .sharding); the data iterator is repositioned in place."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            items["data"] = DataStateRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("restored checkpoint at step %d", step)
        return restored["state"]

    def restore_params(self, step: int | None, sharding: jax.sharding.Sharding) -> Any:
        """The parameters of a checkpoint with their saved shapes, placed with `sharding`
        (for finetuning from it, where shapes may then be adapted)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        saved = self.manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                              dict(saved))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        return _int_keys(restored["state"]["params"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
