"""Spool segments: a writer's large message bodies appended to one file per group, outside the lock.

On SQLite, a 100 KB message written into its queue row is written twice under the write lock
that the workers share (into the WAL, then by the checkpoint into the database file), and that
lock decides how fast 100 KB messages are taken in (docs/decisions/0019, 0026).  Here a group's
messages of ``SEGMENT_MIN`` bytes or more (and below the spool threshold, above which each has a
file of its own) are appended to the writer's current segment file with one ``writev`` and made
durable with one ``fdatasync``, *before* the group takes the lock; the rows then hold only the
header block, the segment's path and the message's offset (``spool_offset``; its length is the
row's ``size``).  Both workers flush their segments at the same time, and the lock is held for
small rows only.

A segment is sealed after ``SEGMENT_BYTES`` or ``SEGMENT_AGE`` seconds, and removed once every
message in it is done: at once when this process delivered them (the common case, handed off
from memory), otherwise when the database says so (:meth:`SegmentLog.waiting` and
:meth:`SegmentLog.settle`: another process delivered one, an acceptance failed after its bytes
were written).  A segment left by a crash
is read by the claim path like any spooled message and swept with the spool files
(``history.sweep_spool``) once no undelivered row names it.  PostgreSQL keeps bodies in rows:
its rows are any node's to deliver.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import spool

SEGMENT_MIN = 32 * 1024            # smaller bodies stay in their row (measured: 0026)
SEGMENT_BYTES = 8 * 1024 * 1024    # a segment is sealed past this size ...
SEGMENT_AGE = 2.0                  # ... or this many seconds after it was begun
CHECK_AFTER = 5.0                  # the database is asked about a sealed segment's messages this long after ...
CHECK_MAX = 600.0                  # ... then less and less often (a segment of deferred messages may wait days)
SUFFIX = ".seg"


def is_segment(relative: str | None) -> bool:
    return bool(relative) and str(relative).endswith(SUFFIX)


@dataclass
class _Segment:
    relative: str
    fd: int
    begun: float
    size: int = 0
    live: set[str] = field(default_factory=set)    # queue ids written here and not known to be done
    sealed_at: float | None = None
    check_at: float = 0.0                           # when to ask the database next (once sealed)
    check_every: float = CHECK_AFTER


class SegmentLog:
    """One writer's segments.  :meth:`stage` runs in the writer's thread; :meth:`release`,
    :meth:`seal_idle`, :meth:`waiting` and :meth:`settle` on the event loop: a lock guards the
    bookkeeping, never the file I/O (only :meth:`stage` writes, one group at a time).  A sealed
    segment with nothing live goes at the next release, seal or answer from the database."""

    def __init__(self, state_dir: Path | str, minimum: int = SEGMENT_MIN, maximum: int | None = None,
                 roll_bytes: int = SEGMENT_BYTES, roll_age: float = SEGMENT_AGE,
                 check_after: float = CHECK_AFTER) -> None:
        self._state = Path(state_dir)
        self._minimum, self._maximum = minimum, maximum
        self._roll_bytes, self._roll_age, self._check_after = roll_bytes, roll_age, check_after
        self._lock = threading.Lock()
        self._current: _Segment | None = None
        self._writing = False
        self._sealed: dict[str, _Segment] = {}
        self._where: dict[str, _Segment] = {}           # queue id -> its segment

    def wanted(self, values: dict[str, Any]) -> bool:
        body = values.get("body")
        return (isinstance(body, bytes) and len(body) >= self._minimum and not values.get("spool_path")
                and (self._maximum is None or len(body) <= self._maximum))

    def stage(self, items: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Append the bodies of ``items`` (queue rows' values) that belong in a segment, durably.
        Returns, by ``id()`` of each such values dict, the values to INSERT instead: the header
        block as body, the segment and the offset.  The dicts given are not changed (a message
        handed to delivery is sent from memory)."""
        found = [v for v in items if self.wanted(v)]
        if not found:
            return {}
        with self._lock:
            segment = self._current
            if segment is not None and (segment.size >= self._roll_bytes
                                        or time.monotonic() - segment.begun >= self._roll_age):
                self._seal(segment)
                segment = None
            self._writing = True
        try:
            if segment is None:
                segment = self._begin()
            offset = segment.size
            out: dict[int, dict[str, Any]] = {}
            for values in found:
                body: bytes = values["body"]
                end = body.find(b"\r\n\r\n")
                head = body if end < 0 else body[:end + 4]
                out[id(values)] = {**values, "body": head, "spool_path": segment.relative, "spool_offset": offset}
                offset += len(body)
            try:
                _write_all(segment.fd, [v["body"] for v in found])
                os.fdatasync(segment.fd)
            except BaseException:
                with self._lock:                # what was half written is nobody's: a new file next time
                    self._seal(segment)
                raise
            with self._lock:
                segment.size = offset
                for values in found:
                    segment.live.add(values["id"])
                    self._where[values["id"]] = segment
            return out
        finally:
            with self._lock:
                self._writing = False

    def release(self, queue_id: str) -> None:
        """``queue_id`` is done (its outcome committed): its segment goes once nothing in it is live."""
        with self._lock:
            segment = self._where.pop(queue_id, None)
            if segment is None:
                return
            segment.live.discard(queue_id)
            gone = segment.sealed_at is not None and not segment.live
            if gone:
                self._sealed.pop(segment.relative, None)
        if gone:
            spool.remove_file(self._state, segment.relative)

    def seal_idle(self) -> None:
        """Seal the current segment once it is old enough and no group is writing to it."""
        with self._lock:
            segment = self._current
            if segment is None or self._writing or time.monotonic() - segment.begun < self._roll_age:
                return
            self._seal(segment)
        self._remove_empty()

    def waiting(self) -> dict[str, list[str]]:
        """The live ids of the sealed segments due for a question to the database: ``CHECK_AFTER``
        seconds after the seal, then twice as long after each answer that kept one, up to ``CHECK_MAX``."""
        now = time.monotonic()
        with self._lock:
            return {s.relative: sorted(s.live) for s in self._sealed.values() if now >= s.check_at}

    def settle(self, relative: str, still_live: Iterable[str]) -> None:
        """The database's answer for a sealed segment: of its ids, only ``still_live`` are undelivered."""
        keep = set(still_live)
        with self._lock:
            segment = self._sealed.get(relative)
            if segment is None:
                return
            for queue_id in segment.live - keep:
                segment.live.discard(queue_id)
                self._where.pop(queue_id, None)
            segment.check_every = min(segment.check_every * 2, CHECK_MAX)
            segment.check_at = time.monotonic() + segment.check_every
        self._remove_empty()

    def close(self) -> None:
        """At stop: seal; what is all done goes, the rest stays for the claim path and the sweep."""
        with self._lock:
            if self._current is not None and not self._writing:
                self._seal(self._current)
        self._remove_empty()

    def files(self) -> list[str]:
        with self._lock:
            return sorted([*self._sealed, *([self._current.relative] if self._current else [])])

    def _begin(self) -> _Segment:
        directory = self._state / spool.SPOOL_DIR / spool.host_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        relative = f"{spool.host_prefix()}{os.getpid()}-{secrets.token_hex(6)}{SUFFIX}"
        fd = os.open(self._state / relative, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)                     # the file's name is durable before any row names it
            finally:
                os.close(dir_fd)
        except BaseException:
            os.close(fd)
            raise
        segment = _Segment(relative, fd, time.monotonic())
        with self._lock:
            self._current = segment
        return segment

    def _seal(self, segment: _Segment) -> None:
        """Under the lock."""
        if segment is self._current:
            self._current = None
        if segment.sealed_at is None:
            segment.sealed_at = time.monotonic()
            segment.check_at = segment.sealed_at + self._check_after
            os.close(segment.fd)
            self._sealed[segment.relative] = segment

    def _remove_empty(self) -> None:
        with self._lock:
            empty = [s for s in self._sealed.values() if not s.live]
            for segment in empty:
                del self._sealed[segment.relative]
        for segment in empty:
            spool.remove_file(self._state, segment.relative)


def _write_all(fd: int, pieces: list[bytes]) -> None:
    """``writev`` until every byte is written (a regular file takes all at once, barring trouble)."""
    views = [memoryview(p) for p in pieces if p]
    while views:
        written = os.writev(fd, views[:1024])       # IOV_MAX
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def read(state_dir: Path | str, relative: str, offset: int, size: int) -> bytes:
    """A message of a segment (for the claim path: a message held in no process's memory)."""
    path = spool.path_of(Path(state_dir), relative)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"spool segment {relative} is short: {len(data)} of {size} bytes at {offset}")
    return data


__all__ = ["SEGMENT_MIN", "SegmentLog", "is_segment", "read"]
