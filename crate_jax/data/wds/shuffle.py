"""The shuffle buffer: bounded in samples and in bytes, its content re-derived on resume.

Sample number ``i`` of a pass's stream (counting good samples only) gets a delay ``d_i`` uniform
in ``[0, B)`` (``B = shuffle_buffer``), a pure function of ``(seed, epoch, process_index, i)``,
and so a sort key ``k_i = i + d_i``. The buffer hands out its smallest ``(k_i, i)`` once the
stream has been read up to ``k_i``: unread samples have larger keys, so the output is the stream
sorted by key, at most B samples are held, and none moves by B or more places.

A byte bound (``max_bytes``, ``shuffle_buffer_bytes``) makes the buffer hand out its smallest
sample early whenever what it holds exceeds the bound. A sample read after that may have a
smaller key than the one handed out; it is given the last handed-out key instead (``k_i =
max(i + d_i, key of the last sample out)``). So the output stays sorted by key, and it stays a
function of the data alone, since the bytes held are.

Checkpoints hold no sample and no RNG state. The output is always a prefix of the sorted order,
so a state is: the cursor before the oldest sample still held, the key of the last sample out,
and the stream index from which keys were raised to it (``level_since``). Resuming reads the
stream again from the oldest held sample and drops what sorts at or before the last key out.
Nothing goes out during that replay: whatever the original could hand out at each point of it,
it did (it reads on only when nothing may go out, and then it holds at most ``max_bytes``), so
those samples are among the dropped. Once the replay reaches the point of the checkpoint the
buffer holds exactly what the original held, and it goes on identically.
Without a byte bound keys are never raised, and a sample's key is its delay alone.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

import numpy as np

DELAY_BLOCK = 1024  # delays are drawn in blocks of this many samples
DELAY_TAG = 1  # keeps the delay generators apart from the shard-order generators


def delays(seed: int, epoch: int, process_index: int, buffer: int, block: int) -> np.ndarray:
    """The delays of samples block * DELAY_BLOCK ... (block + 1) * DELAY_BLOCK - 1."""
    rng = np.random.default_rng([seed, epoch, process_index, DELAY_TAG, block])
    return rng.integers(0, buffer, DELAY_BLOCK)


class ShuffleBuffer:
    """One pass's buffer. `push` samples in stream order, `pop` what may go out."""

    def __init__(self, seed: int, epoch: int, process_index: int, size: int,
                 max_bytes: int | None = None, *, last_out: tuple[int, int] | None = None,
                 level_since: int = -1):
        self._rng_key = (seed, epoch, process_index)
        self.size, self.max_bytes = size, max_bytes or None
        self.last_out, self.level_since = last_out, level_since
        self.bytes = 0
        self._heap: list[tuple[int, int, Any, int]] = []
        self._held: deque[tuple[int, Any]] = deque()  # (index, cursor) in stream order
        self._gone: set[int] = set()
        self._block: int | None = None
        self._delays = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._heap)

    def key(self, index: int) -> int:
        if self.size <= 1:
            key = index
        else:
            block = index // DELAY_BLOCK
            if block != self._block:
                self._delays = delays(*self._rng_key, self.size, block)
                self._block = block
            key = index + int(self._delays[index % DELAY_BLOCK])
        if self.last_out is not None and index > self.level_since:
            key = max(key, self.last_out[0])
        return key

    def push(self, index: int, sample: Any, cursor: Any, nbytes: int) -> None:
        """Add stream sample `index`, read at `cursor`, unless it went out before a resume."""
        key = self.key(index)
        if self.last_out is not None and (key, index) <= self.last_out:
            return
        heapq.heappush(self._heap, (key, index, sample, nbytes))
        self._held.append((index, cursor))
        self.bytes += nbytes

    def pop(self, frontier: int, exhausted: bool) -> Any | None:
        """The next sample out, or None while it must wait for more of the stream (read up to
        index `frontier`; `exhausted`: to the end of the pass)."""
        if not self._heap:
            return None
        key, index = self._heap[0][:2]
        if not (exhausted or key <= frontier
                or (self.max_bytes is not None and self.bytes > self.max_bytes)):
            return None
        _, _, sample, nbytes = heapq.heappop(self._heap)
        self.bytes -= nbytes
        self._gone.add(index)
        if self.last_out is None or key > self.last_out[0]:
            self.level_since = frontier
        self.last_out = (key, index)
        return sample

    def oldest(self) -> tuple[int, Any] | None:
        """(index, cursor) of the oldest sample held, or None when empty."""
        held, gone = self._held, self._gone
        while held and held[0][0] in gone:
            gone.discard(held.popleft()[0])
        return held[0] if held else None
