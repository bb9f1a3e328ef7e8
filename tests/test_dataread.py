"""The chunked DATA reader (``relay/dataread.py``) against a line-by-line reference.

The reader is fed through a real ``asyncio.StreamReader`` with the limit aiosmtpd uses, in
every split the tests can think of: the end-of-data sequence cut at each offset, stuffed dots
on chunk edges, long lines, the size limit.  What must hold: the message is the one a
line-by-line reader (RFC 5321 4.5.2) sees, nothing after the final dot is consumed, and only
a real CRLF . CRLF ends the data.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsm_relay.relay.dataread import LINE_LIMIT, _Lines, read_data

AFTER = b"MAIL FROM:<next@example.org>\r\n"


def reference(wire: bytes) -> tuple[bytes, bytes] | None:
    """Line-by-line reading: (message, what follows the final dot), or None if it never ends."""
    lines: list[bytes] = []
    pos = 0
    while True:
        end = wire.find(b"\r\n", pos)
        if end < 0:
            return None
        line = wire[pos:end + 2]
        pos = end + 2
        if line == b".\r\n":
            return b"".join(lines), wire[pos:]
        lines.append(line[1:] if line.startswith(b".") else line)


async def feed(wire: bytes, cuts: list[int], size_limit: int | None = None):
    """Hand ``wire`` to a reader in pieces cut at ``cuts``, as a socket might deliver it."""
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(wire)), len(wire)]

    async def writer() -> None:
        for a, b in zip(bounds, bounds[1:]):
            reader.feed_data(wire[a:b])
            await asyncio.sleep(0)
        reader.feed_eof()

    task = asyncio.create_task(writer())
    data = await read_data(reader, size_limit)
    await task
    rest = await reader.read()
    return data, rest


def read(wire: bytes, cuts: list[int] = (), size_limit: int | None = None):  # type: ignore[assignment]
    return asyncio.run(feed(wire, list(cuts), size_limit))


@pytest.mark.parametrize("body", [
    b"", b"\r\n", b"a\r\n", b"Subject: x\r\n\r\nHello\r\n", b"..\r\n", b".a\r\n..b\r\nc.\r\n",
    b"line\r\n.\r\r\n", b"x\r\n..\r\n..\r\n",
])
def test_terminator_split_at_every_offset(body):
    wire = body + b".\r\n" + AFTER
    want = reference(wire)
    assert want is not None
    for cut in range(len(wire) + 1):
        data, rest = read(wire, [cut])
        assert (data.content, rest) == want, cut
        assert data.refusal is None


def test_every_two_cuts_around_the_end():
    wire = b"To: a\r\n\r\n.x\r\n..\r\nend\r\n.\r\n" + AFTER
    want = reference(wire)
    end = wire.index(b"\r\n.\r\n")
    for a in range(end - 6, end + 7):
        for b in range(a, end + 8):
            data, rest = read(wire, [a, b])
            assert (data.content, rest) == want, (a, b)


def test_dot_stuffing_on_chunk_edges():
    lines = [b"." * n + b"x\r\n" for n in range(1, 4)] + [b"..\r\n", b".\r\r\n"]
    body = b"".join(lines) * 20
    wire = body + b".\r\n" + AFTER
    want = reference(wire)
    for step in (1, 2, 3, 5, 7, 64):
        data, rest = read(wire, list(range(0, len(wire), step)))
        assert (data.content, rest) == want, step


@pytest.mark.parametrize("fake", [
    b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n.\r\r\n",
])
def test_fake_ends_do_not_end_the_data(fake):
    smuggled = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<x@marketplace.example>\r\nDATA\r\nevil\r\n"
    wire = b"Subject: hi\r\n\r\nbody" + fake + smuggled + b".\r\n" + AFTER
    for cut in range(0, len(wire), 3):
        data, rest = read(wire, [cut])
        assert rest == AFTER          # only the real end ended it; the smuggled commands are data
        assert b"MAIL FROM:<evil@attacker.example>" in data.content


def test_size_limit_discards_and_refuses_after_the_final_dot():
    body = b"x" * 70 + b"\r\n"
    wire = body * 100 + b".\r\n" + AFTER
    data, rest = read(wire, list(range(0, len(wire), 500)), size_limit=len(body) * 100 - 1)
    assert (data.refusal, data.content, rest) == ("msg.too_big", b"", AFTER)
    data, rest = read(wire, list(range(0, len(wire), 500)), size_limit=len(body) * 100)
    assert data.refusal is None and data.content == body * 100 and rest == AFTER


@pytest.mark.parametrize("length,refused", [(998, False), (999, False), (1000, True), (5000, True)])
def test_line_length(length, refused):
    for prefix in (b"", b"a\r\n", b"b" * 700 + b"\r\n"):
        wire = prefix + b"y" * length + b"\r\nlast\r\n.\r\n" + AFTER
        for step in (1000, 333, 4096):
            data, rest = read(wire, list(range(0, len(wire), step)))
            assert rest == AFTER
            assert (data.refusal == "msg.line_too_long") is refused, (length, step)
            if not refused:
                assert data.content == reference(wire)[0]


def test_connection_closed_before_the_final_dot():
    with pytest.raises(asyncio.IncompleteReadError):
        read(b"Subject: x\r\n\r\nno end\r\n")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\x00", b"..", b"\r\n."]), max_size=40),
       st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_same_as_line_by_line(tokens, cuts):
    wire = b"".join(tokens) + b"\r\n.\r\n" + AFTER
    want = reference(wire)
    if want is None:
        return
    data, rest = read(wire, cuts)
    if data.refusal is None:
        assert (data.content, rest) == want


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 500, LINE_LIMIT - 2, LINE_LIMIT - 1, LINE_LIMIT, LINE_LIMIT + 1, 3000]),
                min_size=1, max_size=30),
       st.booleans(), st.lists(st.integers(min_value=1, max_value=5000), max_size=8))
def test_the_long_line_check_matches_line_by_line_across_pieces(lengths, final_lf, cuts):
    # _Lines jumps through large pieces a window at a time instead of splitting them into lines.
    stream = b"\n".join(b"x" * n for n in lengths) + (b"\n" if final_lf else b"")
    lines = stream.split(b"\n")
    complete, partial = lines[:-1], lines[-1]
    want = any(len(line) + 1 > LINE_LIMIT for line in complete) or len(partial) > LINE_LIMIT
    check = _Lines()
    edges = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    for start, end in zip(edges, edges[1:]):
        check.feed(stream[start:end])
    assert check.too_long is want
