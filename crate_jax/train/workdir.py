"""The workdir's files on a shared cluster: checked before a run writes anything, written
atomically, and a save that fails (a full disk) ends the run with one line.

    check_writable(workdir)       a workdir that is a file, or one that cannot be created or
                                  written, is refused before compiling (local paths; an object
                                  store reports its own errors at the first write)
    atomic_write_text(path, text) a temporary name in the same folder, then a rename: a failed
                                  write (ENOSPC) leaves the previous file or none, never a cut
                                  one. An object-store upload replaces the object whole anyway.
    read_json(path)               a damaged JSON file is named, not "Expecting value: line 1"
    remove_partial_saves(dir)     the temporary folders of a save that failed
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

from etils import epath


class RunFailed(RuntimeError):
    """A run that stopped on a fault outside the program (a full disk, another trainer in
    the workdir): the message names the path and what to do, in one line."""


def _is_remote(path: str | epath.Path) -> bool:
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute (orbax takes absolute paths only; a relative one, such as
    the default runs/<config>, is from the cwd); gs:// and the like as given."""
    path = str(path)
    return path if _is_remote(path) else os.path.abspath(path)


def check_writable(workdir: str | epath.Path) -> None:
    """Raise ValueError naming `workdir` when it is a file, lies below a file, or cannot be
    written (a file created and removed in the nearest folder that exists; nothing stays)."""
    if _is_remote(workdir):
        return
    path = os.path.abspath(str(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--workdir {path} is a file, not a directory; name a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--workdir {path}: {existing} is a file, so the directory cannot be "
                         "created there")
    try:  # a probe, not os.access: root passes that everywhere, read-only mounts included
        fd, probe = tempfile.mkstemp(prefix=".crate_jax_write_test_", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--workdir {path} cannot be written: creating a file in {existing} "
                         f"failed ({e.strerror}); name a writable directory") from e


def atomic_write_text(path: str | epath.Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the new one, never a
    partial one; on failure the temporary file is removed and the OSError (naming `path`)
    raised."""
    if _is_remote(path):
        epath.Path(path).write_text(text)  # an object upload is atomic
        return
    path = str(path)
    temporary = os.path.join(os.path.dirname(path) or ".",
                             f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}", path) from e


def read_json(path: epath.Path) -> Any:
    """The JSON in `path`; a cut or empty file raises ValueError naming it."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "is empty" if not text.strip() else f"is not valid JSON ({e})"
        raise ValueError(f"{path} {what}: a write was cut off (a full disk?). Move it away "
                         "to start from the command's config.") from e


def remove_partial_saves(directory: epath.Path) -> list[str]:
    """Delete orbax's temporary step folders (<step>.orbax-checkpoint-tmp-*) in `directory`,
    left by a save that failed half-way; returns their names."""
    if not directory.exists():
        return []
    removed = []
    for path in directory.iterdir():
        if ".orbax-checkpoint-tmp" in path.name:
            if _is_remote(path):
                path.rmtree()
            else:
                shutil.rmtree(str(path), ignore_errors=True)
            removed.append(path.name)
    return removed
