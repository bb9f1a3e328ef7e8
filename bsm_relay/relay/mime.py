"""The body's MIME structure: what policy reads (text parts, attachments) and masking.

Intake never parses bodies; the marketplace stage does, through this module only.
:func:`parse` walks the structure and records, for every leaf part, where its
header block and its content sit in the body bytes.  :func:`rewrite_texts` then
replaces only the content (and, if it must, the Content-Type / Content-Transfer-
Encoding lines) of the text parts whose text changed, splicing the new bytes into
the original ones: boundaries, preambles, every other header and every untouched
part stay byte for byte what the sender wrote, so an attached DOCX or PDF arrives
identical.

Part headers are read by the stdlib parser (``compat32``, as mail clients read
them); the boundary walk is done here on bytes so offsets are exact.  A structure
deeper than :data:`MAX_DEPTH` or with more than :data:`MAX_PARTS` parts, a multipart
without a boundary or without any part, or content that does not decode, raises
:class:`MalformedMime` (reason ``msg.malformed``).  Pure, no I/O.

The body is expected with CRLF line ends only (the SMTP stage refuses anything else).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.policy
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser

from ..policy.attachments import HEAD, decided_by_head
from ..policy.facts import Attachment, TextPart
from . import scan
from .scan import crlf_only

__all__ = ["MAX_DEPTH", "MAX_PARTS", "MalformedMime", "MimeBody", "Leaf", "parse", "rewrite_texts",
           "replace_header_lines"]

MAX_DEPTH = 100
MAX_PARTS = 500

_HEADER_PARSER = BytesHeaderParser(policy=email.policy.compat32)
_TEXT_TYPES = frozenset({"text/plain", "text/html"})
_ASCII_ALIASES = frozenset({"us-ascii", "ascii", "ansi_x3.4-1968", "646", "us"})
_MAX_LINE = 998


class MalformedMime(ValueError):
    """The MIME structure cannot be read one way only, or is too deep or too large."""

    reason = "msg.malformed"


@dataclass(frozen=True)
class Leaf:
    """One non-multipart part.

    Offsets are in the body bytes: the part's header block is ``[header_start,
    header_end)`` (each field with its CRLF), its content ``[body_start, end)``.  For
    the top-level part of a single-part message the header block is the message's own
    (``top`` is true and all three start offsets are 0).
    """

    header_start: int
    header_end: int
    body_start: int
    end: int
    headers: Message
    content_type: str
    cte: str
    top: bool
    text: TextPart | None = None          # set for text/plain and text/html parts
    charset: str | None = None            # the codec the text was decoded with (None: unknown)


@dataclass(frozen=True)
class MimeBody:
    body: bytes                       # offsets are into this (the whole message when start > 0)
    leaves: tuple[Leaf, ...]
    attachments: tuple[Attachment, ...]
    start: int = 0                    # where the body begins in ``body``

    @property
    def text_parts(self) -> tuple[TextPart, ...]:
        return tuple(leaf.text for leaf in self.leaves if leaf.text is not None)


@dataclass
class _Walk:
    body: bytes
    leaves: list[Leaf] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    parts: int = 0


# -- parsing -------------------------------------------------------------------------

def parse(header_block: bytes, body: bytes, start: int = 0) -> MimeBody:
    """Walk ``body`` whose top-level headers are ``header_block`` (as split by intake).

    ``start``: ``body`` is the whole message and the body begins there (no copy of a large
    body is made to walk it)."""
    walk = _Walk(body)
    _part(walk, _head(header_block), (start, start, start), len(body), 0, top=True)
    return MimeBody(body, tuple(walk.leaves), tuple(walk.attachments), start)


@dataclass(frozen=True, slots=True)
class _Head:
    """What the walk reads from one part's header fields."""

    message: Message                  # never changed once parsed: shared by equal header blocks
    content_type: str
    maintype: str
    cte: str = "7bit"
    boundary: str | None = None       # multipart only
    filename: str | None = None       # the others
    disposition: str | None = None
    charset: str | None = None


def _read_head(block: bytes) -> _Head:
    message = _HEADER_PARSER.parsebytes(block)
    ctype, maintype = message.get_content_type(), message.get_content_maintype()
    if maintype == "multipart":
        return _Head(message, ctype, maintype, boundary=message.get_boundary())
    return _Head(message, ctype, maintype, str(message.get("Content-Transfer-Encoding", "7bit")).strip().lower(),
                 filename=message.get_filename(), disposition=message.get_content_disposition(),
                 charset=message.get_content_charset())


# A seller's client writes the same part headers message after message ("text/plain;
# charset=utf-8"): the stdlib parser and its parameter reads cost about 70 µs a part, a lookup
# here about 0.2.  Only short blocks are kept.
_cached_head = functools.lru_cache(maxsize=256)(_read_head)


def _head(block: bytes) -> _Head:
    return _cached_head(block) if len(block) <= 1024 else _read_head(block)


def _part(walk: _Walk, head: _Head, offsets: tuple[int, int, int], end: int, depth: int,
          *, top: bool = False) -> None:
    """One part: ``offsets`` are (header start, header end, content start)."""
    walk.parts += 1
    if depth > MAX_DEPTH or walk.parts > MAX_PARTS:
        raise MalformedMime("MIME structure too deep or too large")
    start = offsets[2]
    ctype, headers = head.content_type, head.message
    if head.maintype == "multipart":
        _multipart(walk, head, start, end, depth)
        return
    cte = head.cte
    if head.maintype == "message" and cte in ("7bit", "8bit", "binary"):
        # A forwarded message: its text is shown to the reader, so it is read (and masked) too.
        # Any message/* subtype (message/global, an unknown one): the stdlib parser, and mail
        # clients with it, read them all as a message.
        _child(walk, start, end, depth)
        return
    raw = memoryview(walk.body)[start:end]
    filename = head.filename
    if ctype in _TEXT_TYPES and head.disposition != "attachment" and not filename:
        charset, text = _decode_text(head.charset, _decode_content(raw, cte))
        walk.leaves.append(Leaf(*offsets, end, headers, ctype, cte, top, TextPart(ctype, text), charset))
        return
    walk.leaves.append(Leaf(*offsets, end, headers, ctype, cte, top))
    if cte == "base64" and len(raw) > _LAZY_MIN:
        sniffed = _base64_head(raw)
        if sniffed is not None:
            walk.attachments.append(Attachment(str(filename or ""), ctype, *sniffed))
            return
    data = _decode_content(raw, cte)
    size = len(data)
    if size > _KEEP_WHOLE and not data.startswith(b"PK"):
        # Policy sniffs a type from the first bytes (a ZIP container needs its directory at the
        # end, so those stay whole) and counts the size: a large attachment is not kept whole.
        data = data[:_SNIFF_PREFIX]
    walk.attachments.append(Attachment(str(filename or ""), ctype, data, size))


def _child(walk: _Walk, start: int, end: int, depth: int) -> None:
    header_end, content_start = _split_part(walk.body, start, end)
    _part(walk, _head(walk.body[start:header_end]), (start, header_end, content_start), end, depth + 1)


def _multipart(walk: _Walk, head: _Head, start: int, end: int, depth: int) -> None:
    boundary = head.boundary
    if not boundary:
        raise MalformedMime("multipart without a boundary")
    if not boundary.isascii():  # RFC 2046 bchars; the stdlib hands non-ASCII back as U+FFFD
        raise MalformedMime("non-ASCII multipart boundary")
    delimiter = b"--" + boundary.encode("ascii")
    body = walk.body
    # Delimiter lines: "--boundary" at a line start, then "--" (close) or nothing, then
    # optional transport padding (as the stdlib parser and mail clients read them).  The
    # CRLF before a delimiter line belongs to the delimiter, not to the part before it.
    line_re = re.compile(re.escape(delimiter) + rb"(--)?[ \t]*(?:\r\n|$)")
    openers: list[tuple[int, int]] = []   # (delimiter line start, content start after it)
    close = end
    pos = start
    while True:
        found = scan.find(body, delimiter, pos, end)
        if found < 0:
            break
        at_line_start = found == start or body[found - 2:found] == b"\r\n"
        match = line_re.match(body, found, end) if at_line_start else None
        if match is None:
            pos = found + len(delimiter)
            continue
        if match.group(1) is not None:
            close = found
            break
        openers.append((found, match.end()))
        pos = match.end()
    if not openers:
        raise MalformedMime("multipart without any part")
    nexts = [line for line, _ in openers[1:]] + [close]
    for (_, content_start), next_line in zip(openers, nexts, strict=True):
        part_end = next_line
        if next_line != end and part_end - 2 >= content_start:
            part_end -= 2
        _child(walk, content_start, part_end, depth)


_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]*:|[ \t]")


def _split_part(body: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of the part's header block, start of its content).

    Header lines are read as the stdlib parser reads them: up to an empty line (which
    is skipped), or up to the first line that is neither a field nor a continuation
    (which is content: a part without headers still shows its text).
    """
    pos = start
    while pos < end:
        eol = body.find(b"\r\n", pos, end)
        line_end = end if eol < 0 else eol
        if line_end == pos:
            return pos, min(pos + 2, end)
        if not _HEADER_LINE.match(body, pos, line_end):
            return pos, pos
        pos = end if eol < 0 else eol + 2
    return end, end


def _decode_content(raw: memoryview, cte: str) -> bytes:
    if cte == "base64":
        try:
            return binascii.a2b_base64(raw)     # line breaks and other non-alphabet bytes skipped
        except binascii.Error:
            pass                                # missing padding: add it, as mail clients do
        compact = b"".join(bytes(raw).split())
        try:
            return binascii.a2b_base64(compact + b"=" * (-len(compact) % 4))
        except binascii.Error:
            raise MalformedMime("base64 content does not decode") from None
    if cte == "quoted-printable":
        return binascii.a2b_qp(raw)
    return bytes(raw)


# A base64 attachment longer than this is first read for its head and its size alone.
_LAZY_MIN = 4 * HEAD
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_BASE64_LINES = _BASE64_ALPHABET + b"=\r\n"
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(_BASE64_ALPHABET + b"=")))


def _base64_head(raw: memoryview) -> tuple[bytes, int] | None:
    """(its first ``HEAD`` bytes, its decoded size) for a base64 attachment whose type those bytes
    decide (``attachments.decided_by_head``), without decoding the rest: the size follows from
    the count of base64 characters.  None: decode it all (another type, or unusual base64 —
    padding inside, a length that does not decode — which the full decode judges as before)."""
    if scan.find_first_not_of(raw, _BASE64_LINES) >= 0:
        compact = bytes(raw).translate(None, _NOT_BASE64)    # other bytes too: drop them all
        chars = len(compact.rstrip(b"="))
        if len(compact) - chars > 2 or b"=" in compact[:chars]:
            return None
    else:
        # Only base64 characters and line breaks (the common case): counted without copying
        # the attachment (less than half the cost of the deleting translate above).
        pads = scan.count(raw, b"=")
        if pads > 2 or (pads and scan.find(raw, b"=") < scan.find_last_of(raw, _BASE64_ALPHABET)):
            return None
        chars = len(raw) - pads - scan.count(raw, b"\r") - scan.count(raw, b"\n")
        prefix = HEAD // 3 * 4 + 4
        compact = bytes(raw[: prefix * 2]).translate(None, _NOT_BASE64)
        if len(compact) < min(prefix, chars):     # long runs of line breaks: take it all
            compact = bytes(raw).translate(None, _NOT_BASE64)
    if chars % 4 == 1:
        return None
    taken = min(chars - chars % 4, HEAD // 3 * 4 + 4)     # whole quads: at least HEAD bytes
    head = binascii.a2b_base64(compact[:taken])
    if len(head) < min(HEAD, chars * 3 // 4) or not decided_by_head(head):
        return None
    return head[:HEAD], chars * 3 // 4


# Attachments larger than this keep only their first _SNIFF_PREFIX bytes (and their size).
_KEEP_WHOLE = 1 << 20
_SNIFF_PREFIX = 1 << 16


def _codec(charset: str | None) -> str | None:
    if not charset:
        return None
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None


def _decode_text(declared: str | None, data: bytes) -> tuple[str | None, str]:
    """Text for policy: the declared charset; a lying or unknown one decodes with replacement."""
    name = _codec(declared or "us-ascii")
    if name is None:
        return None, data.decode("utf-8", "replace")
    if name == "ascii" and not data.isascii():
        try:
            return "utf-8", data.decode("utf-8")
        except UnicodeDecodeError:
            return None, data.decode("utf-8", "replace")
    return name, data.decode(name, "replace")


# -- rewriting -----------------------------------------------------------------------

@dataclass(frozen=True)
class Rewritten:
    new_body: bytes | None               # None: unchanged (``body`` is then the parsed one)
    # Top-level header fields to replace (name -> full new value); non-empty only when a
    # single-part message had to change charset or transfer encoding.
    headers: Mapping[str, str]
    changed: bool
    source: MimeBody | None = None

    @property
    def body(self) -> bytes:
        """The body after the rewrite (unchanged: the original, copied only when asked for)."""
        if self.new_body is not None:
            return self.new_body
        assert self.source is not None
        return self.source.body[self.source.start:] if self.source.start else self.source.body


def rewrite_texts(parsed: MimeBody, new_text: Callable[[TextPart], str]) -> Rewritten:
    """Replace each text part for which ``new_text`` returns a different text.

    Raises :class:`MalformedMime` should a re-encoded part not be CRLF lines without NUL (the
    rest of the body was checked at intake: the whole result then is, ``headers.crlf_only``)."""
    pieces: list[bytes] = []
    top_headers: dict[str, str] = {}
    pos = parsed.start
    changed = False
    body = parsed.body
    for leaf in parsed.leaves:
        if leaf.text is None:
            continue
        text = new_text(leaf.text)
        if text == leaf.text.text:
            continue
        changed = True
        content, fields = _encode(leaf, text, body[leaf.body_start:leaf.end])
        if not crlf_only(content):
            # Never expected (the encodings write CRLF lines only), but delivery sends queued
            # bodies as they are: what could end a downstream DATA early is refused instead.
            raise MalformedMime("a re-encoded text part is not CRLF lines")
        pieces.append(body[pos:leaf.header_start])
        if leaf.top:
            top_headers.update(fields)
        elif fields:
            pieces.append(replace_header_lines(body[leaf.header_start:leaf.header_end], fields))
            if leaf.body_start == leaf.header_end:
                # No blank line after the part's headers (the content began at a line that is no
                # field): one now ends the new fields, so nothing in the content reads as one.
                pieces.append(b"\r\n")
        else:
            pieces.append(body[leaf.header_start:leaf.header_end])
        pieces.append(body[leaf.header_end:leaf.body_start])
        pieces.append(content)
        pos = leaf.end
    if not changed:      # nothing to rebuild (a 25 MB message is not copied to say so)
        return Rewritten(None, top_headers, False, parsed)
    pieces.append(body[pos:])
    return Rewritten(b"".join(pieces), top_headers, changed, parsed)


def _encode(leaf: Leaf, text: str, original: bytes) -> tuple[bytes, dict[str, str]]:
    """The new content bytes of a text part, and the header fields that must change."""
    fields: dict[str, str] = {}
    charset = leaf.charset
    data: bytes | None = None
    if charset is not None:
        try:
            data = text.encode(charset)
        except UnicodeEncodeError:
            data = None
    if data is None:
        data = text.encode("utf-8", "replace")
        if charset != "utf-8":
            fields["Content-Type"] = _with_charset(leaf.headers, "utf-8")
    elif leaf.headers.get_content_charset() is None and not data.isascii():
        fields["Content-Type"] = _with_charset(leaf.headers, charset or "utf-8")
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    cte = leaf.cte
    if cte == "base64":
        encoded = base64.encodebytes(b"\r\n".join(lines)).replace(b"\n", b"\r\n")
    elif cte == "quoted-printable":
        encoded = _qp(lines)
    elif ((data.isascii() or cte in ("8bit", "binary")) and all(len(line) <= _MAX_LINE for line in lines)
          and data.count(b"\r") == data.count(b"\r\n") and b"\0" not in data):
        encoded = b"\r\n".join(lines)
    else:
        # Long lines, or bytes a line of text cannot hold as they are (a bare CR, a NUL: a
        # charset such as UTF-16 makes them): quoted-printable, which writes them as =0D, =00.
        encoded = _qp(lines)
        fields["Content-Transfer-Encoding"] = "quoted-printable"
    # Keep whether the content ended with a line break: it decides the blank line
    # before the next boundary, which the reader may see.
    if encoded.endswith(b"\r\n"):
        encoded = encoded[:-2]
    if original.endswith(b"\r\n"):
        encoded += b"\r\n"
    return encoded, fields


def _qp(lines: list[bytes]) -> bytes:
    out = []
    for line in lines:
        # One line at a time, so the only line breaks b2a_qp writes are its soft ones.
        out.append(binascii.b2a_qp(line, quotetabs=False, istext=False).replace(b"\n", b"\r\n"))
    return b"\r\n".join(out)


def _with_charset(headers: Message, charset: str) -> str:
    value = headers.get("Content-Type", "text/plain")
    if isinstance(value, str) and value.isascii():   # (non-ASCII bytes come back as a Header)
        copy = Message(policy=email.policy.compat32)
        copy["Content-Type"] = value
        copy.set_param("charset", charset, header="Content-Type")
        value = str(copy["Content-Type"])
        if value.isascii() and not re.search(r"[\r\n\x00]", value):
            return value
    # A value that cannot be written back as it was: the type and the charset alone.
    return f'{headers.get_content_type()}; charset="{charset}"'


_FIELD_START = re.compile(rb"(?m)^(?=[!-9;-~]+:)")


def replace_header_lines(block: bytes, fields: Mapping[str, str]) -> bytes:
    """A header block with every occurrence of ``fields`` removed and the new values added.

    ``block`` ends with the CRLF of its last field (not the blank line).  Other fields
    keep their exact bytes.  New values must be ASCII without line breaks.
    """
    names = {n.lower() for n in fields}
    kept: list[bytes] = []
    starts = [m.start() for m in _FIELD_START.finditer(block)]
    first = starts[0] if starts else len(block)   # a part may have no header field at all
    if first:
        kept.append(block[:first])
    for begin, stop in zip(starts, (starts[1:] + [len(block)]) if starts else [], strict=True):
        line = block[begin:stop]
        name = line.split(b":", 1)[0].decode("ascii").lower()
        if name not in names:
            kept.append(line)
    for name, value in fields.items():
        if re.search(r"[\r\n\x00]", value) or not value.isascii():
            raise ValueError(f"unusable value for {name}")
        kept.append(f"{name}: {value}\r\n".encode("ascii"))
    return b"".join(kept)
