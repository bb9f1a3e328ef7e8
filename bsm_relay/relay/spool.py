"""Spool files: large messages on disk instead of in the queue row.

A message above ``[queue] spool_threshold`` is written once, at acceptance, as its rewritten
header block followed by the original body straight from the bytes received (no copy of the
message is built in memory), fsynced with its directory before the queue row that names it is
committed, and so before the 250.  Delivery reads it in pieces: the DKIM body hash and the
dot-stuffed DATA stream each hold about one piece, never the whole message.  The file is
removed once the item is done.

Files live under ``spool/<host>/``: with several nodes on one PostgreSQL, a spooled item is
claimed only by the node that holds its file (``queue.claim``), so a node that is down delays
its own large messages until it is back, as with any MTA's local queue, and never makes another
node fail on a file it cannot read.  Small messages stay in the database, deliverable anywhere.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SPOOL_DIR = "spool"
CHUNK = 1 << 20


def enabled(threshold: int) -> bool:
    return threshold > 0


def host_prefix() -> str:
    """The spool paths of this host (what ``claim`` lets this node take)."""
    return f"{SPOOL_DIR}/{_HOST}/"


def host_dir() -> str:
    return _HOST


_HOST = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname()) or "host"


def write(state_dir: Path, queue_id: str, head: bytes, body: memoryview | bytes) -> str:
    """Write ``head`` + ``body`` durably; return the path relative to ``state_dir``."""
    directory = state_dir / SPOOL_DIR / _HOST
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    relative = f"{host_prefix()}{queue_id}-{secrets.token_hex(4)}.eml"
    path = state_dir / relative
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(head)
            view = memoryview(body)
            for start in range(0, len(view), CHUNK):
                out.write(view[start:start + CHUNK])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return relative


def path_of(state_dir: Path, relative: str) -> Path:
    path = (state_dir / relative).resolve()
    if path.parent.parent != (state_dir / SPOOL_DIR).resolve():      # only ever our own files
        raise ValueError(f"not a spool file: {relative!r}")
    return path


def remove(state_dir: Path, relative: str | None) -> None:
    """Remove a message's own spool file.  A segment (``relay/segments.py``) holds other messages
    too: it goes only through its writer's bookkeeping or the sweep (:func:`remove_file`)."""
    if relative and not relative.endswith(".seg"):
        remove_file(state_dir, relative)


def remove_file(state_dir: Path, relative: str | None) -> None:
    if relative:
        try:
            path_of(state_dir, relative).unlink(missing_ok=True)
        except (OSError, ValueError):
            pass


def old_files(state_dir: Path, older_than: float, now: float, every_host: bool = False) -> list[str]:
    """This host's spool files and segments last written more than ``older_than`` seconds before
    ``now``, as relative paths (what a queue row names), for the sweep of files no row names any
    more.  ``every_host``: those of every host directory (SQLite: all of them are this relay's)."""
    root = state_dir / SPOOL_DIR
    try:
        hosts = [e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False)] if every_host else [_HOST]
    except FileNotFoundError:
        return []
    found = []
    for host in hosts:
        try:
            entries = list(os.scandir(root / host))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if entry.name.endswith((".eml", ".seg")) and entry.is_file(follow_symlinks=False) \
                        and entry.stat(follow_symlinks=False).st_mtime < now - older_than:
                    found.append(f"{SPOOL_DIR}/{host}/{entry.name}")
            except OSError:
                continue
    return found


def line_pieces(read: Callable[[int], bytes], chunk: int = CHUNK) -> Iterator[bytes]:
    """What ``read(chunk)`` returns, cut after the last CRLF of each read (the rest goes with the
    next piece): every piece holds whole lines, only the last may lack its CRLF."""
    rest = b""
    while True:
        data = read(chunk)
        if not data:
            if rest:
                yield rest
            return
        piece = rest + data
        cut = piece.rfind(b"\r\n")
        if cut < 0:                           # one long line: read on to its end
            rest = piece
            continue
        rest = piece[cut + 2:]
        yield piece[:cut + 2]


@dataclass(frozen=True)
class Spooled:
    """A message to send from a spool file: ``prefix`` (the DKIM signature and the header block
    with its blank line), then the file's bytes from ``offset`` on (the body)."""

    prefix: bytes
    path: Path
    offset: int

    def __len__(self) -> int:
        return len(self.prefix) + self.path.stat().st_size - self.offset

    def body_pieces(self, chunk: int = CHUNK) -> Iterator[bytes]:
        """The body in pieces that end after a CRLF (whole lines; a longer line is read whole)."""
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            yield from line_pieces(fh.read, chunk)

    def isascii(self) -> bool:
        return self.prefix.isascii() and all(piece.isascii() for piece in self.body_pieces())


__all__ = ["CHUNK", "Spooled", "enabled", "host_dir", "host_prefix", "line_pieces", "path_of", "remove", "remove_file",
           "write"]
