"""Input pipelines over random-access sources, built on grain.

A source is anything with `__len__` and `__getitem__(i) -> dict` (tfds.data_source, the
synthetic sets, an image folder). Training iterates forever over one seed-determined order of
the whole source (reshuffled every epoch), each example transformed with its own RNG; the
order is cut into per-process batches and process p takes batches p, p + n, p + 2n, ... So the
processes read disjoint examples, and the examples of global step k do not depend on the number
of processes. Batches are prefetched in the background (threads, or worker processes with
`num_workers`). The iterator's `get_state()` is a small dict: the
checkpoint stores it, and `set_state()` resumes at exactly the next unseen batch.

Evaluation covers the whole split exactly once: the last batch is padded and carries a `mask`
(1 = real example), and every process yields the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grain
import jax
import numpy as np


class Source(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, Any]: ...


TrainTransform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]
EvalTransform = Callable[[dict[str, Any]], dict[str, Any]]


def _process() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def train_iterator(source: Source, *, batch_size: int, seed: int, transform: TrainTransform,
                   num_workers: int = 0, prefetch: int = 4,
                   process: tuple[int, int] | None = None) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's batches of `batch_size`."""
    index, count = process or _process()
    if len(source) < count * batch_size:
        raise ValueError(f"data: the source has {len(source)} examples, fewer than one batch of "
                         f"{batch_size} for each of {count} processes")
    # One global order for every process count: shuffle the whole source (anew every epoch),
    # augment each example with its own RNG, cut into per-process batches, and deal them out.
    # Global batch k is then the same set of examples however many processes read it.
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(transform, seed=seed + 1)
    ds = ds.batch(batch_size, drop_remainder=True)[index::count]
    threads = max(1, min(8, batch_size))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=max(prefetch, threads)))
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it)


class _Padded:
    """Examples `indices` of a source, padded up to `length` with masked copies of example 0."""

    def __init__(self, source: Source, indices: range, length: int, transform: EvalTransform):
        self.source, self.indices, self.length, self.transform = source, indices, length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        real = i < len(self.indices)
        example = self.transform(self.source[self.indices[i] if real else 0])
        example["mask"] = np.float32(real)
        return example


def eval_batches(source: Source, *, batch_size: int, transform: EvalTransform,
                 process: tuple[int, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `source` exactly once over all processes, in batches of `batch_size`
    per process, the last ones padded (mask 0)."""
    index, count = process or _process()
    n = len(source)
    num_batches = max(1, math.ceil(math.ceil(n / count) / batch_size))
    padded = _Padded(source, range(index, n, count), num_batches * batch_size, transform)
    ds = grain.MapDataset.source(padded).batch(batch_size, drop_remainder=True)
    threads = max(1, min(8, batch_size))
    yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                    prefetch_buffer_size=threads))
