"""A resumable, deterministic reader of webdataset tar shards as img2dataset writes them.

Format. A shard is a POSIX tar. A sample is a run of consecutive members that share a key: the
member name up to the first '.' of its basename ('dir/000123.jpg' -> key 'dir/000123', extension
'jpg'). The image is the first member with extension jpg|jpeg|png|webp, the caption the '.txt'
member (utf-8), the metadata the optional '.json' member (a dict). Directories, hidden files and
other extensions are ignored.

Assignment and order. Shard ``i`` belongs to process ``i % process_count``. In epoch ``e`` a
process visits its shards in the order ``np.random.default_rng([seed, e, process_index])
.permutation``; inside a shard samples come in file order. Epochs never mix: an epoch yields every
good sample of the process's shards exactly once. A checkpoint of another number of processes
resumes at shard granularity through a remainder pass (`set_states`, crate_jax.data.wds_elastic).

Shuffle buffer (``shuffle_buffer = B > 1``). Sample number ``i`` of the epoch's stream (counting
good samples only) gets a delay ``d_i`` uniform in ``[0, B)``, a pure function of ``(seed, epoch,
process_index, i)``, and the reader yields the epoch's samples sorted by ``(i + d_i, i)``. Since
``i + d_i >= i``, a sample can be yielded as soon as the stream has been read up to its sort key,
so at most ``B`` samples are held in memory and no sample moves by ``B`` or more places. The
design keeps no RNG state and no buffer contents in checkpoints: the yielded samples are always
a prefix of the sorted order, so the state is the position of the oldest sample still held (its
shard, how many samples precede it there, its byte offset) plus the sort key of the last sample
yielded. ``set_state`` replays the stream from that position (fewer than ``B`` good samples),
drops what sorts before the last yielded key, and carries on exactly as the original would have.
Resume starts in the shard of the oldest held sample at its saved byte offset (a seek when the
file object supports it, otherwise by skipping member headers) and re-reads fewer than ``B`` good
samples (plus the bad ones between them), never whole epochs. Counters (`stats`) are saved
too, and events in the replayed part are not counted twice. ``shuffle_buffer`` 0 or 1 is the
same machinery with all delays 0: the state then points at the next sample.

Bad data is skipped and counted, never fatal by itself (see `ReaderStats`). Each bad sample is
counted once, under the first check it fails, in this order: no image member (``bad_images``), no
'.txt' (``missing_captions``), whitespace-only caption (``empty_captions``), image that does not
decode (``bad_images``). Images are checked by decoding them with PIL (JPEGs with DCT scaling to
1/8 size, which still reads every byte of entropy-coded data): ``Image.verify()`` alone does not
notice a truncated JPEG. Pass ``verify_images=False`` to skip the decode when the consumer handles
undecodable images. A tar that ends early, or whose header stops making sense mid-shard, keeps
the samples read before the damage (a sample still being read is dropped) and counts as
truncated; a shard that cannot be opened or is not a tar counts as unreadable. Once
``min_samples_for_bad_check`` samples have been seen, a bad fraction (`ReaderStats.bad_fraction`)
above ``max_bad_fraction`` raises RuntimeError naming the shards with bad data; so does an epoch
that yields no good sample at all, rather than looping forever.
"""

from __future__ import annotations

import dataclasses
import heapq
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
_RELEVANT = IMAGE_EXTENSIONS | {"txt", "json"}
_STATE_VERSION = 2  # 2 added 'frontier' and 'remainder' (elastic resume); 1 still reads
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# A corrupt size field must not make us allocate gigabytes; img2dataset members are far smaller.
_MAX_MEMBER_BYTES = 256 << 20
_MAX_META_BYTES = 1 << 20
_MAX_EXPANSION = 10_000_000
_MAX_BAD_SHARDS = 100
_DELAY_BLOCK = 1024  # delays are drawn in blocks of this many samples
_DELAY_TAG = 1  # keeps the delay generators apart from the shard-order generators

OpenFn = Callable[[str], IO[bytes]]


# --------------------------------------------------------------------------------------------
# Shard patterns


_RANGE_RE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?")


def _split_top_level(text: str, seps: str, pattern: str) -> list[str]:
    """`text` split at characters in `seps` that are outside braces."""
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '}}'")
        elif depth == 0 and (ch in seps or (" " in seps and ch.isspace())):
            parts.append(text[start:j])
            start = j + 1
    if depth:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '{{'")
    parts.append(text[start:])
    return parts


def _range(match: re.Match[str], pattern: str) -> list[str]:
    a, b, step_text = match.groups()
    lo, hi = int(a), int(b)
    step = abs(int(step_text)) if step_text else 1
    if step == 0:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: step 0")
    values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
    if len(values) > _MAX_EXPANSION:
        raise ValueError(f"shard pattern {pattern!r} expands to {len(values)} names")
    # Like bash: a leading zero on either end pads every number to the longer end's width.
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in (a, b))
    width = max(len(a), len(b)) if padded else 0
    return [f"{v:0{width}d}" for v in values]


def _expand_braces(text: str, pattern: str) -> list[str]:
    start = text.find("{")
    if start < 0:
        if "}" in text:
            raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '}}'")
        return [text]
    if "}" in text[:start]:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '}}'")
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: unmatched '{{'")
    body = text[start + 1 : end]
    alternatives = _split_top_level(body, ",", pattern)
    if len(alternatives) > 1:
        options = [o for alt in alternatives for o in _expand_braces(alt, pattern)]
    elif match := _RANGE_RE.fullmatch(body):
        options = _range(match, pattern)
    else:
        raise ValueError(f"malformed brace in shard pattern {pattern!r}: '{{{body}}}' is neither "
                         "a comma list '{a,b}' nor a range '{000..099}'")
    tails = _expand_braces(text[end + 1 :], pattern)
    if len(options) * len(tails) > _MAX_EXPANSION:
        raise ValueError(f"shard pattern {pattern!r} expands to too many names")
    return [text[:start] + o + t for o in options for t in tails]


def expand_pattern(pattern: str) -> list[str]:
    """Shard paths from a brace pattern such as '/data/datacomp/{00000..12799}.tar'.

    Supports ranges (zero padding kept, optional step '{0..10..2}'), comma lists '{a,b}', several
    and nested braces, and a comma or whitespace separated list of such patterns or plain paths.
    Remote paths (gs://...) are returned as strings, untouched. Raises ValueError naming the
    pattern for a malformed brace or when nothing is left.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"shard pattern must be a str, got {type(pattern).__name__}")
    paths = [p for part in _split_top_level(pattern, ", ", pattern) if part
             for p in _expand_braces(part, pattern) if p]
    if not paths:
        raise ValueError(f"shard pattern {pattern!r} names no shards")
    return paths


# --------------------------------------------------------------------------------------------
# Statistics


@dataclasses.dataclass
class ReaderStats:
    """Counts of what this process has read (good samples and each kind of bad data).

    `samples` counts good samples read from shards (including ones still in the shuffle buffer).
    `bad_shards` names the shards where any bad data was found, most recent last, at most 100.
    """

    samples: int = 0
    bad_images: int = 0
    missing_captions: int = 0
    empty_captions: int = 0
    truncated_shards: int = 0
    unreadable_shards: int = 0
    bad_shards: list[str] = dataclasses.field(default_factory=list)

    @property
    def bad_samples(self) -> int:
        return self.bad_images + self.missing_captions + self.empty_captions

    @property
    def seen_samples(self) -> int:
        return self.samples + self.bad_samples

    @property
    def bad_fraction(self) -> float:
        """(bad samples + bad shards) / (samples seen + bad shards)."""
        bad = self.bad_samples + self.truncated_shards + self.unreadable_shards
        total = self.seen_samples + self.truncated_shards + self.unreadable_shards
        return bad / total if total else 0.0

    def note_bad_shard(self, shard: str) -> None:
        if shard in self.bad_shards:
            self.bad_shards.remove(shard)
        self.bad_shards.append(shard)
        del self.bad_shards[:-_MAX_BAD_SHARDS]

    def as_metrics(self) -> dict[str, float]:
        """Scalars for a metrics writer, keys 'data/...'."""
        return {
            "data/samples": float(self.samples),
            "data/bad_images": float(self.bad_images),
            "data/missing_captions": float(self.missing_captions),
            "data/empty_captions": float(self.empty_captions),
            "data/bad_samples": float(self.bad_samples),
            "data/truncated_shards": float(self.truncated_shards),
            "data/unreadable_shards": float(self.unreadable_shards),
            "data/bad_fraction": float(self.bad_fraction),
        }

    def summary(self) -> str:
        return (f"samples={self.samples}, bad_images={self.bad_images}, "
                f"missing_captions={self.missing_captions}, empty_captions={self.empty_captions}, "
                f"truncated_shards={self.truncated_shards}, "
                f"unreadable_shards={self.unreadable_shards}")


def _name_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[-limit:])
    return shown if len(names) <= limit else f"{shown} (and {len(names) - limit} more)"


# --------------------------------------------------------------------------------------------
# Tar parsing. Our own streaming parser rather than `tarfile`: tarfile quietly ends the archive
# at a short or garbled header, so a cut shard would look complete. Here a missing end-of-archive
# block or a bad header checksum mid-shard is reported as truncation.


class _TarError(Exception):
    pass


class _NotATar(_TarError):
    """The first header could not be read: an empty file or not a tar at all."""


class _Truncated(_TarError):
    """The archive ends early or is damaged after at least one good header."""


class _Member(NamedTuple):
    name: str
    size: int
    offset: int  # byte offset of the member's first header block (extended headers included)
    is_file: bool


def _octal(field: bytes) -> int | None:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for big numbers
        return None if field[0] == 0xFF else int.from_bytes(bytes([field[0] & 0x7F]) + field[1:])
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _checksum_ok(block: bytes) -> bool:
    stored = _octal(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    high = sum(1 for b in block[:148] + block[156:] if b > 127)  # some old tars sum signed bytes
    return stored == unsigned - 256 * high


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise _Truncated("corrupt pax header") from None
        if length <= 0:
            raise _Truncated("corrupt pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


class _TarStream:
    """Members of a tar read front to back from a binary file object, starting at byte `pos`."""

    def __init__(self, f: IO[bytes], pos: int, seekable: bool):
        self._f, self.pos, self._start, self._seekable = f, pos, pos, seekable
        self._pending = 0  # unread data + padding of the last member returned

    def _fail(self, at: int, message: str) -> _TarError:
        kind = _NotATar if at == self._start else _Truncated
        return kind(f"{message} at byte {at}")

    def _read(self, n: int) -> bytes:
        try:
            data = self._f.read(n)
            # Raw streams may return short reads before the end; keep reading until EOF.
            while data is not None and 0 < len(data) < n:
                more = self._f.read(n - len(data))
                if not more:
                    break
                data += more
        except Exception as e:  # any I/O error of the backend (local, gcsfs, ...)
            raise self._fail(self.pos, f"read error {type(e).__name__}: {e}") from e
        data = data or b""
        self.pos += len(data)
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self._seekable:
            try:
                self._f.seek(n, io.SEEK_CUR)
            except Exception as e:
                raise self._fail(self.pos, f"seek error {type(e).__name__}: {e}") from e
            self.pos += n  # seeking past the end goes unnoticed until the next header read
            return
        while n > 0:
            chunk = self._read(min(n, 1 << 20))
            if not chunk:
                raise _Truncated(f"unexpected end of data at byte {self.pos}")
            n -= len(chunk)

    def next_member(self) -> _Member | None:
        """The next member's header, or None at the end-of-archive block."""
        self._skip(self._pending)
        self._pending = 0
        offset = self.pos
        long_name: bytes | None = None
        pax: dict[bytes, bytes] = {}
        while True:
            at = self.pos
            block = self._read(_BLOCK)
            if len(block) < _BLOCK:
                raise self._fail(at, "empty file" if at == 0 and not block else
                                 "no end-of-archive block (file ends)")
            if block == _ZERO_BLOCK:
                return None  # one zero block is enough; the second is not required
            if not _checksum_ok(block):
                raise self._fail(at, "bad header checksum")
            size = _octal(block[124:136])
            if size is None:
                raise self._fail(at, "bad size field")
            kind = block[156:157]
            if kind in (b"x", b"L"):  # pax extended header, GNU long name: apply to the next
                if size > _MAX_META_BYTES:
                    raise self._fail(at, "oversized extended header")
                data = self._read(size)
                if len(data) < size:
                    raise _Truncated(f"unexpected end of data at byte {self.pos}")
                self._skip(-size % _BLOCK)
                if kind == b"x":
                    pax.update(_pax_records(data))
                else:
                    long_name = data.split(b"\0", 1)[0]
                continue
            if kind in (b"g", b"K"):  # global pax header, GNU long link name: not needed
                self._skip(size + (-size % _BLOCK))
                continue
            name = block[:100].split(b"\0", 1)[0]
            if block[257:263] == b"ustar\0":  # POSIX ustar: the name may continue in `prefix`
                prefix = block[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
            name = pax.get(b"path", long_name or name)
            if b"size" in pax:
                try:
                    size = int(pax[b"size"])
                except ValueError:
                    raise self._fail(at, "bad pax size") from None
            is_file = kind in (b"0", b"\0", b"7")
            if kind in (b"1", b"2", b"3", b"4", b"5", b"6"):
                size = 0  # links, devices, directories and FIFOs carry no data
            self._pending = size + (-size % _BLOCK)
            return _Member(name.decode("utf-8", "surrogateescape"), size, offset, is_file)

    def read_data(self, member: _Member) -> bytes:
        data = self._read(member.size)
        if len(data) < member.size:
            raise _Truncated(f"unexpected end of data at byte {self.pos}")
        self._pending -= member.size  # the padding is skipped before the next header
        return data


# --------------------------------------------------------------------------------------------
# Samples


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name, or None for names without a key."""
    while name.startswith("./"):
        name = name[2:]
    directory, _, base = name.rpartition("/")
    if not base or base.startswith("."):
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


@dataclasses.dataclass
class _Group:
    """The members of one key that we need, plus where the group and the next one start."""

    raw: int  # index of the group in its shard, bad and ignorable groups included
    key: str
    offset: int
    image: bytes | None = None
    caption: bytes | None = None
    meta: bytes | None = None
    relevant: bool = False
    next_offset: int = 0
    next_key: str | None = None


def _groups(tar: _TarStream, raw: int, load_from: int) -> Iterator[_Group]:
    """Groups of consecutive members sharing a key. Data is loaded only from group `load_from`
    on, so skipping to a resume point reads headers only."""
    group: _Group | None = None
    while True:
        member = tar.next_member()
        if member is None:
            if group is not None:
                group.next_offset, group.next_key = tar.pos - _BLOCK, None
                yield group
            return
        if not member.is_file:
            continue
        split = _split_name(member.name)
        if split is None:
            continue
        key, ext = split
        if group is None or key != group.key:
            if group is not None:
                group.next_offset, group.next_key = member.offset, key
                yield group
                raw = group.raw + 1
            group = _Group(raw, key, member.offset)
        if ext not in _RELEVANT:
            continue
        group.relevant = True
        if group.raw < load_from or member.size > _MAX_MEMBER_BYTES:
            continue
        if ext in IMAGE_EXTENSIONS:
            if group.image is None:
                group.image = tar.read_data(member)
        elif ext == "txt":
            if group.caption is None:
                group.caption = tar.read_data(member)
        elif group.meta is None:
            group.meta = tar.read_data(member)


def _image_ok(data: bytes) -> bool:
    """Whether the bytes decode as an image (JPEG at 1/8 scale: same bytes read, less work)."""
    from PIL import Image  # only needed to verify images

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("L", (1, 1))
            image.load()
        return True
    except Exception:  # PIL raises many kinds (OSError, SyntaxError, ValueError, struct.error)
        return False


def _parse_json(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _default_open(path: str) -> IO[bytes]:
    from etils import epath  # slow import; on first use

    return epath.Path(path).open("rb")


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except Exception:
        return False


class _Pos(NamedTuple):
    """A point in an epoch's stream: the next group to read."""

    shard_position: int  # index into this epoch's shard order
    raw_offset: int  # groups before it in the shard (bad ones included)
    offset: int  # good samples before it in the shard
    byte_offset: int  # where its first header starts (0 = unknown: read from the start)
    member_key: str | None  # its key, checked after a seek


_START = _Pos(0, 0, 0, 0, None)


class WebDatasetReader:
    """Endless iterator of samples {'key', 'image' (bytes, undecoded), 'caption' (str),
    'json' (dict|None), 'shard' (str), 'index' (int)} for this process.

    'index' is the sample's position among the key groups of its shard (bad ones included), so
    ('shard', 'index') identifies a sample. See the module docstring for order, shuffling,
    checkpoints and bad data. `get_state`/`set_state` give exact resume; `set_states` resumes the
    states of a run with another process count (crate_jax.data.wds_elastic).
    """

    def __init__(self, shards: str | list[str], *, seed: int = 0, process_index: int | None = None,
                 process_count: int | None = None, shuffle_buffer: int = 0,
                 max_bad_fraction: float = 0.5, min_samples_for_bad_check: int = 100,
                 open_fn: OpenFn | None = None, verify_images: bool = True):
        if isinstance(shards, str | os.PathLike):
            all_shards = expand_pattern(os.fspath(shards))
        else:
            all_shards = [os.fspath(s) if isinstance(s, os.PathLike) else str(s) for s in shards]
        if not all_shards:
            raise ValueError("WebDatasetReader: no shards given")
        if process_index is None or process_count is None:
            import jax  # only when needed: keeps jax optional here

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"WebDatasetReader: bad process_index {process_index} for "
                             f"process_count {process_count}")
        if len(all_shards) < process_count:
            raise ValueError(f"WebDatasetReader: {len(all_shards)} shards for {process_count} "
                             "processes; every process needs at least one shard")
        if seed < 0:
            raise ValueError(f"WebDatasetReader: seed must be >= 0, got {seed}")
        if shuffle_buffer < 0:
            raise ValueError(f"WebDatasetReader: shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"WebDatasetReader: max_bad_fraction must be in [0, 1], got "
                             f"{max_bad_fraction}")
        self.num_shards = len(all_shards)
        self.all_shards = all_shards
        self.local_shards: list[str] = all_shards[process_index::process_count]
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        self.shuffle_buffer = shuffle_buffer
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_bad_check = min_samples_for_bad_check
        self.verify_images = verify_images
        self._open = open_fn or _default_open
        self.stats = ReaderStats()
        self._error: BaseException | None = None
        self._gen: Iterator[tuple[_Pos, dict[str, Any], _Pos]] | None = None
        self.elastic_report: dict[str, Any] | None = None  # what set_states did, if elastic
        self._start_epoch(0, _START, index=0, last_emitted=None, quiet_until=None)

    # ---------------------------------------------------------------- iteration

    @property
    def epoch(self) -> int:
        """The epoch of the sample returned last (the one about to be read before any)."""
        return self._epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """Indices into `local_shards` in the order epoch `epoch` visits them."""
        return shard_order(self.seed, epoch, self.process_index, len(self.local_shards))

    def _start_epoch(self, epoch: int, start: _Pos, *, index: int,
                     last_emitted: tuple[int, int] | None,
                     quiet_until: tuple[int, int] | None,
                     plan: list[tuple[int, _Pos]] | None = None) -> None:
        """Begin (or resume at `start`) a pass: epoch `epoch` over this process's shards, or,
        with `plan`, the remainder pass of an elastic resume: (shard index, where to start
        in it) for each shard, in order."""
        if self._gen is not None:
            self._gen.close()  # closes the open shard
        self._epoch = epoch
        self._plan = plan
        self._order = self.epoch_order(epoch) if plan is None else []
        self._heap: list[tuple[int, int, dict[str, Any], _Pos]] = []
        self._next_index = index  # good-sample index, in this epoch, of the next sample read
        self._frontier = index - 1  # index of the last sample read
        self._read_pos = start
        self._last_emitted = last_emitted
        self._quiet_until = quiet_until  # stats up to here were counted before a checkpoint
        self._exhausted = False
        self._delay_block: int | None = None
        self._delays = np.zeros(0, np.int64)
        self._gen = self._read_epoch(start)

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
        heap = self._heap
        while True:
            # The smallest key may go out once the stream has passed it: unread samples have
            # index > frontier and so a key > frontier.
            if heap and (self._exhausted or heap[0][0] <= self._frontier):
                key, index, sample, _ = heapq.heappop(heap)
                self._last_emitted = (key, index)
                return sample
            if self._exhausted:
                if self._next_index == 0 and self._plan is None:
                    raise RuntimeError(
                        f"WebDatasetReader: epoch {self._epoch} of process {self.process_index} "
                        f"yielded no good sample from its {len(self.local_shards)} shards "
                        f"({_name_list(self.local_shards)}); {self.stats.summary()}; "
                        f"shards with bad data: {_name_list(self.stats.bad_shards)}")
                self._start_epoch(self._epoch + 1, _START, index=0, last_emitted=None,
                                  quiet_until=None)
                heap = self._heap
                continue
            assert self._gen is not None
            item = next(self._gen, None)
            if item is None:
                self._exhausted = True
                # Everything to the end of the epoch has been read (and counted) now.
                self._read_pos = _Pos(self._pass_length(), 0, 0, 0, None)
                continue
            pos, sample, next_pos = item
            index = self._next_index
            self._next_index += 1
            self._frontier = index
            self._read_pos = next_pos
            key = index + self._delay(index)
            if self._last_emitted is not None and (key, index) <= self._last_emitted:
                continue  # replaying after set_state: yielded before the checkpoint
            heapq.heappush(heap, (key, index, sample, pos))

    def _delay(self, index: int) -> int:
        if self.shuffle_buffer <= 1:
            return 0
        block = index // _DELAY_BLOCK
        if block != self._delay_block:
            rng = np.random.default_rng(
                [self.seed, self._epoch, self.process_index, _DELAY_TAG, block])
            self._delays = rng.integers(0, self.shuffle_buffer, _DELAY_BLOCK)
            self._delay_block = block
        return int(self._delays[index % _DELAY_BLOCK])

    # ---------------------------------------------------------------- reading

    def _read_epoch(self, start: _Pos) -> Iterator[tuple[_Pos, dict[str, Any], _Pos]]:
        """(position, sample, position after it) for the good samples of the epoch from `start`."""
        for position in range(start.shard_position, self._pass_length()):
            shard, here = self._pass_entry(position)
            yield from self._read_shard(shard, start if position == start.shard_position else here)

    def _pass_length(self) -> int:
        return len(self._order) if self._plan is None else len(self._plan)

    def _pass_entry(self, position: int) -> tuple[str, _Pos]:
        """Shard number `position` of the current pass, and where reading it starts."""
        if self._plan is None:
            return self.local_shards[self._order[position]], _Pos(position, 0, 0, 0, None)
        shard_index, start = self._plan[position]
        return self.all_shards[shard_index], start

    def _counting(self, position: int, raw: int) -> bool:
        """Whether events at (position, raw) are new, i.e. not counted before the checkpoint."""
        if self._quiet_until is None:
            return True
        if (position, raw) >= self._quiet_until:
            self._quiet_until = None
            return True
        return False

    def _read_shard(self, shard: str, start: _Pos) -> Iterator[tuple[_Pos, dict[str, Any], _Pos]]:
        position = start.shard_position
        try:
            f = self._open(shard)
        except Exception as e:  # missing file, permissions, backend errors
            self._bad_shard(shard, position, 0, "unreadable", e)
            return
        next_raw = 0
        try:
            seekable = _seekable(f)
            groups: Iterator[_Group] | None = None
            if start.raw_offset and start.byte_offset and start.member_key and seekable:
                groups = self._seek_groups(f, shard, start)
            if groups is None:
                groups = _groups(_TarStream(f, 0, seekable), 0, start.raw_offset)
            good = start.offset
            for group in groups:
                next_raw = group.raw + 1
                if group.raw < start.raw_offset or not group.relevant:
                    continue
                sample = self._check(group, shard, position)
                if sample is None:
                    continue
                here = _Pos(position, group.raw, good, group.offset, group.key)
                good += 1
                if group.next_key is None:  # clean end of the shard: the next read is elsewhere
                    after = _Pos(position + 1, 0, 0, 0, None)
                else:
                    after = _Pos(position, group.raw + 1, good, group.next_offset, group.next_key)
                yield here, sample, after
        except _NotATar as e:
            self._bad_shard(shard, position, 0, "unreadable", e)
        except _Truncated as e:
            self._bad_shard(shard, position, next_raw, "truncated", e)
        finally:
            try:
                f.close()
            except Exception:
                pass  # nothing useful to do about a failing close of a read-only file

    def _seek_groups(self, f: IO[bytes], shard: str, start: _Pos) -> Iterator[_Group] | None:
        """Groups from the saved byte offset, or None (and rewound) when the file there does not
        start the saved group, e.g. because the shard was rewritten."""
        try:
            f.seek(start.byte_offset)
            groups = _groups(_TarStream(f, start.byte_offset, True), start.raw_offset,
                             start.raw_offset)
            first = next(groups, None)
            if first is not None and first.key == start.member_key:
                return _chain_one(first, groups)
        except (_TarError, OSError, ValueError):
            pass
        log.info("WebDatasetReader: cannot resume %s at byte %d; skipping %d samples from the "
                 "start", shard, start.byte_offset, start.raw_offset)
        try:
            f.seek(0)
        except Exception as e:
            raise _NotATar(f"cannot rewind: {type(e).__name__}: {e}") from e
        return None

    def _check(self, group: _Group, shard: str, position: int) -> dict[str, Any] | None:
        """The sample of a group, or None (counted) when it is bad."""
        counting = self._counting(position, group.raw)
        problem = None
        caption = ""
        if group.image is None:
            problem = "bad_images"
        elif group.caption is None:
            problem = "missing_captions"
        else:
            caption = group.caption.decode("utf-8", "replace")
            if not caption.strip():
                problem = "empty_captions"
            elif self.verify_images and not _image_ok(group.image):
                problem = "bad_images"
        if counting:
            stats = self.stats
            if problem is None:
                stats.samples += 1
            else:
                setattr(stats, problem, getattr(stats, problem) + 1)
                stats.note_bad_shard(shard)
            self._check_bad_fraction()
        if problem is not None:
            return None
        return {"key": group.key, "image": group.image, "caption": caption,
                "json": _parse_json(group.meta), "shard": shard, "index": group.raw}

    def _bad_shard(self, shard: str, position: int, raw: int, kind: str,
                   error: BaseException) -> None:
        if not self._counting(position, raw):
            return
        log.warning("WebDatasetReader: %s shard %s: %s: %s", kind, shard, type(error).__name__,
                    error)
        if kind == "unreadable":
            self.stats.unreadable_shards += 1
        else:
            self.stats.truncated_shards += 1
        self.stats.note_bad_shard(shard)
        self._check_bad_fraction()

    def _check_bad_fraction(self) -> None:
        stats = self.stats
        if stats.seen_samples < self.min_samples_for_bad_check:
            return
        fraction = stats.bad_fraction
        if fraction > self.max_bad_fraction:
            raise RuntimeError(
                f"WebDatasetReader: too much bad data in process {self.process_index}: bad "
                f"fraction {fraction:.3f} > max_bad_fraction {self.max_bad_fraction} after "
                f"{stats.seen_samples} samples ({stats.summary()}); shards with bad data "
                f"(most recent last): {_name_list(stats.bad_shards)}")

    # ---------------------------------------------------------------- checkpoints

    def _config(self) -> dict[str, int]:
        return {"num_shards": self.num_shards, "process_index": self.process_index,
                "process_count": self.process_count, "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer}

    def get_state(self) -> dict[str, Any]:
        """A small JSON-serialisable checkpoint of the reader (see the module docstring).

        'shard_position', 'offset', 'raw_offset', 'byte_offset', 'member_key' and 'index' locate
        the oldest sample not yet yielded (with no shuffle buffer: the next one);
        'last_emitted' is the sort key of the last yielded sample of the epoch; 'frontier' the
        index of the last sample read; 'remainder' the plan of an elastic resume's remainder
        pass ([shard index, raw_offset, offset, byte_offset, member_key] per shard), else None.
        """
        if self._heap:
            _, index, _, pos = min(self._heap, key=lambda item: item[1])
        else:
            index, pos = self._next_index, self._read_pos
        read_until = [self._read_pos.shard_position, self._read_pos.raw_offset]
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "epoch": self._epoch,
            "shard_position": pos.shard_position,
            "offset": pos.offset,
            "raw_offset": pos.raw_offset,
            "byte_offset": pos.byte_offset,
            "member_key": pos.member_key,
            "index": index,
            "last_emitted": None if self._last_emitted is None else list(self._last_emitted),
            "read_until": read_until,
            "frontier": self._frontier,
            "remainder": None if self._plan is None else [
                [shard, *start[1:]] for shard, start in self._plan],
            "stats": dataclasses.asdict(self.stats),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where the reader that produced `state` was."""
        if state.get("version") not in (1, _STATE_VERSION):
            raise ValueError(f"WebDatasetReader: unknown state version {state.get('version')}")
        if state["config"] != self._config():
            raise ValueError(f"WebDatasetReader: state is for {state['config']}, this reader is "
                             f"{self._config()}")
        self.stats = ReaderStats(**{**state["stats"],
                                    "bad_shards": list(state["stats"]["bad_shards"])})
        self._error = None
        start = _Pos(int(state["shard_position"]), int(state["raw_offset"]),
                     int(state["offset"]), int(state["byte_offset"]), state["member_key"])
        last = state["last_emitted"]
        plan = state.get("remainder")
        self._start_epoch(int(state["epoch"]), start, index=int(state["index"]),
                          last_emitted=None if last is None else (int(last[0]), int(last[1])),
                          quiet_until=tuple(state["read_until"]),
                          plan=None if plan is None else [
                              (int(e[0]), _Pos(k, int(e[1]), int(e[2]), int(e[3]), e[4]))
                              for k, e in enumerate(plan)])

    def set_states(self, states: list[dict[str, Any]]) -> None:
        """Resume from the states of all processes of a run (process order), which may have had
        another process count: exact when it had this one; otherwise at shard granularity, see
        crate_jax.data.wds_elastic (the samples it repeats or skips are logged)."""
        from crate_jax.data import wds_elastic

        if len(states) == self.process_count:
            self.set_state(states[self.process_index])
            return
        self.elastic_report = wds_elastic.resume(self, states)


def shard_order(seed: int, epoch: int, process_index: int, num_local: int) -> list[int]:
    """The order (indices into its local shards) in which a process visits them in `epoch`."""
    return np.random.default_rng([seed, epoch, process_index]).permutation(num_local).tolist()


def _chain_one(first: _Group, rest: Iterator[_Group]) -> Iterator[_Group]:
    yield first
    yield from rest


# --------------------------------------------------------------------------------------------
# Writing


def write_shards(directory: str | os.PathLike[str], samples: Iterable[dict[str, Any]],
                 samples_per_shard: int, prefix: str = "") -> list[str]:
    """Write img2dataset-style shards `{prefix}{00000}.tar` and return their paths.

    Each sample dict has 'key', 'image' (bytes), 'caption' (str, or None for no '.txt'),
    optionally 'json' (dict) and 'ext' (image extension, default 'jpg'). Members are
    `{key}.{ext}`, `{key}.txt`, `{key}.json`, with fixed metadata so the bytes are reproducible.
    """
    from etils import epath

    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    root = epath.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    tar: tarfile.TarFile | None = None
    handle: IO[bytes] | None = None

    def add(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        assert tar is not None
        tar.addfile(info, io.BytesIO(data))

    try:
        for i, sample in enumerate(samples):
            if i % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                    handle.close()  # type: ignore[union-attr]
                path = root / f"{prefix}{len(paths):05d}.tar"
                paths.append(os.fspath(path))
                handle = path.open("wb")
                tar = tarfile.open(fileobj=handle, mode="w")
            key = str(sample["key"])
            add(f"{key}.{sample.get('ext', 'jpg').lstrip('.')}", bytes(sample["image"]))
            if sample.get("caption") is not None:
                add(f"{key}.txt", sample["caption"].encode("utf-8"))
            if sample.get("json") is not None:
                add(f"{key}.json", json.dumps(sample["json"], sort_keys=True).encode("utf-8"))
    finally:
        if tar is not None:
            tar.close()
        if handle is not None:
            handle.close()
    return paths
