"""SIGTERM (preemption on most clusters, `kill`, Ctrl-C via the launchers) as a flag.

The handler is installed by the command line first of all, before absl and jax load, so a
termination signal at any moment (startup, compile, a step, the final evaluation, the final
save) only sets the flag; the loop checks it at safe points, saves what can be saved and
returns (before the workdir is written, it writes nothing), and the process exits 0. A second
signal while a save is in progress sets the same flag again and so waits for the save.

With several processes, jax.distributed's preemption notifier owns SIGTERM instead: the loop
asks it whether every process has reached the agreed stop step (a process stopping alone would
deadlock the others at their next collective); jax.distributed.initialize replaces our
handler with that notifier's.
"""

from __future__ import annotations

import logging
import signal
import threading

_received = threading.Event()
_installed = False


def _handler(signum, frame) -> None:
    if _received.is_set():
        logging.warning("signal %d again: still finishing the current save", signum)
    else:
        logging.warning("signal %d: will save a checkpoint and stop", signum)
    _received.set()


def install() -> bool:
    """Install the flag-setting SIGTERM handler (main thread only). Returns whether it did."""
    global _installed
    try:
        signal.signal(signal.SIGTERM, _handler)
    except ValueError:  # not the main thread
        return False
    _installed = True
    return True


def installed() -> bool:
    return _installed


def received() -> bool:
    """Whether a termination signal has arrived since install()."""
    return _received.is_set()


def reset() -> None:
    """Forget a received signal (tests that run several trainings in one process)."""
    _received.clear()
