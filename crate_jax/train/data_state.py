"""The data iterator's position in a checkpoint: an orbax handler that saves each process's
`iterator.get_state()` as data/process_{i}-of-{n}.json and restores it, elastically when the
checkpoint was written by another number of processes. Used by crate_jax.train.checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from crate_jax.parallel.mesh import process_files_suffix

if TYPE_CHECKING:
    from crate_jax.data.pipeline import DataPosition

_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _saved_states(directory: epath.Path) -> dict[int, dict[int, epath.Path]]:
    """The data-state files in `directory`: {process count: {process index: path}}."""
    found: dict[int, dict[int, epath.Path]] = {}
    for path in directory.glob("process_*.json"):
        match = _STATE_FILE.fullmatch(path.name)
        if match:
            found.setdefault(int(match[2]), {})[int(match[1])] = path
    return found


class DataStateHandler(ocp.CheckpointHandler):
    """Saves `iterator.get_state()` (a JSON-able dict) per process, and restores it with
    `iterator.set_state(...)`. Works for any iterator with those two methods.

    Elastic resume: when the checkpoint was written by another number of processes, every
    saved state (process order) goes to `iterator.set_states([...])`, which the grain and
    webdataset iterators implement."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        state = args.iterator.get_state()
        (directory / f"process_{process_files_suffix()}.json").write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: DataStateRestore) -> Any:
        path = directory / f"process_{process_files_suffix()}.json"
        if path.exists():
            args.iterator.set_state(json.loads(path.read_text()))
            return args.iterator
        found = _saved_states(directory)
        names = sorted(p.name for files in found.values() for p in files.values())
        complete = [n for n, files in found.items() if sorted(files) == list(range(n))]
        count = jax.process_count()
        if len(complete) != 1 or count in found:
            raise FileNotFoundError(
                f"checkpoint {directory.parent}: no data state for this process: expected "
                f"{path.name} in {directory}, found {names or 'no process_*.json files'}")
        saved = complete[0]
        if not hasattr(args.iterator, "set_states"):
            raise ValueError(
                f"checkpoint {directory.parent} was written by {saved} processes, this run has "
                f"{count}, and its data iterator ({type(args.iterator).__name__}) has no "
                "set_states() to resume with a different process count")
        logging.info("data state of %d processes, resumed by %d (elastic)", saved, count)
        args.iterator.set_states([json.loads(found[saved][i].read_text())
                                  for i in range(saved)])
        return args.iterator

    def structure(self, directory: epath.Path) -> None:
        return None

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    iterator: DataPosition


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    iterator: DataPosition
