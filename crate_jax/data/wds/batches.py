"""Batches of transformed samples, made while the next samples are read.

Three stages overlap: I/O (a read-ahead thread per open shard, `readahead`), reading and the
transform on ``threads`` worker threads, and the assembly of batches in one more thread. A
worker takes the next ``chunk`` samples from the reader (tar parsing and the shuffle buffer,
under a lock: one worker reads at a time, in stream order) and transforms them (decode, crop,
tokenize; libjpeg-turbo, OpenCV and the tokenizer release the GIL while they work), then
takes the next chunk. Reading in the workers, not in a thread of its own that hands chunks to
a pool, keeps one fewer thread competing for the GIL: on the 2-core machine the 2-worker
rate rose from 1.6-1.68x to 1.7-1.8x the 1-worker rate (benchmarks/input_pipeline.py). The
assembler takes the chunks' results in stream order, so the batches do not depend on the
thread count or on timing. Up to ``in_flight`` samples are read but not yet assembled, and
``prefetch`` finished batches wait in a queue.

A transform with a ``many(samples)`` method (the same results for a list of samples, e.g. with
one tokenizer call for a chunk's captions) gets whole chunks. A transform returns None for a
sample it cannot use (an image that does not decode). It is counted under the reader's
``bad_images`` (so the bad-fraction check sees it) and the batch takes the next sample.

`get_state` is the reader's state right after the last sample of the last batch handed out, with
the failed transforms up to that sample counted in: a checkpoint taken between steps resumes at
the next unseen sample, whatever was in flight. `set_state` also takes the state of a host of
worker processes (`processes`): with one host, through the reader's elastic resume.

The threads share the GIL, which Python holds for about a quarter of each pair's time here: on
2 cores, 2 threads give 1.3-1.8x one thread. `processes` runs this pipeline in worker
processes, one per share of the shards, for hosts with more cores.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from crate_jax.data.wds import state as states


def _transform_all(transform: Callable[[dict], dict | None],
                   samples: list[dict]) -> list[dict | None]:
    many = getattr(transform, "many", None)  # a transform that does a chunk in one go
    return many(samples) if many is not None else [transform(sample) for sample in samples]


def reader_states(states_: list[dict]) -> list[dict]:
    """The reader states in saved process states (process order): the state of a host with
    worker processes (wds.processes) holds those of its workers, each a process of the
    reader."""
    return [s for state in states_ for s in state.get("workers", [state])]


class _Stopped(Exception):
    """The iterator is closing: the assembler stops waiting."""


class OrderedBatches:
    def __init__(self, reader: Any, transform: Callable[[dict], dict | None], *,
                 batch_size: int, threads: int = 8, prefetch: int = 2,
                 in_flight: int | None = None, chunk: int = 8):
        self.reader, self.transform, self.batch_size = reader, transform, batch_size
        self.threads, self.prefetch = max(1, threads), prefetch
        self.in_flight = in_flight or max(2 * batch_size, 4 * self.threads)
        # samples per read: one lock hand-over per chunk, not per sample
        self.chunk = max(1, min(chunk, self.in_flight // (2 * self.threads)))
        self._state = reader.get_state()
        self._error: BaseException | None = None
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(self.prefetch)
        self._stop = threading.Event()
        self._read_lock = threading.Lock()  # the reader, its stats and self._failed
        self._done = threading.Condition()  # self._results and the two chunk counters
        self._results: dict[int, tuple[list, list, BaseException | None]] = {}
        self._next_read = self._next_take = 0  # chunk numbers, in stream order
        self._read_error = False
        self._failed = 0  # transforms that returned None, fed back to the reader's stats
        self._threads = [threading.Thread(target=self._work, daemon=True)
                         for _ in range(self.threads)]
        self._threads.append(threading.Thread(target=self._assemble, daemon=True))
        for thread in self._threads:
            thread.start()

    def _read_chunk(self) -> tuple[int, list, list, BaseException | None] | None:
        """(chunk number, samples, for each (reader snapshot after it, failures counted
        then), the reader's error or None); None when reading has stopped."""
        with self._done:  # room for one more chunk (a soft bound: a chunk per worker over)
            while (not self._stop.is_set()
                   and (self._next_read - self._next_take + 1) * self.chunk > self.in_flight):
                self._done.wait(0.05)
        with self._read_lock:
            if self._stop.is_set() or self._read_error:
                return None
            number, samples, marks = self._next_read, [], []
            self._next_read += 1
            try:
                for _ in range(self.chunk):
                    sample = next(self.reader)
                    sample["epoch"] = self.reader.epoch
                    samples.append(sample)
                    marks.append((states.snapshot(self.reader), self._failed))
            except Exception as e:  # handed to the consumer, in stream order, by the assembler
                self._read_error = True
                return number, samples, marks, e
            return number, samples, marks, None

    def _work(self) -> None:
        while (read := self._read_chunk()) is not None:
            number, samples, marks, error = read
            try:  # the samples read before a reader error are still delivered
                outputs = _transform_all(self.transform, samples) if samples else []
            except Exception as e:  # comes first: its samples precede the reader's error
                outputs, marks, error = [], [], e
            with self._done:
                self._results[number] = (outputs, marks, error)
                self._done.notify_all()
            if error is not None:
                return

    def _take(self) -> tuple[list[tuple[dict | None, tuple[states.Snapshot, int]]],
                             BaseException | None]:
        """The next chunk's (output, mark) pairs in stream order, and the error that ends
        the stream after them (None: the stream goes on)."""
        with self._done:
            while self._next_take not in self._results:
                if self._stop.is_set():
                    raise _Stopped
                self._done.wait(0.1)
            outputs, marks, error = self._results.pop(self._next_take)
            self._next_take += 1
            self._done.notify_all()
        return list(zip(outputs, marks, strict=True)), error

    def _assemble(self) -> None:
        ready: deque[tuple[dict | None, tuple[states.Snapshot, int]]] = deque()
        error: BaseException | None = None  # raised once the samples before it are used
        try:
            while not self._stop.is_set():
                examples: list[dict] = []
                while len(examples) < self.batch_size:
                    while not ready:
                        if error is not None:
                            raise error
                        pairs, error = self._take()
                        ready.extend(pairs)
                    example, (snap, failed_then) = ready.popleft()
                    if example is None:
                        with self._read_lock:
                            self._failed += 1
                            self.reader.stats.bad_images += 1
                    else:
                        examples.append(example)
                batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
                self._put((batch, states.encode(snap, self._failed - failed_then), None))
        except _Stopped:
            return
        except Exception as e:  # handed to the consumer, raised there
            self._put((None, None, e))

    def _put(self, item: tuple) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._error is not None:  # the stream has ended: keep failing the same way
            raise self._error
        if self._stop.is_set():  # closed: nothing will come (set_state starts it again)
            raise RuntimeError("OrderedBatches: next() after close(); call set_state() first")
        batch, state, error = self._queue.get()
        if error is not None:
            self._error = error
            raise error
        self._state = state
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        if "workers" in state:  # written by worker processes (wds.processes)
            if self.reader.process_count == 1:
                self.set_states([state])
                return
            raise ValueError(f"data state written by {len(state['workers'])} worker processes "
                             "a host; set data.worker_processes to that to resume")
        self._halt()
        self.reader.set_state(state)
        self._state, self._error = state, None
        self._start()

    def set_states(self, states_: list[dict]) -> None:
        """Resume from every process's state of a run with another process count."""
        self._halt()
        self.reader.set_states(reader_states(states_))
        self._state, self._error = self.reader.get_state(), None
        self._start()

    def metrics(self) -> dict[str, float]:
        return self.reader.stats.as_metrics()

    def _halt(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def close(self) -> None:
        """Stop the threads and close the reader's open shards."""
        self._halt()
        self.reader.close()
