"""Library INFO logging (orbax, absl, jax, ours) to a file, not the terminal.

The file lives in WORKDIR/logs/train_<process>.log, but the workdir must stay untouched until a
start has passed every check (crate_jax/train/loop.py). So the handler holds records in memory
until the loop calls `attach(workdir)` right after writing config.json; a start that fails
earlier leaves its records in a temporary file instead (`spill()`), whose path the command line
prints. A gs:// workdir keeps its log in a local temporary folder (object stores cannot append).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _QuietFileHandler(logging.FileHandler):
    """A log file that, when a write fails (a full disk), says so once on stderr and stops
    writing, instead of a "--- Logging error ---" traceback for every later record."""

    failed = False

    def handleError(self, record: logging.LogRecord | None) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(f"warning: the log file {self.baseFilename} can no longer be written "
                  f"({error}); logging to it stops", file=sys.stderr, flush=True)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # what is still buffered cannot be written either
            self.handleError(None)


class DeferredFileHandler(logging.Handler):
    """Buffers records until a file is attached, then writes them all and every later one."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(_FORMAT))
        self._buffer: list[logging.LogRecord] = []
        self._file: _QuietFileHandler | None = None
        self.path: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.emit(record)
        elif len(self._buffer) < 100_000:
            self._buffer.append(record)

    def open(self, path: str) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file = _QuietFileHandler(path)
        self._file.setFormatter(self.formatter)
        self.path = path
        for record in self._buffer:
            self._file.emit(record)
        self._buffer.clear()
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


_handler: DeferredFileHandler | None = None


def install() -> DeferredFileHandler:
    """Route INFO records of every logger to the deferred file (the terminal handlers keep
    their own levels)."""
    global _handler
    if _handler is None:
        _handler = DeferredFileHandler()
        root = logging.getLogger()
        root.addHandler(_handler)
        root.setLevel(logging.INFO)
    return _handler


def local_log_path(workdir: str, process_index: int) -> str:
    local = workdir if "://" not in workdir else os.path.join(
        tempfile.gettempdir(), "crate_jax_logs", workdir.split("://", 1)[1].strip("/"))
    return os.path.join(local, "logs", f"train_{process_index}.log")


def attach(workdir: str, process_index: int) -> str | None:
    """Start writing the log file of this run (called once the workdir may be written)."""
    if _handler is None or _handler.path is not None:
        return None if _handler is None else _handler.path
    return _handler.open(local_log_path(str(workdir), process_index))


def spill() -> str | None:
    """A failed start: write what was logged to a temporary file and return its path."""
    if _handler is None or _handler.path is not None:
        return None if _handler is None else _handler.path
    fd, path = tempfile.mkstemp(prefix="crate_jax_failed_start_", suffix=".log")
    os.close(fd)
    return _handler.open(path)
