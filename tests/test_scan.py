"""``scan`` answers as ``bytes`` does (docs/decisions/0024), at every length and alignment.

StringZilla's kernels take 16, 32 or 64 bytes at a time and finish with a byte loop: each
property runs over data whose length and needle positions cross those widths, and over large
bodies, so an answer that differed at a seam would show here.
"""

from __future__ import annotations

import base64
import binascii
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bsm_relay.relay import mime, scan

# Bytes drawn mostly from the ones the searches are about, so that matches, near-matches
# and bare CR / LF / NUL are common.
_ALPHABET = b"\r\n.\0ab-"
_data = st.lists(st.sampled_from(list(_ALPHABET)), max_size=300).map(bytes)


def _reference_crlf_only(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") == crlf and data.count(b"\n") == crlf and b"\0" not in data


@settings(max_examples=600, deadline=None)
@given(_data, st.sampled_from([b"\r\n.", b"\r\n", b"\r", b"--ab", b".\r\n", b"\r\n.\r\n"]))
def test_find_count_contains_as_bytes(data, needle):
    assert scan.find(data, needle) == data.find(needle)
    assert scan.count(data, needle) == data.count(needle)
    assert scan.contains(data, needle) is (needle in data)


@settings(max_examples=600, deadline=None)
@given(_data, st.integers(0, 300), st.integers(0, 300))
def test_find_in_a_range_as_bytes(data, a, b):
    start, end = sorted((min(a, len(data)), min(b, len(data))))
    assert scan.find(data, b"--ab", start, end) == data.find(b"--ab", start, end)
    assert scan.find(data, b"\r\n.", start) == data.find(b"\r\n.", start)


@settings(max_examples=600, deadline=None)
@given(_data)
def test_crlf_only_as_the_reference(data):
    assert scan.crlf_only(data) is _reference_crlf_only(data)


@pytest.mark.parametrize("seed", range(8))
def test_large_bodies_with_one_fault_anywhere(seed):
    """A 100 KB CRLF body is clean; one bare CR, bare LF or NUL put anywhere in it is found, and a
    dot-line anywhere in it is found where ``bytes`` finds it."""
    rng = random.Random(seed)
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    body = line * 1400
    assert scan.crlf_only(body) and not scan.contains(body, b"\r\n.")
    for fault in (b"\r", b"\n", b"\0", b"x\r", b"\nx"):
        at = rng.randrange(len(body))
        bad = body[:at] + fault + body[at:]
        assert scan.crlf_only(bad) is _reference_crlf_only(bad)
    for _ in range(20):
        at = rng.randrange(len(body))
        dotted = body[:at] + b"\r\n." + body[at:]
        assert scan.find(dotted, b"\r\n.") == dotted.find(b"\r\n.")
        assert scan.count(dotted, b"\r\n.") == dotted.count(b"\r\n.")
        assert scan.find(memoryview(dotted), b"\r\n.") == dotted.find(b"\r\n.")


# -- a base64 attachment's head and size, counted (mime._base64_head) -----------------

def _reference_base64_head(raw: bytes):
    """The count before scan: every base64 character kept by a deleting translate."""
    from bsm_relay.policy.attachments import HEAD, decided_by_head
    compact = raw.translate(None, mime._NOT_BASE64)
    chars = len(compact.rstrip(b"="))
    if len(compact) - chars > 2 or b"=" in compact[:chars] or chars % 4 == 1:
        return None
    head = binascii.a2b_base64(compact[:min(chars - chars % 4, HEAD // 3 * 4 + 4)])
    if len(head) < min(HEAD, chars * 3 // 4) or not decided_by_head(head):
        return None
    return head[:HEAD], chars * 3 // 4


_PDF = b"%PDF-1.4\n" + bytes(range(256)) * 80
_EDITS = [b"=", b"==", b"\r\n", b"\r", b"\n", b" ", b"*", b"\r\n\r\n" * 40]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_PDF)), st.sampled_from([76, 64, 1, 4000]),
       st.lists(st.tuples(st.integers(0, 30000), st.sampled_from(_EDITS)), max_size=3))
def test_base64_head_counts_as_the_translate(cut, width, edits):
    encoded = base64.b64encode(_PDF[:max(cut, 5000)])
    raw = b"\r\n".join(encoded[i:i + width] for i in range(0, len(encoded), width)) + b"\r\n"
    for at, text in edits:
        at = min(at, len(raw))
        raw = raw[:at] + text + raw[at:]
    assert mime._base64_head(memoryview(raw)) == _reference_base64_head(raw)


@settings(max_examples=400, deadline=None)
@given(_data, st.sampled_from([1, 2, 3, 7, 64]))
def test_crlf_only_window_by_window_as_the_reference(data, window):
    """A large body is checked a window at a time (``scan._WINDOW``, 256 KB): with tiny windows,
    every seam of these short inputs is one, and the answer is the same."""
    kept = scan._WINDOW
    scan._WINDOW = window
    try:
        assert scan.crlf_only(data) is _reference_crlf_only(data)
    finally:
        scan._WINDOW = kept
