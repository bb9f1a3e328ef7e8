"""Rewriting the header block of a message on its way through the relay.

The forwarded message carries an allowlist, never a denylist: the headers the relay
writes itself (Received, extras such as Authentication-Results, From, Reply-To, To,
Message-ID, In-Reply-To, References) and the few original fields in :data:`KEEP`,
passed through as their original bytes.  Everything else the sender's side wrote --
its Received trail, Return-Path, X-Originating-IP, DKIM and ARC signatures, its
Message-ID, mailer names, Cc, List-* and any X- header -- simply never gets copied,
so a new kind of leaking header is dropped without anyone having to know about it.

Works on bytes (see :mod:`bsm_relay.relay.headers`); the body is never looked at.
Pure, stdlib only, no I/O.
"""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import format_datetime

from .headers import Header, parse_headers, split_message, split_offsets

__all__ = ["KEEP", "RewritePlan", "date_text", "format_received", "render", "rewrite_headers"]


@dataclass(frozen=True)
class RewritePlan:
    """What the relay decided the forwarded message's own headers say.

    ``from_display`` is the whole display name shown to the recipient (the caller adds
    the " via <Marketplace>" suffix).  Ids are given without angle brackets.
    ``received`` is the full value of our Received field (see :func:`format_received`),
    ``date_if_missing`` an RFC 5322 date used only when the original has no Date.
    """

    from_display: str
    from_alias: str
    to_address: str
    reply_to: str
    message_id: str
    in_reply_to: list[str]
    references: list[str]
    received: str
    date_if_missing: str
    extra: list[tuple[str, str]] = field(default_factory=list)


# Original fields that pass through byte for byte, first occurrence only (each is a
# single-instance field, and a second Subject or Content-Type is either a mistake or
# an attempt to show the filters one value and the reader another).
#
# Left out on purpose:
# - Thread-Topic (Outlook): a copy of the subject that policy's content checks do not
#   read, so it could carry what Subject may not; threading is carried by the
#   In-Reply-To/References we map, which Outlook also uses.
# - Thread-Index (Outlook): its first bytes are a GUID/time stamp from the sender's side.
# - Content-Description, Organization, Keywords, Comments: free text nobody needs and
#   policy does not read.
KEEP: frozenset[str] = frozenset({
    "subject",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "content-language",
    "content-id",
    "auto-submitted",
    "importance",
    "priority",
    "x-priority",
    "sensitivity",
})

# Fields the relay writes itself; an extra may not add a second one of these.
_OURS = frozenset({
    "received", "from", "sender", "reply-to", "to", "cc", "bcc", "message-id",
    "in-reply-to", "references", "return-path",
})

_SOFT_LIMIT = 78    # RFC 5322 2.1.1: SHOULD
_HARD_LIMIT = 998   # RFC 5322 2.1.1: MUST (octets, without the CRLF)

_FIELD_NAME = re.compile(r"[!-9;-~]+")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                      rf"@{_LABEL}(?:\.{_LABEL})*")
_MSG_ID = re.compile(r"[!-;=?-~]{1,250}")  # printable ASCII without < >
_TOKEN = re.compile(r"[!-'*-:<-~]+")       # printable ASCII without ( ) ;
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
_LINE_BREAK = re.compile(r"[\r\n\x00]")


def rewrite_headers(headers: list[Header], plan: RewritePlan) -> bytes:
    """The header block of the forwarded message: CRLF line ends, ending in CRLF."""
    out = [_line("Received", plan.received)]
    for name, value in plan.extra:
        if not _FIELD_NAME.fullmatch(name) or name.lower() in _OURS or name.lower() in KEEP:
            raise ValueError(f"extra header {name!r} is not allowed")
        out.append(_line(name, value))
    out.append(_line("From", _mailbox(plan.from_display, plan.from_alias)))
    out.append(_line("Reply-To", f"<{_address(plan.reply_to)}>"))
    out.append(_line("To", f"<{_address(plan.to_address)}>"))
    out.append(_line("Message-ID", f"<{_msg_id(plan.message_id)}>"))
    if plan.in_reply_to:
        out.append(_line("In-Reply-To", " ".join(f"<{_msg_id(i)}>" for i in plan.in_reply_to)))
    if plan.references:
        out.append(_line("References", " ".join(f"<{_msg_id(i)}>" for i in plan.references)))

    seen: set[str] = set()
    for header in headers:
        lname = header.name.lower()
        if lname in KEEP and lname not in seen:
            seen.add(lname)
            out.append(_passthrough(header.raw))
    if "date" not in seen:
        out.append(_line("Date", plan.date_if_missing))
    return b"".join(out)


def render(raw: bytes, plan: RewritePlan, headers: list[Header] | None = None) -> bytes:
    """The whole forwarded message: rewritten header block, blank line, untouched body.

    ``headers``: ``raw``'s header block as :func:`parse_headers` reads it, when the caller has
    it already.  Raises :class:`~bsm_relay.relay.headers.MalformedHeader` when the header block
    cannot be read.
    """
    block, body = split_message(raw)
    return rewrite_headers(parse_headers(block) if headers is None else headers, plan) + b"\r\n" + body


def render_head(raw: bytes, plan: RewritePlan) -> tuple[bytes, int]:
    """:func:`render` in two pieces, for a message written to a spool file: the rewritten header
    block with its blank line, and where the untouched body begins in ``raw``."""
    block_end, start = split_offsets(raw)
    return rewrite_headers(parse_headers(raw[:block_end]), plan) + b"\r\n", start


def format_received(hostname: str, queue_id: str, when: datetime, protocol: str = "ESMTP") -> str:
    """Our Received value.  It names no client IP and no client host: the hop before us is
    the sender's own provider, and naming it would tell the recipient who wrote."""
    for part in (hostname, queue_id, protocol):
        if not _TOKEN.fullmatch(part):
            raise ValueError(f"not a plain token for a Received field: {part!r}")
    return f"by {hostname} (bsm-relay) with {protocol} id {queue_id}; {date_text(when)}"


def date_text(when: datetime) -> str:
    """RFC 5322's date-time of ``when`` to the second, with its numeric zone (``+0000``): our
    Received field's, and the Date a message without one is given."""
    return _date_text(when.replace(microsecond=0), when.utcoffset())


@functools.lru_cache(maxsize=4)
def _date_text(when: datetime, offset: timedelta | None) -> str:
    """Every message of the same second carries the same date text: formatted once a second.
    The offset is part of the key: equal instants in two zones are equal datetimes."""
    return format_datetime(when)


# -- building fields ------------------------------------------------------------------

def _line(name: str, value: str) -> bytes:
    if _LINE_BREAK.search(value):
        raise ValueError(f"line break or NUL in the value of {name}")
    # ASCII only: every value here is built by the relay (non-ASCII display names are
    # RFC 2047-encoded first), so anything else is a bug to surface, not to send.
    return _fold(f"{name}: {value}".encode("ascii"))


def _mailbox(display: str, address: str) -> str:
    address = _address(address)
    # A display name is one line of text whatever it came from.
    display = _CONTROL.sub(" ", display).strip()
    if not display:
        return f"<{address}>"
    if display.isascii() and "=?" not in display:
        quoted = display.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{address}>'
    # Non-ASCII, or text a reader would take for an encoded word: encode it, so what the
    # recipient sees is exactly the plan's display name.
    return f"{_encoded_words(display)} <{address}>"


def _encoded_words(text: str) -> str:
    """RFC 2047 B-encoded UTF-8 words of at most 45 octets (a 72-character word, so even
    the first one fits on the "From: " line within 78 characters).

    Most display names fit one word.  A longer one is cut after a space where it can be,
    keeping that space inside the earlier word: RFC 2047 readers drop the whitespace
    between words, so they show the text exactly; CPython's email parser keeps it
    (a known bug, which it shows on its own output too), and then shows a doubled space
    between two words rather than a space in the middle of one.
    """
    words: list[str] = []
    rest = text
    while rest:
        size = count = 0
        for ch in rest:
            octets = len(ch.encode("utf-8"))
            if size + octets > 45:
                break
            size += octets
            count += 1
        if count < len(rest):
            space = rest.rfind(" ", 0, count)
            if space > 0:
                count = space + 1
        words.append(_b_word(rest[:count].encode("utf-8")))
        rest = rest[count:]
    return " ".join(words)


def _b_word(data: bytes) -> str:
    return "=?utf-8?b?" + base64.b64encode(data).decode("ascii") + "?="


def _address(address: str) -> str:
    if not _ADDRESS.fullmatch(address):
        raise ValueError(f"not a plain address: {address!r}")
    return address


def _msg_id(msg_id: str) -> str:
    if not _MSG_ID.fullmatch(msg_id):
        raise ValueError(f"not a usable message id: {msg_id!r}")
    return msg_id


# -- folding --------------------------------------------------------------------------

def _passthrough(raw: bytes) -> bytes:
    if not raw.endswith(b"\r\n"):  # the last line of a message without a body
        raw += b"\r\n"
    if len(raw) <= _HARD_LIMIT + 2 or all(len(x) <= _HARD_LIMIT for x in raw.split(b"\r\n")):
        return raw
    # Only a line over the hard limit is touched: unfold it and fold it again.
    return _fold(raw[:-2].replace(b"\r\n", b""))


def _fold(line: bytes) -> bytes:
    """Fold an unfolded ``Name: value`` line at its spaces, to 78 octets where it can and
    998 always; ends in CRLF.  Folding only inserts CRLF before an existing space, so
    unfolding gives the value back -- except for a single word longer than 998 octets,
    which is broken (on a UTF-8 character boundary) as the lesser evil to an invalid line.
    """
    if len(line) <= _SOFT_LIMIT:
        return line + b"\r\n"
    words = line.split(b" ")
    lines: list[bytes] = []
    # Never break between the name and the first word of the value.
    current = b" ".join(words[:2])
    for word in words[2:]:
        if len(current) + 1 + len(word) > _SOFT_LIMIT and current.strip():
            lines.append(current)
            current = b" " + word
        else:
            current += b" " + word
    lines.append(current)
    out: list[bytes] = []
    for piece in lines:
        while len(piece) > _HARD_LIMIT:
            cut = _HARD_LIMIT
            while 0x80 <= piece[cut] < 0xC0:  # do not split a UTF-8 sequence
                cut -= 1
            out.append(piece[:cut])
            piece = b" " + piece[cut:]
        out.append(piece)
    return b"\r\n".join(out) + b"\r\n"
