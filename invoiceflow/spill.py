"""JSON object members kept in an unlinked temporary file instead of the heap.

A run holds every finished manifest entry until it ends, because every commit writes the
whole manifest, but it rarely reads one again. Kept in the heap, as text, they made a
run's memory grow with its length (issue 13 #4): at 10,000 invoices, ~6 MB of text and
the allocator's fragmentation around it, plus a 5 MB body built whole at each commit.
Here each member (`,"key":{...}`) is appended to a file: its bytes live in the kernel's
page cache, which the kernel may write out and reclaim, and a commit copies the live
ones into its body file in large chunks, in the order they were added.

The file is unlinked at creation (`tempfile.TemporaryFile`, under `TMPDIR`), so nothing
is left behind when the process ends, however it ends.
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import BinaryIO

import orjson

_LENGTH_BITS = 32
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_FLUSH_AT = 256 * 1024  # members are buffered and written to the file this much at a time
_COPY_CHUNK = 1024 * 1024  # bytes copied at a time into a body


def _prefix(key: str) -> bytes:
    """What precedes `key`'s value in its member, which follows another: `,"key":`."""
    return b"," + orjson.dumps(key) + b":"


def _span(handle: int) -> tuple[int, int]:
    """Where member `handle` starts and ends in the file."""
    start = handle >> _LENGTH_BITS
    return start, start + (handle & _LENGTH_MASK)


class SpilledMembers:
    """Append-only members, each known by the handle `add` returns; `drop` marks one dead.

    Thread-safe: the manifest's thread adds while the event loop may read.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as self)
        self._fd = self._file.fileno()
        self._buffer = bytearray()
        self._flushed = 0  # bytes in the file; the buffer follows them
        self._dead: list[int] = []
        self._lock = threading.Lock()

    def add(self, key: str, value: bytes) -> int:
        """Append `key`'s member; its handle (offset and length packed in one int)."""
        data = _prefix(key) + value
        with self._lock:
            handle = (self._flushed + len(self._buffer)) << _LENGTH_BITS | len(data)
            self._buffer += data
            if len(self._buffer) >= _FLUSH_AT:
                self._flush()
        return handle

    def value(self, key: str, handle: int) -> bytes:
        """The JSON value of `key`'s member `handle`."""
        start, end = _span(handle)
        start += len(_prefix(key))
        with self._lock:
            if start >= self._flushed:
                return bytes(self._buffer[start - self._flushed : end - self._flushed])
            return os.pread(self._fd, end - start, start)

    def drop(self, handle: int) -> None:
        """Leave member `handle` out of every later copy (its key was replaced or deleted)."""
        self._dead.append(handle)

    def copy_live(self, out: BinaryIO, *, first: bool) -> None:
        """Write the live members to `out` in the order added.

        `first`: nothing precedes them in their object, so the first one's comma goes.
        """
        with self._lock:
            self._flush()
        position = 0
        for start, end in [*self._dead_ranges(), (self._flushed, self._flushed)]:
            if start > position:
                skip = 1 if first else 0
                self._copy(out, position + skip, start)
                first = False
            position = end

    def _dead_ranges(self) -> list[tuple[int, int]]:
        return sorted(_span(handle) for handle in self._dead)

    def _copy(self, out: BinaryIO, start: int, end: int) -> None:
        while start < end:
            chunk = os.pread(self._fd, min(_COPY_CHUNK, end - start), start)
            out.write(chunk)
            start += len(chunk)

    def _flush(self) -> None:
        if self._buffer:
            os.pwrite(self._fd, self._buffer, self._flushed)
            self._flushed += len(self._buffer)
            self._buffer.clear()
