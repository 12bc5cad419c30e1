"""What is wrong with a checkpoint: the errors a restore raises (damaged files, another
model's parameters), the completeness check that reads no array, the one-line summary of a
failure, and the agreement of every process on whether a step restored.
Used by crate_jax.train.checkpoint (which re-exports the two errors).
"""

from __future__ import annotations

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from crate_jax.models import layer_stack


class CheckpointDamagedError(RuntimeError):
    """A checkpoint that cannot be restored as saved (missing or damaged files, or arrays that
    do not match their checksum)."""


class CheckpointModelMismatchError(ValueError):
    """A checkpoint whose parameters (names or shapes) are not the ones the config builds:
    written by another model, not damaged."""


def shape_differences(saved: dict, wanted: dict, limit: int = 3) -> list[str]:
    """'params/<path>: saved …, this config …' for the first `limit` leaves whose presence
    or shape differ between two nested dicts of shapes (dtypes are cast on restore)."""
    have, want = layer_stack.flatten(saved), layer_stack.flatten(wanted)
    out = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        a_shape = None if a is None else tuple(a.shape)
        b_shape = None if b is None else tuple(b.shape)
        if a_shape != b_shape:
            out.append(f"params/{key}: saved {a_shape or 'absent'}, this config "
                       f"{b_shape or 'absent'}")
    return out[:limit] + ([f"… {len(out) - limit} more"] if len(out) > limit else [])


def check_complete(step_dir: epath.Path) -> None:
    """Raise CheckpointDamagedError naming the first missing part orbax would trip over
    (a missing state/_METADATA restores with a target, but the checkpoint is incomplete)."""
    if not step_dir.exists():
        problem = "the step directory is gone"
    elif not any(step_dir.iterdir()):
        problem = "the step directory is empty"
    elif not (step_dir / "state").exists():
        problem = "state/ is missing"
    elif not (step_dir / "state" / "_METADATA").exists():
        problem = "state/_METADATA is missing"
    else:
        return
    raise CheckpointDamagedError(f"{step_dir}: {problem}")


def fault_line(step_dir: epath.Path, error: BaseException) -> str:
    """What is wrong, in one line: the innermost cause (tensorstore's message names the file
    and the byte range; orbax's wrapper only prints the array spec)."""
    if isinstance(error, CheckpointDamagedError):
        return str(error).removeprefix(f"{step_dir}: ")
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:400] if lines else ''}"


def all_processes_ok(ok: bool) -> bool:
    """True only if every process says ok, so all processes restore the same step."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
