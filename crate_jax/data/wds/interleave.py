"""Several shards read at once, in turns: the stream of a pass, and where it stands.

A *pass* is a list of shards to read, each with where to start in it: an epoch's shards in
its shard order, from their starts, or the remainder pass of an elastic resume (`elastic`).
With ``interleave = k`` the pass keeps k *slots* open. They take turns, and a turn yields the
slot's next good sample. A slot whose shard ends (cleanly, cut short or unreadable) takes the
next shard of the pass that no slot has taken yet, in the same turn; with none left it closes
and the turn passes on. ``k = 1`` reads the shards one after the other.

Everything here is a function of the shards' contents, so a `Cursor`, which says where each open
slot reads next, which shard is next to open and how many *events* (groups checked, shard
failures) came before, is enough to read on from that point exactly as before. The reader keeps
the cursor before each sample it holds; its checkpoint is the cursor before the oldest one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple


class Pos(NamedTuple):
    """Where reading one shard of a pass goes on: the next group to read."""

    shard_position: int  # index of the shard in the pass
    raw_offset: int  # groups before it in the shard (bad ones included)
    offset: int  # good samples before it in the shard
    byte_offset: int  # where its first header starts (0 = unknown: read from the start)
    member_key: str | None  # its key, checked after a seek


class Cursor(NamedTuple):
    """Where the interleaved reading of a pass goes on."""

    slots: tuple[Pos, ...]  # the open slots' next reads, the one whose turn it is first
    next_entry: int  # the next shard of the pass for a slot to take
    events: int  # events of the pass before this point


class Events:
    """The pass's event counter; an event's number says whether a checkpoint had counted it."""

    def __init__(self, n: int = 0):
        self.n = n

    def next(self) -> int:
        self.n += 1
        return self.n - 1


# read_shard(shard path, where to start, events) -> (sample's position, its event number,
# sample, position after it or None when it was the shard's last group)
ShardReader = Callable[[str, Pos, Events], Iterator[tuple[Pos, int, Any, "Pos | None"]]]


def first_cursor(starts: list[Pos], interleave: int) -> Cursor:
    """The cursor at the start of a pass whose shards start at `starts`."""
    k = min(max(1, interleave), len(starts))
    return Cursor(tuple(starts[:k]), k, 0)


def interleaved(entries: list[tuple[str, Pos]], cursor: Cursor, events: Events,
                read_shard: ShardReader) -> Iterator[tuple[Cursor, Any, Cursor]]:
    """(cursor before, sample, cursor after) for the good samples of a pass from `cursor`.

    `entries` are the pass's shards with where to start in each; `events` counts on from
    ``cursor.events``. Shards are opened on their first turn, so at most k are open.
    """
    slots: deque[Pos] = deque(cursor.slots)
    readers: deque[Iterator | None] = deque(None for _ in slots)
    next_entry = cursor.next_entry
    events.n = cursor.events
    try:
        while slots:
            if readers[0] is None:
                readers[0] = read_shard(entries[slots[0].shard_position][0], slots[0], events)
            item = next(readers[0], None)  # type: ignore[arg-type]
            if item is None:  # the shard is done with no further good sample
                next_entry = _refill(slots, readers, 0, entries, next_entry)
                continue
            here, number, sample, after = item
            before = Cursor((here, *list(slots)[1:]), next_entry, number)
            slots.rotate(-1)
            readers.rotate(-1)
            if after is None:  # a clean end: the next shard takes the slot
                next_entry = _refill(slots, readers, -1, entries, next_entry)
            else:
                slots[-1] = after
            yield before, sample, Cursor(tuple(slots), next_entry, events.n)
    finally:
        for reader in readers:
            if reader is not None:
                reader.close()  # type: ignore[attr-defined]


def _refill(slots: deque[Pos], readers: deque[Iterator | None], at: int,
            entries: list[tuple[str, Pos]], next_entry: int) -> int:
    """Give slot `at` the pass's next shard, or close it when none is left."""
    reader = readers[at]
    if reader is not None:
        reader.close()  # type: ignore[attr-defined]
    if next_entry < len(entries):
        slots[at], readers[at] = entries[next_entry][1], None
        return next_entry + 1
    del slots[at]
    del readers[at]
    return next_entry
