"""Batches made by worker processes, each a whole pipeline over its own share of the shards.

Why processes. In one process the decode threads share the GIL with the reader and with each
other: Python holds it for about a quarter of each pair's time (tar parsing and the shuffle
buffer ~110 µs, the crop's bookkeeping, RNG and tokenizer wrapper ~60 µs), so on 2 cores 2
threads made 1.5-1.8x the pairs of one, and still 1.3-1.6x with the reader replaced by a list
in memory. Each worker here runs the in-process pipeline (`batches.OrderedBatches`, its
threads overlapping I/O and decoding) on its own shards, with a GIL of its own.

Layout. On host p of n with P workers, worker k is virtual process v = p·P + k of n·P (the
reader's `process_index` / `process_count`), so together the workers of all hosts read every
shard once per epoch, exactly as n·P processes would. The host's batch i is worker (i mod P)'s
next batch. The stream is deterministic for a given P and host count; another P gives another
stream, as another host count does. The workers are given 1/P of the host's shuffle buffer
bound each (count and bytes), by the factory that builds them.

State. ``{"processes": P, "next": worker of the next batch, "workers": [each worker's state
after its last batch handed out]}``. `set_state` of a state with the same P resumes every worker
exactly (batches made but not handed out are made again). `set_states` (every host's state,
e.g. of a run with another host count or another P, or the one-process states of the in-process
pipeline) gives each worker all the saved workers' states in virtual-process order: exact when
the virtual process count is the same, else the readers' elastic resume.

Faults. A worker's error (the bad-data check, a setting its reader refuses) reaches the consumer
at that worker's turn as the same exception (a RuntimeError carrying its text when it does not
pickle), and stays. A worker that dies (killed, out of memory) raises RuntimeError naming it
and its exit status. Workers ignore SIGINT and SIGTERM, which a terminal or a scheduler sends to
the whole process group: the training process decides when to stop, and may need more batches
first (a preemption save). They end when the consumer closes the batches (SIGKILL: they hold
nothing to save) or exits (a worker whose parent has died exits within a second).

Start. Workers are fresh interpreters (``python -m crate_jax.data.wds.processes FD``): no fork
(JAX's threads do not survive one), no multiprocessing spawn (it re-imports the trainer's
__main__). The constructor waits for every worker's pipeline: a bad setting fails there.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from crate_jax.data.wds.batches import reader_states

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
_COUNTERS = ("samples", "bad_images", "missing_captions", "empty_captions", "bad_samples",
             "truncated_shards", "unreadable_shards")


class _Worker:
    """One worker process and the pipe to it."""

    def __init__(self, number: int, factory: str, kwargs: dict[str, Any], index: int,
                 count: int, resume: tuple[str, Any] | None):
        self.number = number
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT,
                                                         env.get("PYTHONPATH")) if p)
        # the worker's threads are its parallelism; the tokenizer's own pool would oversubscribe
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "crate_jax.data.wds.processes", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        self.conn = Connection(ours.detach())
        self.conn.send((factory, kwargs, index, count, resume))

    def receive(self) -> tuple:
        try:
            return _receive(self.conn)
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            code = self.process.returncode
            return ("error", RuntimeError(
                f"data worker process {self.number} (pid {self.process.pid}) ended with exit "
                f"status {code} before sending its next batch (killed, out of memory, or a "
                "crash: its own output is above)"))

    def stop(self) -> None:
        self.conn.close()
        if self.process.poll() is None:
            self.process.kill()  # it holds nothing to save, and it ignores SIGTERM
        self.process.wait()


class ProcessBatches:
    """Batches from ``processes`` worker processes; worker k builds its pipeline with
    ``factory(process_index=p·P + k, process_count=n·P, **kwargs)`` (``factory`` is
    "module:function"; the pipeline has next, get_state, set_state, set_states, metrics and
    close, as `batches.OrderedBatches`)."""

    def __init__(self, factory: str, kwargs: dict[str, Any], *, processes: int,
                 process_index: int, process_count: int):
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"ProcessBatches: processes must be an integer >= 1, got "
                             f"{processes!r}")
        self.factory, self.kwargs, self.processes = factory, kwargs, processes
        self.process_index, self.process_count = process_index, process_count
        self._workers: list[_Worker] = []
        self._start([None] * processes, 0)

    def _start(self, resumes: list[tuple[str, Any] | None], next_worker: int) -> None:
        """Start the workers (worker k resumed by resumes[k]: (method, argument)) and wait for
        each to report its starting state; raises the first worker's error."""
        count = self.process_count * self.processes
        self._workers = []
        try:
            for k, resume in enumerate(resumes):
                self._workers.append(_Worker(k, self.factory, self.kwargs,
                                             self.process_index * self.processes + k, count,
                                             resume))
        except BaseException:  # a worker that cannot start: none is left running
            self._halt()
            raise
        self._states: list[dict] = []
        self._metrics: list[dict[str, float]] = []
        self._next, self._error, self._closed = next_worker, None, False
        for worker in self._workers:
            message = worker.receive()
            if message[0] == "error":
                self._halt()
                raise message[1]
            self._states.append(message[1])
            self._metrics.append(message[2])

    def __iter__(self) -> ProcessBatches:
        return self

    def __next__(self) -> Any:
        if self._error is not None:  # the stream has ended: keep failing the same way
            raise self._error
        if self._closed:
            raise RuntimeError("ProcessBatches: next() after close(); call set_state() first")
        worker = self._workers[self._next]
        message = worker.receive()
        if message[0] == "error":
            self._error = message[1]
            self._error.add_note(f"(in data worker process {self._next} of {self.processes}, "
                                 f"pid {worker.process.pid})")
            raise self._error
        _, batch, self._states[self._next], self._metrics[self._next] = message
        self._next = (self._next + 1) % self.processes
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"processes": self.processes, "next": self._next, "workers": list(self._states)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume exactly from a state of this host with the same number of workers (with one
        host, any state: see `set_states`)."""
        saved = state.get("workers")
        if saved is not None and len(saved) == self.processes:
            self._halt()
            self._start([("set_state", s) for s in saved], int(state["next"]) % self.processes)
        elif self.process_count == 1:
            self.set_states([state])
        else:
            raise ValueError(
                f"data state written with {len(saved) if saved else 'no'} worker processes; "
                f"this run has {self.processes} (data.worker_processes): set "
                "data.worker_processes to the saved value to resume")

    def set_states(self, states: list[dict[str, Any]]) -> None:
        """Resume from every host's state (host order) of a run with any host count and any
        number of workers: the saved workers' states, in virtual-process order, go to every
        worker's `set_states`."""
        flat = reader_states(states)
        self._halt()
        self._start([("set_states", flat)] * self.processes, 0)

    def metrics(self) -> dict[str, float]:
        """The workers' data counters summed (the bad fraction of the sums)."""
        totals = {f"data/{k}": sum(m.get(f"data/{k}", 0.0) for m in self._metrics)
                  for k in _COUNTERS}
        bad = sum(totals[f"data/{k}"] for k in ("bad_samples", "truncated_shards",
                                                "unreadable_shards"))
        seen = totals["data/samples"] + bad
        return {**totals, "data/bad_fraction": bad / seen if seen else 0.0}

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    def _halt(self) -> None:
        for worker in self._workers:
            worker.stop()

    def close(self) -> None:
        """Stop the workers. `set_state(get_state())` starts them again where they were."""
        self._halt()
        self._closed = True

    def __del__(self) -> None:
        try:
            self._halt()
        except Exception:
            pass  # interpreter shutdown: the workers see their pipe close anyway


# ------------------------------------------------------------------------------- the pipe


def _send(conn: Connection, message: tuple) -> None:
    """`message` pickled with its arrays' memory sent as it is (pickle protocol 5's
    out-of-band buffers): no copy of a batch into a pickle, nor out of one at the other end."""
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    conn.send_bytes(pickle.dumps((header, [view.nbytes for view in views])))
    for view in views:
        conn.send_bytes(view)


def _receive(conn: Connection) -> tuple:
    header, sizes = pickle.loads(conn.recv_bytes())
    buffers = []
    for size in sizes:
        buffer = np.empty(size, np.uint8)  # the arrays of the message will view it
        conn.recv_bytes_into(buffer)
        buffers.append(buffer)
    return pickle.loads(header, buffers=buffers)


# ------------------------------------------------------------------------------- worker side


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _exit_with_parent() -> None:
    """End this worker when its parent has gone (it is then re-parented): a worker busy
    filling its queues would otherwise only notice at its next send. (Not prctl's
    PDEATHSIG, which fires when the parent *thread* ends: a checkpoint restore may run on
    one of orbax's threads.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _serve(fd: int) -> None:
    """A worker's life: build the pipeline, report its state, then send batches until the
    pipe closes or the pipeline fails."""
    # Ctrl-C and SIGTERM (a preemption notice, sent to the whole process group) are the
    # parent's to handle: it may need more batches before it saves and stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    conn = Connection(fd)
    factory, kwargs, index, count, resume = conn.recv()
    batches = None
    try:
        module, name = factory.split(":")
        batches = getattr(importlib.import_module(module), name)(
            process_index=index, process_count=count, **kwargs)
        if resume is not None:
            getattr(batches, resume[0])(resume[1])
        message: tuple = ("ready", batches.get_state(), batches.metrics())
    except Exception as e:
        message = ("error", _portable(e))
    try:
        while True:
            _send(conn, message)
            if message[0] == "error":
                return
            try:
                batch = next(batches)
                message = ("batch", batch, batches.get_state(), batches.metrics())
            except Exception as e:
                message = ("error", _portable(e))
    except (OSError, EOFError):
        return  # the consumer has gone
    finally:
        if batches is not None:
            batches.close()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
