"""The reader's checkpoint: a small JSON dict, and resuming from it.

Fields (version 3):

    config          num_shards, process_index, process_count, seed, shuffle_buffer,
                    shuffle_buffer_bytes, interleave: must match the resuming reader
    epoch           the pass's epoch; remainder: the plan of an elastic remainder pass
                    ([shard index, raw_offset, offset, byte_offset, member_key] per shard), else
                    None
    shard_position, raw_offset, offset, byte_offset, member_key
                    where the slot of the oldest sample not yet yielded reads it (the next
                    sample, with no shuffle buffer); slots: the other open slots' positions in
                    turn order; next_entry: the pass's next shard for a slot; events: the
                    pass's events before that point (`interleave.Cursor`)
    index           that sample's index in the pass's stream
    last_emitted, level_since, frontier
                    the last key out of the shuffle buffer, from where keys were raised to it,
                    and the index of the last sample read (`shuffle`)
    read_until      the events read: the ones before it are in `stats` already
    stats           the counters (`checks.ReaderStats`)

Versions 1 and 2 (one shard at a time, no byte bound) still resume: their position is the
only slot, and their `read_until` is a (shard position, group) pair.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

from crate_jax.data.wds.checks import ReaderStats
from crate_jax.data.wds.interleave import Cursor, Pos

if TYPE_CHECKING:
    from crate_jax.data.wds.reader import WebDatasetReader

VERSION = 3
# What a state without a newer config field means: the behaviour from before that field.
_CONFIG_DEFAULTS = {"shuffle_buffer_bytes": 0, "interleave": 1}
_COUNTERS = tuple(f.name for f in dataclasses.fields(ReaderStats) if f.name != "bad_shards")


class Snapshot(NamedTuple):
    """What a state is made of, taken cheaply (once per sample by a batcher that reads ahead)."""

    config: dict[str, int]
    epoch: int
    pass_length: int
    plan: list[tuple[int, Pos]] | None
    index: int
    cursor: Cursor
    last_out: tuple[int, int] | None
    level_since: int
    frontier: int
    events: int
    stats: tuple[Any, ...]


def snapshot(reader: WebDatasetReader) -> Snapshot:
    oldest = reader._buffer.oldest()
    index, cursor = oldest if oldest is not None else (reader._next_index, reader._cursor)
    stats = reader.stats
    return Snapshot(reader._config(), reader._epoch, len(reader._entries), reader._plan, index,
                    cursor, reader._buffer.last_out, reader._buffer.level_since,
                    reader._frontier, reader._events.n,
                    (*(getattr(stats, f) for f in _COUNTERS), tuple(stats.bad_shards)))


def encode(snap: Snapshot, extra_bad_images: int = 0) -> dict[str, Any]:
    """The state of `snap`, with `extra_bad_images` more bad images counted (see
    `batches`)."""
    cursor = snap.cursor
    top = cursor.slots[0] if cursor.slots else Pos(snap.pass_length, 0, 0, 0, None)
    stats = dict(zip(_COUNTERS, snap.stats[:-1], strict=True))
    stats["bad_images"] += extra_bad_images
    return {
        "version": VERSION,
        "config": dict(snap.config),
        "epoch": snap.epoch,
        "shard_position": top.shard_position,
        "offset": top.offset,
        "raw_offset": top.raw_offset,
        "byte_offset": top.byte_offset,
        "member_key": top.member_key,
        "slots": [list(pos) for pos in cursor.slots[1:]],
        "next_entry": cursor.next_entry,
        "events": cursor.events,
        "index": snap.index,
        "last_emitted": None if snap.last_out is None else list(snap.last_out),
        "level_since": snap.level_since,
        "frontier": snap.frontier,
        "read_until": snap.events,
        "remainder": None if snap.plan is None else [
            [shard, *start[1:]] for shard, start in snap.plan],
        "stats": {**stats, "bad_shards": list(snap.stats[-1])},
    }


def _pos(fields: list[Any], position: int | None = None) -> Pos:
    shard_position, raw, offset, byte, key = fields
    return Pos(int(shard_position) if position is None else position, int(raw), int(offset),
               int(byte), key)


def check_config(saved: dict[str, Any], reader: WebDatasetReader, what: str = "state") -> None:
    config = {**_CONFIG_DEFAULTS, **saved["config"]}
    mine = reader._config()
    if config != mine:
        wrong = {k: config.get(k) for k in mine if config.get(k) != mine[k]}
        raise ValueError(f"WebDatasetReader: {what} is for {wrong}, this reader has "
                         f"{ {k: mine[k] for k in wrong} } (same shards, seed, shuffle_buffer, "
                         "shuffle_buffer_bytes and interleave needed for an exact resume)")


def resume(reader: WebDatasetReader, saved: dict[str, Any]) -> None:
    version = saved.get("version")
    if version not in (1, 2, VERSION):
        raise ValueError(f"WebDatasetReader: unknown state version {version}")
    check_config(saved, reader)
    reader.stats = ReaderStats(**{**saved["stats"],
                                  "bad_shards": list(saved["stats"]["bad_shards"])})
    reader._error = None
    remainder = saved.get("remainder")
    plan = None if remainder is None else [(int(entry[0]), _pos([k, *entry[1:]]))
                                           for k, entry in enumerate(remainder)]
    pass_length = len(reader.local_shards) if plan is None else len(plan)
    top = _pos([saved[k] for k in ("shard_position", "raw_offset", "offset", "byte_offset",
                                   "member_key")])
    slots = [] if top.shard_position >= pass_length else [
        top, *(_pos(fields) for fields in saved.get("slots", []))]
    cursor = Cursor(tuple(slots), int(saved.get("next_entry", top.shard_position + 1)),
                    int(saved.get("events", 0)))
    last = saved["last_emitted"]
    if version == VERSION:
        quiet: int | tuple[int, int] = int(saved["read_until"])
        level_since = int(saved["level_since"])
    else:  # no byte bound then: keys were never raised
        quiet = (int(saved["read_until"][0]), int(saved["read_until"][1]))
        level_since = 1 << 62
    reader._start_pass(int(saved["epoch"]), cursor, index=int(saved["index"]), plan=plan,
                       quiet_until=quiet,
                       buffer={"last_out": None if last is None else (int(last[0]),
                                                                      int(last[1])),
                               "level_since": level_since})
