"""Batches of transformed samples, made while the next samples are read.

Three stages overlap: I/O (a read-ahead thread per open shard, `readahead`), reading (tar
parsing and the shuffle buffer, in this iterator's own thread) and the transform (decode, crop,
tokenize) on a pool of ``threads`` threads; libjpeg-turbo, OpenCV and the tokenizer release the
GIL while they work. Samples enter the pool in stream order, ``chunk`` at a time (one hand-over
per chunk), and a batch takes the results in that order, so the batches do not depend on the
thread count or on timing. Up to ``in_flight`` samples are in the pool at once, and
``prefetch`` finished batches wait in a queue.

A transform with a ``many(samples)`` method (the same results for a list of samples, e.g. with
one tokenizer call for a chunk's captions) gets whole chunks. A transform returns None for a
sample it cannot use (an image that does not decode). It is counted under the reader's
``bad_images`` (so the bad-fraction check sees it) and the batch takes the next sample.

`get_state` is the reader's state right after the last sample of the last batch handed out, with
the failed transforms up to that sample counted in: a checkpoint taken between steps resumes at
the next unseen sample, whatever was in flight.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from crate_jax.data.wds import state as states


def _transform_all(transform: Callable[[dict], dict | None],
                   samples: list[dict]) -> list[dict | None]:
    many = getattr(transform, "many", None)  # a transform that does a chunk in one go
    return many(samples) if many is not None else [transform(sample) for sample in samples]


class OrderedBatches:
    def __init__(self, reader: Any, transform: Callable[[dict], dict | None], *,
                 batch_size: int, threads: int = 8, prefetch: int = 2,
                 in_flight: int | None = None, chunk: int = 8):
        self.reader, self.transform, self.batch_size = reader, transform, batch_size
        self.threads, self.prefetch = max(1, threads), prefetch
        self.in_flight = in_flight or max(2 * batch_size, 4 * self.threads)
        # samples per pool task: one hand-over (two thread wake-ups) per chunk, not per sample
        self.chunk = max(1, min(chunk, self.in_flight // (2 * self.threads)))
        self._state = reader.get_state()
        self._error: BaseException | None = None
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _submit(self, pool: ThreadPoolExecutor, failed: int) -> tuple[Future, list]:
        """The next `chunk` samples into the pool: (future of their transforms, for each
        (reader snapshot after the sample, failures counted then))."""
        samples, marks = [], []
        for _ in range(self.chunk):
            sample = next(self.reader)
            sample["epoch"] = self.reader.epoch
            samples.append(sample)
            marks.append((states.snapshot(self.reader), failed))
        return pool.submit(_transform_all, self.transform, samples), marks

    def _produce(self) -> None:
        pending: deque[tuple[Future, list]] = deque()  # chunks in the pool, in stream order
        ready: deque[tuple[dict | None, tuple[states.Snapshot, int]]] = deque()
        failed = 0  # transforms that returned None, among the samples taken so far
        with ThreadPoolExecutor(self.threads) as pool:
            try:
                while not self._stop.is_set():
                    examples: list[dict] = []
                    while len(examples) < self.batch_size:
                        if self._stop.is_set():
                            return
                        while (len(pending) + 1) * self.chunk <= self.in_flight:
                            pending.append(self._submit(pool, failed))
                        if not ready:
                            future, marks = pending.popleft()
                            ready.extend(zip(future.result(), marks, strict=True))
                        example, (snap, failed_then) = ready.popleft()
                        if example is None:
                            failed += 1
                            self.reader.stats.bad_images += 1
                        else:
                            examples.append(example)
                    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
                    self._put((batch, states.encode(snap, failed - failed_then), None))
            except Exception as e:  # handed to the consumer, raised there
                self._put((None, None, e))
            finally:
                for future, _ in pending:
                    future.cancel()

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
        if self._error is not None:  # the producer has stopped: keep failing the same way
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
        self._halt()
        self.reader.set_state(state)
        self._state, self._error = state, None
        self._start()

    def set_states(self, states_: list[dict]) -> None:
        """Resume from every process's state of a run with another process count."""
        self._halt()
        self.reader.set_states(states_)
        self._state, self._error = self.reader.get_state(), None
        self._start()

    def metrics(self) -> dict[str, float]:
        return self.reader.stats.as_metrics()

    def _halt(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        """Stop the threads and close the reader's open shards."""
        self._halt()
        self.reader.close()
