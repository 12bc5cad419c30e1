"""`WebDatasetReader`: the resumable, deterministic stream of samples of one process.

Stages, one module each: `shards` (patterns, which process reads which shard, shard order),
`readahead` (I/O in a background thread per open shard), `tar` (members grouped into samples,
positions to resume at), `checks` (bad data and its counters), `interleave` (several shards
read in turns), `shuffle` (the bounded shuffle buffer), `elastic` (resuming a checkpoint of
another process count). This module runs them and keeps the state.

An epoch yields every good sample of the process's shards exactly once; epochs never mix.
`get_state` is a small JSON dict; `set_state` continues exactly where the reader that wrote it
was (counters included, with nothing counted twice), re-reading fewer than ``shuffle_buffer``
good samples (plus the bad ones between them), never whole epochs: each open shard is entered
at its saved byte offset when the file can seek, else by skipping member headers. A bad fraction
over ``max_bad_fraction`` (after ``min_samples_for_bad_check`` samples) raises RuntimeError
naming the shards with bad data, and so does an epoch with no good sample at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from crate_jax.data.wds import checks, shards
from crate_jax.data.wds.checks import ReaderStats
from crate_jax.data.wds.interleave import Cursor, Events, Pos, first_cursor, interleaved
from crate_jax.data.wds.readahead import ReadAhead
from crate_jax.data.wds.shuffle import ShuffleBuffer
from crate_jax.data.wds.tar import Group, NotATar, Truncated, shard_groups

log = logging.getLogger(__name__)

STATE_VERSION = 3  # 3: interleaved slots, event numbers, byte bound; 1 and 2 still read
SAMPLE_OVERHEAD = 600  # bytes a held sample costs beyond its members (dict, strings, heap entry)


class WebDatasetReader:
    """Endless iterator of samples {'key', 'image' (bytes, undecoded), 'caption' (str),
    'json' (dict|None), 'shard' (str), 'index' (int)} for this process.

    'index' is the sample's position among the key groups of its shard (bad ones included), so
    ('shard', 'index') identifies a sample. ``interleave`` shards are read at once
    (`interleave`), ``shuffle_buffer`` / ``shuffle_buffer_bytes`` bound the shuffle buffer
    (`shuffle`). `get_state`/`set_state` give exact resume; `set_states` resumes the states of
    a run with another process count (`elastic`).
    """

    def __init__(self, shards_: str | list[str], *, seed: int = 0,
                 process_index: int | None = None, process_count: int | None = None,
                 shuffle_buffer: int = 0, shuffle_buffer_bytes: int | None = None,
                 interleave: int = 1, max_bad_fraction: float = 0.5,
                 min_samples_for_bad_check: int = 100, open_fn: shards.OpenFn | None = None,
                 verify_images: bool = True, readahead: bool = True):
        all_shards = shards.shard_list(shards_)
        if process_index is None or process_count is None:
            import jax  # only when needed: keeps jax optional here

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        _check_arguments(len(all_shards), process_index, process_count, seed, shuffle_buffer,
                         shuffle_buffer_bytes, interleave, max_bad_fraction)
        self.num_shards, self.all_shards = len(all_shards), all_shards
        self.local_shards = shards.local_shards(all_shards, process_index, process_count)
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.shuffle_buffer, self.shuffle_buffer_bytes = shuffle_buffer, shuffle_buffer_bytes or 0
        self.interleave = interleave
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_bad_check = min_samples_for_bad_check
        self.verify_images, self.readahead = verify_images, readahead
        self._open = open_fn or shards.default_open
        self.stats = ReaderStats()
        self._error: BaseException | None = None
        self._gen: Iterator[tuple[Cursor, dict[str, Any], Cursor]] | None = None
        self._reopen: dict[str, Any] = {}  # the state at close(), resumed by the next next()
        self.elastic_report: dict[str, Any] | None = None  # what set_states did, if elastic
        self._start_pass(0)

    # ---------------------------------------------------------------- iteration

    @property
    def epoch(self) -> int:
        """The epoch of the sample returned last (the one about to be read before any)."""
        return self._epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices into `local_shards` in the order epoch `epoch` visits them."""
        return shards.shard_order(self.seed, epoch, self.process_index, len(self.local_shards))

    def _start_pass(self, epoch: int, cursor: Cursor | None = None, *, index: int = 0,
                    plan: list[tuple[int, Pos]] | None = None,
                    quiet_until: int | tuple[int, int] | None = None,
                    buffer: dict[str, Any] | None = None) -> None:
        """Begin (or resume at `cursor`) a pass: epoch `epoch` over this process's shards, or,
        with `plan`, the remainder pass of an elastic resume: (shard index, where to start
        in it) for each shard, in order."""
        if self._gen is not None:
            self._gen.close()  # closes the open shards
        self._epoch, self._plan = epoch, plan
        if plan is None:
            self._entries = [(self.local_shards[j], Pos(k, 0, 0, 0, None))
                             for k, j in enumerate(self.epoch_order(epoch))]
        else:
            self._entries = [(self.all_shards[j], start) for j, start in plan]
        if cursor is None:
            cursor = first_cursor([start for _, start in self._entries], self.interleave)
        self._buffer = ShuffleBuffer(self.seed, epoch, self.process_index, self.shuffle_buffer,
                                     self.shuffle_buffer_bytes or None, **(buffer or {}))
        self._next_index = index  # good-sample index, in this pass, of the next sample read
        self._frontier = index - 1  # index of the last sample read
        self._cursor = cursor  # where reading goes on
        self._quiet_until = quiet_until  # events before it were counted before a checkpoint
        self._exhausted = False
        self._events = Events(cursor.events)
        self._gen = interleaved(self._entries, cursor, self._events, self._read_shard)

    def __iter__(self) -> WebDatasetReader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RuntimeError as e:
            self._error = e  # the stream is broken now; keep failing the same way
            raise

    def _next(self) -> dict[str, Any]:
        if self._gen is None:  # closed: resume where it was
            self.set_state(self._reopen)
        while True:
            sample = self._buffer.pop(self._frontier, self._exhausted)
            if sample is not None:
                return sample
            if self._exhausted:
                if self._next_index == 0 and self._plan is None:
                    raise RuntimeError(
                        f"WebDatasetReader: epoch {self._epoch} of process {self.process_index} "
                        f"yielded no good sample from its {len(self.local_shards)} shards "
                        f"({checks.name_list(self.local_shards)}); {self.stats.summary()}; "
                        f"shards with bad data: {checks.name_list(self.stats.bad_shards)}")
                self._start_pass(self._epoch + 1)
                continue
            item = next(self._gen, None)
            if item is None:
                self._exhausted = True
                # Everything to the end of the pass has been read (and counted) now.
                self._cursor = Cursor((), len(self._entries), self._events.n)
                continue
            before, sample, self._cursor = item
            index = self._next_index
            self._next_index += 1
            self._frontier = index
            self._buffer.push(index, sample, before, sample.pop("_bytes"))

    # ---------------------------------------------------------------- reading

    def _read_shard(self, shard: str, start: Pos,
                    events: Events) -> Iterator[tuple[Pos, int, dict[str, Any], Pos | None]]:
        position = start.shard_position
        try:
            f = self._open(shard)
            if self.readahead:
                f = ReadAhead(f)
        except Exception as e:  # missing file, permissions, backend errors
            self._bad_shard(shard, events.next(), position, start.raw_offset, "unreadable", e)
            return
        next_raw = 0
        try:
            groups = shard_groups(f, shard, start.raw_offset, start.byte_offset,
                                  start.member_key, shards.seekable(f))
            good = start.offset
            for group in groups:
                next_raw = group.raw + 1
                if group.raw < start.raw_offset or not group.relevant:
                    continue
                number = events.next()
                sample = self._check(group, shard, number, position)
                if sample is None:
                    continue
                here = Pos(position, group.raw, good, group.offset, group.key)
                good += 1
                after = None if group.next_key is None else Pos(
                    position, group.raw + 1, good, group.next_offset, group.next_key)
                yield here, number, sample, after
        except NotATar as e:
            self._bad_shard(shard, events.next(), position, 0, "unreadable", e)
        except Truncated as e:
            self._bad_shard(shard, events.next(), position, next_raw, "truncated", e)
        finally:
            try:
                f.close()
            except Exception:
                pass  # nothing useful to do about a failing close of a read-only file

    def _counting(self, number: int, position: int, raw: int) -> bool:
        """Whether an event is new, i.e. was not counted before the checkpoint resumed from.
        States before version 3 mark that point by (shard position, group) instead."""
        quiet = self._quiet_until
        if quiet is None:
            return True
        new = number >= quiet if isinstance(quiet, int) else (position, raw) >= quiet
        if new:
            self._quiet_until = None
        return new

    def _check(self, group: Group, shard: str, number: int,
               position: int) -> dict[str, Any] | None:
        """The sample of a group, or None (counted) when it is bad."""
        problem, caption = checks.problem_of(group, self.verify_images)
        if self._counting(number, position, group.raw):
            checks.count(self.stats, problem, shard)
            checks.check_bad_fraction(self.stats, self.max_bad_fraction,
                                      self.min_samples_for_bad_check, self.process_index)
        if problem is not None:
            return None
        assert group.image is not None
        nbytes = (len(group.image) + len(group.caption or b"") + len(group.meta or b"")
                  + SAMPLE_OVERHEAD)
        return {"key": group.key, "image": group.image, "caption": caption,
                "json": checks.parse_json(group.meta), "shard": shard, "index": group.raw,
                "_bytes": nbytes}

    def _bad_shard(self, shard: str, number: int, position: int, raw: int, kind: str,
                   error: BaseException) -> None:
        if not self._counting(number, position, raw):
            return
        log.warning("WebDatasetReader: %s shard %s: %s: %s", kind, shard, type(error).__name__,
                    error)
        if kind == "unreadable":
            self.stats.unreadable_shards += 1
        else:
            self.stats.truncated_shards += 1
        self.stats.note_bad_shard(shard)
        checks.check_bad_fraction(self.stats, self.max_bad_fraction,
                                  self.min_samples_for_bad_check, self.process_index)

    # ---------------------------------------------------------------- checkpoints

    def close(self) -> None:
        """Close the open shards and stop their read-ahead threads. A later `next` resumes
        from the state at the close (re-reading what the shuffle buffer held)."""
        if self._gen is not None:
            saved = self.get_state()
            self._gen.close()
            self._gen, self._reopen = None, saved

    def _config(self) -> dict[str, int]:
        return {"num_shards": self.num_shards, "process_index": self.process_index,
                "process_count": self.process_count, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer,
                "shuffle_buffer_bytes": self.shuffle_buffer_bytes,
                "interleave": self.interleave}

    def get_state(self) -> dict[str, Any]:
        """A small JSON-serialisable checkpoint of the reader (see `state` for its fields)."""
        from crate_jax.data.wds import state

        return state.encode(state.snapshot(self))

    def set_state(self, saved: dict[str, Any]) -> None:
        """Continue exactly where the reader that produced `saved` was."""
        from crate_jax.data.wds import state

        state.resume(self, saved)

    def set_states(self, states: list[dict[str, Any]]) -> None:
        """Resume from the states of all processes of a run (process order), which may have had
        another process count: exact when it had this one; otherwise at shard granularity, see
        `elastic` (the samples it repeats or skips are logged)."""
        from crate_jax.data.wds import elastic

        if len(states) == self.process_count:
            self.set_state(states[self.process_index])
            return
        self.elastic_report = elastic.resume(self, states)


def _check_arguments(num_shards: int, process_index: int, process_count: int, seed: int,
                     shuffle_buffer: int, shuffle_buffer_bytes: int | None, interleave: int,
                     max_bad_fraction: float) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"WebDatasetReader: bad process_index {process_index} for "
                         f"process_count {process_count}")
    if num_shards < process_count:
        raise ValueError(f"WebDatasetReader: {num_shards} shards for {process_count} "
                         "processes; every process needs at least one shard")
    for name, value in (("seed", seed), ("shuffle_buffer", shuffle_buffer),
                        ("shuffle_buffer_bytes", shuffle_buffer_bytes or 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"WebDatasetReader: {name} must be an integer >= 0, got {value!r}")
    if isinstance(interleave, bool) or not isinstance(interleave, int) or interleave < 1:
        raise ValueError(f"WebDatasetReader: interleave must be an integer >= 1, got "
                         f"{interleave!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"WebDatasetReader: max_bad_fraction must be in [0, 1], got "
                         f"{max_bad_fraction}")

