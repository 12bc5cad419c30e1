"""Input pipelines over random-access sources, built on grain.

A source is anything with `__len__` and `__getitem__(i) -> dict` (tfds.data_source, the
synthetic sets, an image folder). Training iterates forever over one seed-determined order of
the whole source (reshuffled every epoch), each example transformed with its own RNG; the
order is cut into per-process batches and process p takes batches p, p + n, p + 2n, ... So the
processes read disjoint examples, and the examples of global step k do not depend on the number
of processes. Batches are prefetched in the background (threads, or worker processes with
`num_workers`). The iterator's `get_state()` is {'examples': global examples consumed}, the
same in every process: the checkpoint stores it, and `set_state()` resumes at exactly the next
unseen global batch, with this process count or any other (`set_states`, elastic resume).

Evaluation covers the whole split exactly once: the last batch is padded and carries a `mask`
(1 = real example), and every process yields the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import grain
import jax
import numpy as np


class Source(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict[str, Any]: ...


@runtime_checkable
class DataPosition(Protocol):
    """What a checkpoint keeps of a data iterator (crate_jax/train/data_state.py): its
    position as a JSON-able dict. An iterator that also has `set_states(states)`, one state
    per process of the saving run, resumes with another process count."""

    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class DataIterator(DataPosition, Protocol):
    """A task's training data (Task.train_data): this process's endless stream of host
    batches, dicts of NumPy arrays, with a position the checkpoint keeps. TrainIterator here,
    and the webdataset readers (crate_jax/data/wds), are ones."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...
    def __next__(self) -> dict[str, np.ndarray]: ...


TrainTransform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]
EvalTransform = Callable[[dict[str, Any]], dict[str, Any]]


def _process() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


class TrainIterator:
    """This process's endless stream of training batches, and its position in the global
    stream: the number of examples that every process together has consumed.

    The stream is one seed-determined order of the whole source (reshuffled every epoch), each
    example augmented with its own RNG, cut into per-process batches of `batch_size` and dealt
    out: batch b (counted from the resume point) goes to process b % count. The state,
    {'examples': N}, is the same in every process and does not depend on the process count, so a
    checkpoint of P processes resumes with any P' (and any batch size) at global example N:
    the same examples with the same augmentations as an uninterrupted run.
    """

    def __init__(self, source: Source, *, batch_size: int, seed: int,
                 transform: TrainTransform, num_workers: int, prefetch: int,
                 process: tuple[int, int]):
        self.index, self.count = process
        self.batch_size, self.num_workers, self.prefetch = batch_size, num_workers, prefetch
        # One global order for every process count: shuffle the whole source (anew every
        # epoch), augment each example with its own RNG (random_map seeds by position, so a
        # slice of it keeps every example's augmentation).
        ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        self._examples_ds = ds.random_map(transform, seed=seed + 1)
        self._start = 0  # global examples consumed before this iterator's first batch
        self._batches = 0  # batches this process has returned since `_start`
        self._it: Iterator[dict[str, np.ndarray]] | None = None  # built on first use

    def _build(self) -> Iterator[dict[str, np.ndarray]]:
        ds = self._examples_ds[self._start:] if self._start else self._examples_ds
        ds = ds.batch(self.batch_size, drop_remainder=True)[self.index::self.count]
        threads = max(1, min(8, self.batch_size))
        it = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=threads, prefetch_buffer_size=max(self.prefetch, threads)))
        if self.num_workers > 0:
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return iter(it)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._build()
        batch = next(self._it)
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """{'examples': global examples consumed}, taken between global steps (every process
        has then returned the same number of batches)."""
        return {"examples": self._start + self._batches * self.batch_size * self.count}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue at global example state['examples'] (or, for a state written before it
        existed, grain's {'next_index': n} of this same process count)."""
        if "examples" in state:
            examples = int(state["examples"])
        elif "next_index" in state:
            examples = int(state["next_index"]) * self.batch_size * self.count
        else:
            raise ValueError(f"train data state {state!r}: expected a key 'examples' (global "
                             "examples consumed)")
        if examples < 0:
            raise ValueError(f"train data state: 'examples' must be >= 0, got {examples}")
        self._start, self._batches, self._it = examples, 0, None

    def set_states(self, states: list[dict[str, Any]]) -> None:
        """Resume from the states of every process of a run with another process count: they
        all hold the same global position."""
        if not states or any(s != states[0] for s in states):
            raise ValueError(f"train data states of the {len(states)} saved processes disagree: "
                             f"{states}")
        self.set_state(states[0])


def train_iterator(source: Source, *, batch_size: int, seed: int, transform: TrainTransform,
                   num_workers: int = 0, prefetch: int = 4,
                   process: tuple[int, int] | None = None) -> TrainIterator:
    """An endless, checkpointable iterator of this process's batches of `batch_size`."""
    index, count = process or _process()
    if len(source) < count * batch_size:
        raise ValueError(f"data: the source has {len(source)} examples, fewer than one batch of "
                         f"{batch_size} for each of {count} processes")
    return TrainIterator(source, batch_size=batch_size, seed=seed, transform=transform,
                         num_workers=num_workers, prefetch=prefetch, process=(index, count))


class _First:
    def __init__(self, source: Source, num: int):
        self.source, self.num = source, min(int(num), len(source))

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num:
            raise IndexError(f"example {index} of {self.num}")
        return self.source[index]


def first_examples(source: Source, num: int) -> Source:
    """The first `num` examples of `source` (all of them when it has fewer)."""
    return _First(source, num)


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
