"""Elastic resume of a WebDatasetReader: the checkpoint of P processes, read by P' != P.

Shard i belongs to process i % P, so one process's position means nothing to a run with another
process count. Every saved state names the pass its process was in (its epoch's shard order, or
the plan of a remainder pass) and the oldest sample it had not yet yielded. The unfinished part
of each pass (that sample's shard from that sample on, then the pass's later shards) is gathered
from all P states, sorted by shard index and dealt round-robin to the P' new processes. Each
reads its share as a *remainder pass*, labelled with the highest saved epoch E, starting inside
the partly read shards at the saved byte offset, then carries on with normal epochs E + 1, ...
(shard i to process i % P'). A checkpoint taken during the remainder pass stores its plan, so it
resumes exactly again (or elastically once more).

Nothing is skipped: every sample an old process had not yet yielded is read in the remainder
pass. With a shuffle buffer, an old process had also yielded some samples that come after its
oldest held one; they are read again. Those repeats are counted exactly, because the buffer's
delays are a pure function of (seed, epoch, process, sample index). A warning gives the counts.
When the old processes were in different epochs (they drift apart by at most about one), the
ones behind finish their own epoch in the remainder pass and then join epoch E + 1 with the
rest: that is logged too, as an epoch skew rather than as skipped samples.

Counters (`ReaderStats`) of old process q go to new process q % P'. Samples re-read from an old
shuffle buffer are counted again there (at most one buffer per old process).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from crate_jax.data.wds.checks import ReaderStats
from crate_jax.data.wds.interleave import Pos
from crate_jax.data.wds.shards import shard_order
from crate_jax.data.wds.shuffle import DELAY_BLOCK, delays

if TYPE_CHECKING:
    from crate_jax.data.wds.reader import WebDatasetReader

log = logging.getLogger(__name__)

# (shard index, raw_offset, offset, byte_offset, member_key): a shard and where to start in it
Entry = tuple[int, int, int, int, "str | None"]


def unfinished(state: dict[str, Any]) -> list[Entry]:
    """The shards, in pass order, that the process which saved `state` had not finished in its
    current pass: its open slots, each from where it reads next (the first from the oldest
    sample not yet yielded), then the shards no slot had taken yet."""
    cfg = state["config"]
    if state.get("remainder") is not None:
        entries = [(int(e[0]), int(e[1]), int(e[2]), int(e[3]), e[4])
                   for e in state["remainder"]]
    else:
        local = list(range(cfg["process_index"], cfg["num_shards"], cfg["process_count"]))
        order = shard_order(cfg["seed"], int(state["epoch"]), cfg["process_index"], len(local))
        entries = [(local[j], 0, 0, 0, None) for j in order]
    position = int(state["shard_position"])
    if position >= len(entries):
        return []  # the pass was read to its end and everything in it was yielded
    top = [position, state["raw_offset"], state["offset"], state["byte_offset"],
           state["member_key"]]
    slots = [top, *state.get("slots", [])]
    opened = [(entries[int(p)][0], int(raw), int(offset), int(byte), key)
              for p, raw, offset, byte, key in slots]
    return opened + entries[int(state.get("next_entry", position + 1)):]


def repeated(state: dict[str, Any]) -> int:
    """How many samples after the oldest held one the saved process had already yielded out of
    its shuffle buffer (they are read again when its pass resumes at the oldest held one)."""
    cfg, last = state["config"], state.get("last_emitted")
    buffer = int(cfg["shuffle_buffer"])
    if buffer <= 1 or last is None:
        return 0
    last_key, last_index = int(last[0]), int(last[1])
    oldest = int(state["index"])
    # Every sample up to the last yielded key had been read (and none past 'frontier').
    highest = min(last_key, int(state.get("frontier", last_key)))
    # Keys of samples read after 'level_since' were raised to the last key out (`shuffle`).
    level_since = int(state.get("level_since", highest))
    count = 0
    for block in range((oldest + 1) // DELAY_BLOCK, highest // DELAY_BLOCK + 1):
        index = np.arange(block * DELAY_BLOCK, (block + 1) * DELAY_BLOCK)
        keys = index + delays(cfg["seed"], int(state["epoch"]), cfg["process_index"], buffer,
                              block)
        keys = np.where(index > level_since, np.maximum(keys, last_key), keys)
        inside = (index > oldest) & (index <= highest)
        yielded = (keys < last_key) | ((keys == last_key) & (index <= last_index))
        count += int(np.sum(inside & yielded))
    return count


def _check(reader: WebDatasetReader, states: list[dict[str, Any]]) -> None:
    for q, state in enumerate(states):
        if state.get("version") not in (1, 2, 3):
            raise ValueError(f"WebDatasetReader: saved state of process {q} has unknown version "
                             f"{state.get('version')}")
        cfg = state["config"]
        want = {"num_shards": reader.num_shards, "seed": reader.seed,
                "process_index": q, "process_count": len(states)}
        wrong = {k: cfg.get(k) for k, v in want.items() if cfg.get(k) != v}
        if wrong:
            raise ValueError(f"WebDatasetReader: saved state {q} of {len(states)} does not fit "
                             f"this reader: {wrong}, expected "
                             f"{ {k: want[k] for k in wrong} } (same shards and seed)")


def _merged_stats(states: list[dict[str, Any]], index: int, count: int) -> ReaderStats:
    stats = ReaderStats()
    for state in states[index::count]:
        saved = state["stats"]
        for field in dataclasses.fields(ReaderStats):
            if field.name == "bad_shards":
                for shard in saved["bad_shards"]:
                    stats.note_bad_shard(shard)
            else:
                setattr(stats, field.name, getattr(stats, field.name) + int(saved[field.name]))
    return stats


def resume(reader: WebDatasetReader, states: list[dict[str, Any]]) -> dict[str, Any]:
    """Position `reader` for the remainder pass of `states` (all processes of the saved run,
    in process order); returns what it did (also logged)."""
    _check(reader, states)
    pending = sorted((entry for state in states for entry in unfinished(state)),
                     key=lambda entry: entry[0])
    mine = pending[reader.process_index::reader.process_count]
    plan = [(shard, Pos(k, raw, offset, byte, key))
            for k, (shard, raw, offset, byte, key) in enumerate(mine)]
    epochs = sorted({int(s["epoch"]) for s in states})
    report = {"saved_processes": len(states), "processes": reader.process_count,
              "unfinished_shards": len(pending),
              "partial_shards": sum(1 for e in pending if e[1] > 0),
              "shards_here": len(mine), "repeated": sum(repeated(s) for s in states),
              "skipped": 0, "epochs": epochs}
    reader.stats = _merged_stats(states, reader.process_index, reader.process_count)
    reader._error = None
    reader._start_pass(epochs[-1], plan=plan)
    log.warning(
        "WebDatasetReader: elastic resume of a %d-process checkpoint with %d processes: "
        "%d unfinished shards (%d partly read) dealt out again, %d to process %d; "
        "%d samples repeated, %d skipped", len(states), reader.process_count, len(pending),
        report["partial_shards"], len(mine), reader.process_index, report["repeated"],
        report["skipped"])
    if len(epochs) > 1:
        log.warning("WebDatasetReader: the saved processes were in epochs %s; each finishes its "
                    "own epoch in the remainder pass, then all continue at epoch %d",
                    epochs, epochs[-1] + 1)
    return report
