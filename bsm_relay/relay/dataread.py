"""SMTP in, the DATA phase: read a message body in large chunks instead of line by line.

aiosmtpd reads DATA one line at a time (a ``readuntil`` and a few list operations per line,
about two thirds of all CPU at 100 KB).  This reader asks the stream for the end-of-data
sequence itself, so a whole socket read is taken in one step, and does the per-line work
(dot-stuffing, line length) with bytes operations over the chunk.

Smuggling (CATALOGUE P1-P11): only a real ``CRLF . CRLF`` ends the data (the start of the
data counts as a line start, so ``. CRLF`` first is an empty message).  A bare LF or a bare
CR before or after the dot never ends it: such bytes stay in the message, which intake then
refuses as a whole (``msg.bad_line_ending``, ``550 5.6.0``; docs/decisions/0003).  Nothing
after the terminator is consumed: pipelined commands stay in the stream for the command loop.

Limits: past ``size_limit`` the data is discarded as it arrives (memory stays bounded) and
the answer after the final dot is ``msg.too_big``; a line longer than ``LINE_LIMIT`` bytes
(with its CRLF, dot-stuffing included, as aiosmtpd counts it: 999 characters pass, 1000 do
not) discards the message and answers ``msg.line_too_long``.  Either way nothing is queued.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

from . import scan

END = b"\r\n.\r\n"
# RFC 5321 4.5.3.1.6: 998 octets + CRLF, plus one for a transparency dot (aiosmtpd's limit).
LINE_LIMIT = 1001
_PREFIXES = (END[:4], END[:3], END[:2], END[:1])


@dataclass(frozen=True)
class Data:
    """What the DATA phase produced: the unstuffed message, or the reason it was refused."""

    content: bytes            # empty when refused
    size: int                 # bytes received on the wire before the final dot
    refusal: str | None = None  # catalogue reason: "msg.too_big" or "msg.line_too_long"


def _partial(tail: bytes) -> int:
    """Length of the longest end of ``tail`` that begins the end-of-data sequence."""
    for prefix in _PREFIXES:
        if tail.endswith(prefix):
            return len(prefix)
    return 0


class _Lines:
    """Longest line seen so far, across chunk edges (counted up to each LF, LF included)."""

    __slots__ = ("run", "too_long")

    def __init__(self) -> None:
        self.run = 0          # bytes since the last LF
        self.too_long = False

    def feed(self, piece: bytes) -> None:
        if self.too_long:
            return
        last = piece.rfind(b"\n")
        if last < 0:
            self.run += len(piece)
            self.too_long = self.run > LINE_LIMIT
            return
        if self.run + last + 1 > LINE_LIMIT:
            # Some line in here may be too long.  The first one continues the last piece's; after
            # it, each window of LINE_LIMIT bytes must hold an LF: jump to the last LF of each
            # window (a few rfind calls per 64 KB piece, no list of its lines).
            first = piece.find(b"\n")
            if self.run + first + 1 > LINE_LIMIT:
                self.too_long = True
                return
            pos = first + 1
            while last + 1 - pos > LINE_LIMIT:
                lf = piece.rfind(b"\n", pos, pos + LINE_LIMIT)
                if lf < 0:
                    self.too_long = True
                    return
                pos = lf + 1
        self.run = len(piece) - last - 1
        self.too_long = self.run > LINE_LIMIT


def unstuff(parts: list[bytes]) -> bytes:
    """Join raw DATA pieces (the final ``. CRLF`` already cut off) and undo dot-stuffing.

    RFC 5321 4.5.2: a line that begins with a dot loses that dot.  Pieces are unstuffed one
    by one (an occurrence split across two pieces is handled at the seam).
    """
    unstuffer = _Unstuffer()
    return b"".join(unstuffer.feed(raw) for raw in parts)


class _Unstuffer:
    """Dot-stuffing undone piece by piece, across the seams between pieces."""

    __slots__ = ("before",)

    def __init__(self) -> None:
        self.before = b"\r\n"     # the last raw bytes before this piece: the data begins a line

    def feed(self, raw: bytes) -> bytes:
        if not raw:
            return raw
        piece = raw
        if self.before.endswith(b"\r\n") and piece[:1] == b".":
            piece = piece[1:]
        elif self.before.endswith(b"\r") and piece[:2] == b"\n.":
            piece = piece[:1] + piece[2:]
        if scan.contains(piece, b"\r\n."):
            piece = piece.replace(b"\r\n.", b"\r\n")
        self.before = (self.before + raw)[-2:] if len(raw) < 2 else raw[-2:]
        return piece


async def read_data(reader: asyncio.StreamReader, size_limit: int | None) -> Data:
    """Read one message body from ``reader`` up to and including the real ``CRLF . CRLF``.

    Raises ``asyncio.IncompleteReadError`` when the connection ends first (nothing is kept).
    """
    # The message is written into one growing buffer as it arrives, unstuffed piece by piece,
    # and the last three raw bytes are held back (at the end they are the final ". CRLF"): the
    # pieces are never all held at once beside the joined message (a 25 MB message costs its
    # size once here, not twice).
    out: io.BytesIO | None = io.BytesIO()
    unstuffer = _Unstuffer()
    held = b""
    size = 0
    lines = _Lines()
    too_big = False
    tail = b"\r\n"            # what came before the data: the CRLF that ended the DATA command
    while True:
        matched = _partial(tail)
        if matched:
            # The end may straddle what we hold and what comes next: read exactly what would
            # complete it, never more, so bytes after the final dot stay in the stream.
            piece = await reader.readexactly(len(END) - matched)
            done = tail[-matched:] + piece == END
        else:
            try:
                piece = await reader.readuntil(END)
                done = True
            except asyncio.LimitOverrunError as exc:
                # Not found within the stream's limit: take what cannot hold the start of it.
                piece = await reader.read(exc.consumed)
                done = False
        size += len(piece)
        lines.feed(piece)
        if size_limit and size - 3 > size_limit:
            too_big = True
        if too_big or lines.too_long:
            out = None        # keep reading to the final dot, keep nothing
        elif out is not None:
            data = held + piece
            out.write(unstuffer.feed(data[:-3]))
            held = data[-3:]
        tail = (tail + piece)[-4:] if len(piece) < 4 else piece[-4:]
        if done:
            break
    size -= 3                 # the final ". CRLF"
    if too_big or (size_limit and size > size_limit):
        return Data(b"", size, "msg.too_big")
    if lines.too_long or out is None:
        return Data(b"", size, "msg.line_too_long")
    return Data(out.getvalue(), size)
