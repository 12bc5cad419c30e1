"""A pipeline factory for the worker-process tests: the real reader and OrderedBatches, with a
transform that only reads the sample number from its key (so batches name their samples)."""

from __future__ import annotations

import pickle

import numpy as np

from crate_jax.data.wds.batches import OrderedBatches
from crate_jax.data.wds.reader import WebDatasetReader


class Unpicklable(Exception):
    def __init__(self, number: int, why: str):  # two required arguments: pickling fails
        super().__init__(f"{why} at {number}")

    def __reduce__(self):
        raise pickle.PicklingError("not this one")


def _transform(fail_at: int | None, unpicklable: bool):
    def numbered(sample: dict) -> dict | None:
        number = int(sample["key"])
        if number == fail_at:
            if unpicklable:
                raise Unpicklable(number, "odd failure")
            raise ValueError(f"transform broke on {number}")
        if number % 7 == 0:
            return None  # counted as a bad image
        return {"number": np.int64(number), "epoch": np.int64(sample["epoch"])}
    return numbered


def numbered_batches(*, process_index: int, process_count: int, paths: list[str],
                     batch_size: int = 4, shuffle_buffer: int = 6, share: int = 1,
                     fail_at: int | None = None, unpicklable: bool = False,
                     threads: int = 2) -> OrderedBatches:
    reader = WebDatasetReader(paths, seed=5, process_index=process_index,
                              process_count=process_count,
                              shuffle_buffer=shuffle_buffer // share, interleave=2,
                              verify_images=False)
    return OrderedBatches(reader, _transform(fail_at, unpicklable), batch_size=batch_size,
                          threads=threads)
