"""A shard file read ahead by a background thread, so that I/O overlaps with parsing.

Reading a tar stream is a long run of small reads. On a local disk the kernel reads ahead; on
gs:// every new block is a round trip (tens of ms) that the reading thread would otherwise wait
for. `ReadAhead` keeps up to ``depth`` chunks of ``chunk`` bytes in flight per open shard, so the
round trips of all open shards (see `interleave`) overlap with each other and with decoding.

Seeks: an absolute seek before the first read goes straight to the file (that is how a resume
starts at a saved byte offset); a forward seek by less than ``max_skip`` bytes is read and
dropped from the buffer (tar padding, skipped members); any other seek restarts the thread at
the new position. Errors of the file are raised by the read that reaches them.
"""

from __future__ import annotations

import io
import queue
import threading
from typing import IO

CHUNK = 1 << 20
DEPTH = 4
_MAX_SKIP = 16 << 20


class ReadAhead(io.RawIOBase):
    def __init__(self, f: IO[bytes], chunk: int = CHUNK, depth: int = DEPTH,
                 max_skip: int = _MAX_SKIP):
        self._f, self._chunk, self._depth, self._max_skip = f, chunk, depth, max_skip
        self._pos = 0  # logical position: bytes handed out (plus skips)
        self._buffer = memoryview(b"")
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._ended = False

    # ------------------------------------------------------------------ background thread

    def _fill(self, stop: threading.Event, out: queue.Queue) -> None:
        while not stop.is_set():
            try:
                data = self._f.read(self._chunk)
            except BaseException as e:  # handed to the reader, raised by its read
                data = e
            while not stop.is_set():
                try:
                    out.put(data, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(data, bytes | bytearray) or not data:
                return

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(self._depth)
        self._thread = threading.Thread(target=self._fill, args=(self._stop, self._queue),
                                        daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._buffer, self._ended = memoryview(b""), False

    # ------------------------------------------------------------------ file interface

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        try:
            return bool(self._f.seekable())
        except Exception:
            return False

    def tell(self) -> int:
        return self._pos

    def _more(self) -> bool:
        """Refill the buffer from the thread; False at the end of the file."""
        if self._ended:
            return False
        if self._thread is None:
            self._start()
        data = self._queue.get()
        if isinstance(data, BaseException):
            self._ended = True
            raise data
        if not data:
            self._ended = True
            return False
        self._buffer = memoryview(data)
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._buffer and not self._more():
            return 0
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if len(self._buffer) >= size:  # the common case: one slice of the current chunk
            data = self._buffer[:size].tobytes()
            self._buffer = self._buffer[size:]
            self._pos += size
            return data
        parts, want = [], size
        while want > 0 and (self._buffer or self._more()):
            part = self._buffer[:want]
            self._buffer = self._buffer[len(part):]
            parts.append(part)
            want -= len(part)
        self._pos += size - want
        return b"".join(parts)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset}.get(whence)
        if target is None:  # from the end: let the file work it out
            self._halt()
            self._pos = self._f.seek(offset, whence)
            return self._pos
        if self._thread is not None and 0 <= target - self._pos <= self._max_skip:
            while self._pos < target and (self._buffer or self._more()):
                n = min(target - self._pos, len(self._buffer))
                self._buffer = self._buffer[n:]
                self._pos += n
            self._pos = target  # past the end, as a file would allow
            return target
        self._halt()
        self._f.seek(target)
        self._pos = target
        return target

    def close(self) -> None:
        if not self.closed:
            self._halt()
            try:
                self._f.close()
            finally:
                super().close()
