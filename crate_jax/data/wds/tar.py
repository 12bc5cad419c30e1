"""Tar shards read as streams of samples, with positions to resume from.

A shard is a POSIX tar. A sample is a run of consecutive members that share a key: the member
name up to the first '.' of its basename ('dir/000123.jpg' -> key 'dir/000123', extension 'jpg').
The image is the first member with extension jpg|jpeg|png|webp, the caption the '.txt' member,
the metadata the optional '.json' member. Directories, hidden files and other extensions are
ignored.

Our own streaming parser rather than `tarfile`: tarfile quietly ends the archive at a short or
garbled header, so a cut shard would look complete. Here a missing end-of-archive block or a bad
header checksum mid-shard is reported as truncation (`Truncated`); a file whose first header
cannot be read is `NotATar`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Iterator
from typing import IO, NamedTuple

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
_RELEVANT = IMAGE_EXTENSIONS | {"txt", "json"}
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
# A corrupt size field must not make us allocate gigabytes; img2dataset members are far smaller.
_MAX_MEMBER_BYTES = 256 << 20
_MAX_META_BYTES = 1 << 20

log = logging.getLogger(__name__)

class TarError(Exception):
    """A shard that is not a readable tar from some byte on."""


class NotATar(TarError):
    """The first header could not be read: an empty file or not a tar at all."""


class Truncated(TarError):
    """The archive ends early or is damaged after at least one good header."""


class Member(NamedTuple):
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
            raise Truncated("corrupt pax header") from None
        if length <= 0:
            raise Truncated("corrupt pax header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


class TarStream:
    """Members of a tar read front to back from a binary file object, starting at byte `pos`."""

    def __init__(self, f: IO[bytes], pos: int, seekable: bool):
        self._f, self.pos, self._start, self._seekable = f, pos, pos, seekable
        self._pending = 0  # unread data + padding of the last member returned

    def _fail(self, at: int, message: str) -> TarError:
        kind = NotATar if at == self._start else Truncated
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
                raise Truncated(f"unexpected end of data at byte {self.pos}")
            n -= len(chunk)

    def next_member(self) -> Member | None:
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
                    raise Truncated(f"unexpected end of data at byte {self.pos}")
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
            return Member(name.decode("utf-8", "surrogateescape"), size, offset, is_file)

    def read_data(self, member: Member) -> bytes:
        data = self._read(member.size)
        if len(data) < member.size:
            raise Truncated(f"unexpected end of data at byte {self.pos}")
        self._pending -= member.size  # the padding is skipped before the next header
        return data



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
class Group:
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


def groups(tar: TarStream, raw: int, load_from: int) -> Iterator[Group]:
    """Groups of consecutive members sharing a key. Data is loaded only from group `load_from`
    on, so skipping to a resume point reads headers only."""
    group: Group | None = None
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
            group = Group(raw, key, member.offset)
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



def shard_groups(f: IO[bytes], shard: str, raw_offset: int, byte_offset: int,
                 member_key: str | None, seekable: bool) -> Iterator[Group]:
    """The groups of an opened shard from group `raw_offset` on (earlier ones are skipped
    reading headers only). With a saved `byte_offset` and `member_key` on a seekable file,
    reading starts there; when the file there does not start that group (e.g. the shard was
    rewritten), it falls back to skipping from the start."""
    if raw_offset and byte_offset and member_key and seekable:
        first = None
        try:
            f.seek(byte_offset)
            found = groups(TarStream(f, byte_offset, True), raw_offset, raw_offset)
            first = next(found, None)
        except (TarError, OSError, ValueError):
            pass
        if first is not None and first.key == member_key:
            yield first
            yield from found  # errors from here on are the shard's own
            return
        log.info("WebDatasetReader: cannot resume %s at byte %d; skipping %d samples from the "
                 "start", shard, byte_offset, raw_offset)
        try:
            f.seek(0)
        except Exception as e:
            raise NotATar(f"cannot rewind: {type(e).__name__}: {e}") from e
    yield from groups(TarStream(f, 0, seekable), 0, raw_offset)
