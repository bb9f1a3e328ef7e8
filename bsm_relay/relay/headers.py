"""Reading a message's header block: the intake side of the rewrite.

Everything here works on the header block as bytes and plain strings. The stdlib
``email`` parser costs about a hundred times more per message on this hot path, and its
address parser has been fooled before (CVE-2023-27043), so the one field whose meaning
decides who may write to a buyer -- From -- is read by a small strict tokenizer that
refuses anything it cannot read one way only.  Pure, no I/O: the stdlib, and ``scan`` for the
one whole-block byte check.

The SMTP server has already refused bare CR, bare LF and NUL; the checks here repeat
that cheaply so this module is safe on its own.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import NamedTuple

from .scan import crlf_only

__all__ = [
    "AmbiguousFrom",
    "Header",
    "Mailbox",
    "MalformedHeader",
    "MissingFrom",
    "get_all",
    "parse_from",
    "parse_headers",
    "parse_mailbox",
    "parse_msg_ids",
    "received_count",
    "split_message",
    "split_offsets",
]


class MalformedHeader(ValueError):
    """The header block cannot be read as a list of fields."""

    reason = "msg.malformed"


class AmbiguousFrom(ValueError):
    """The From header does not name exactly one mailbox, read one way only."""

    reason = "from.ambiguous"


class MissingFrom(AmbiguousFrom):
    """The message has no From header."""

    reason = "from.missing"


class Header(NamedTuple):
    """One header field: ``name`` as written, ``value`` unfolded, ``raw`` the exact bytes
    (folding and the final CRLF included) so kept fields can pass through untouched."""

    name: str
    value: str
    raw: bytes


class Mailbox(NamedTuple):
    display_name: str
    address: str


# -- the block ----------------------------------------------------------------------

def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line: (header block with its last CRLF, body)."""
    block_end, body_start = split_offsets(raw)
    return raw[:block_end], raw[body_start:]


def split_offsets(raw: bytes) -> tuple[int, int]:
    """:func:`split_message` as offsets: where the header block ends (with its last CRLF) and
    where the body begins, so that a large body need not be copied out of the message."""
    if raw.startswith(b"\r\n"):
        return 0, 2
    end = raw.find(b"\r\n\r\n")
    return (len(raw), len(raw)) if end < 0 else (end + 2, end + 4)


# RFC 5322 ftext: printable US-ASCII except ":".  Whitespace before the colon (the
# obsolete "From :" form) is refused on purpose: parsers disagree on it, and a field one
# reader takes for From and another does not is how headers get smuggled.
_FTEXT = bytes(range(0x21, 0x7F))
_WSP = (b" ", b"\t")


def parse_headers(block: bytes) -> list[Header]:
    """Parse a header block (as returned by :func:`split_message`) into fields, in order."""
    if not block:
        return []
    if not crlf_only(block):
        raise MalformedHeader("bare CR, bare LF or NUL in the header block")
    # Splitting on CRLF and walking the lines is several times faster here than a regex.
    lines = block.split(b"\r\n")
    last_has_crlf = lines[-1] == b""
    if last_has_crlf:
        lines.pop()

    headers: list[Header] = []
    current: list[bytes] = []
    colon = 0
    for line in lines:
        if line[:1] in _WSP:
            if not current:
                raise MalformedHeader("continuation line before the first header")
            current.append(line)
            continue
        if current:
            headers.append(_field(current, colon, True))
        colon = line.find(b":")
        if colon <= 0 or line[:colon].translate(None, _FTEXT):
            raise MalformedHeader("line is neither a header field nor a continuation")
        current = [line]
    if current:
        headers.append(_field(current, colon, last_has_crlf))
    return headers


def _field(lines: list[bytes], colon: int, crlf: bool) -> Header:
    if len(lines) == 1:
        line = lines[0]
        raw = line + b"\r\n" if crlf else line
        value = line[colon + 1:]
    else:
        raw = b"\r\n".join(lines) + b"\r\n" if crlf else b"\r\n".join(lines)
        # Unfolding removes each CRLF and keeps the whitespace that follows it.
        value = b"".join(lines)[colon + 1:]
    return Header(lines[0][:colon].decode("ascii"), _decode(value.strip(b" \t")), raw)


def _decode(data: bytes) -> str:
    # UTF-8 (RFC 6532) when it is valid, else Latin-1, which maps every byte: never
    # raises, and never yields lone surrogates that would raise later on encoding.
    if data.isascii():
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def get_all(headers: list[Header], name: str) -> list[Header]:
    """All fields called ``name`` (case-insensitive), in order."""
    lname = name.lower()
    return [h for h in headers if h.name.lower() == lname]


def received_count(headers: list[Header]) -> int:
    return sum(1 for h in headers if h.name.lower() == "received")


# -- message ids --------------------------------------------------------------------

_MAX_MSG_ID = 250
_BAD_IN_ID = re.compile(r"[^!-~]|[<>]")  # anything but printable ASCII, or brackets


def parse_msg_ids(value: str) -> list[str]:
    """The ``<...>`` ids of a Message-ID / In-Reply-To / References value, in order, once each.

    Text between ids (comments, phrases, junk) is ignored; an id that is too long or
    holds whitespace, control or non-ASCII characters is dropped rather than repaired.
    """
    ids: list[str] = []
    seen: set[str] = set()
    pos = 0
    while True:
        start = value.find("<", pos)
        if start < 0:
            break
        end = value.find(">", start + 1)
        if end < 0:
            break
        nested = value.rfind("<", start + 1, end)
        if nested >= 0:  # "<junk <id>": the id starts at the last "<"
            start = nested
        candidate = value[start + 1: end]
        pos = end + 1
        if not candidate or len(candidate) > _MAX_MSG_ID or _BAD_IN_ID.search(candidate):
            continue
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


# -- From ---------------------------------------------------------------------------

def parse_from(headers: list[Header]) -> Mailbox:
    """The one mailbox of the one From header, or :class:`AmbiguousFrom`.

    Accepted: ``addr-spec``, ``addr-spec (comment)``, ``phrase <addr-spec>`` where the
    phrase is atoms, dots, quoted strings and encoded words.  Refused: groups, lists,
    ``@`` anywhere outside the angle brackets or a quoted string, unbalanced quotes,
    comments or brackets, comments holding an ``@``, source routes, domain literals,
    quoted local parts that are not plain dot-atoms, non-ASCII addresses.
    """
    froms = get_all(headers, "from")
    if not froms:
        raise MissingFrom("no From header")
    if len(froms) > 1:
        raise AmbiguousFrom("more than one From header")
    return parse_mailbox(froms[0].value)


# RFC 5322 specials plus whitespace end an atom.  Non-ASCII is atext (RFC 6532),
# which only matters for display names: addresses are checked to be ASCII.
_ATOM = re.compile(r'[^ \t()<>\[\]:;@\\,."\x00-\x1f\x7f]+')
# An ASCII dot-atom (RFC 5322 3.2.3), also the plain-address fast paths of smtpd and delivery.
DOT_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_DOT_ATOM = re.compile(DOT_ATOM)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

# Token kinds.
_WS, _ATOMK, _QS, _COMMENT, _ANGLE, _DOT, _AT = range(7)


def parse_mailbox(value: str) -> Mailbox:
    """Parse the value of a From header (see :func:`parse_from`)."""
    tokens = _tokenize(value)
    angles = [t for t in tokens if t[0] == _ANGLE]
    if len(angles) > 1:
        raise AmbiguousFrom("more than one angle address")
    if angles:
        return _name_addr(tokens)
    return _bare_addr_spec(tokens)


def _tokenize(s: str) -> list[tuple[int, str]]:
    tokens: list[tuple[int, str]] = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t":
            j = i + 1
            while j < n and s[j] in " \t":
                j += 1
            tokens.append((_WS, " "))
            i = j
        elif c == '"':
            text, i = _quoted_string(s, i)
            tokens.append((_QS, text))
        elif c == "(":
            text, i = _comment(s, i)
            tokens.append((_COMMENT, text))
        elif c == "<":
            end = s.find(">", i + 1)
            if end < 0:
                raise AmbiguousFrom("unbalanced angle bracket")
            tokens.append((_ANGLE, s[i + 1: end]))
            i = end + 1
        elif c == ".":
            tokens.append((_DOT, "."))
            i += 1
        elif c == "@":
            tokens.append((_AT, "@"))
            i += 1
        else:
            m = _ATOM.match(s, i)
            if m is None:
                # , : ; (groups and lists), > ) ] (unbalanced), [ \ and control characters
                raise AmbiguousFrom(f"unexpected {c!r} in From")
            tokens.append((_ATOMK, m.group()))
            i = m.end()
    return tokens


def _quoted_string(s: str, i: int) -> tuple[str, int]:
    out: list[str] = []
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= n:
                break
            out.append(s[i + 1])
            i += 2
            continue
        out.append(c)
        i += 1
    raise AmbiguousFrom("unbalanced quote")


def _comment(s: str, i: int) -> tuple[str, int]:
    out: list[str] = []
    depth = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 >= n:
                break
            out.append(s[i + 1])
            i += 2
            continue
        if c == "(":
            depth += 1
            if depth > 1:
                out.append(c)
        elif c == ")":
            depth -= 1
            if depth == 0:
                text = "".join(out)
                if "@" in text:
                    raise AmbiguousFrom("address-like text in a comment")
                return text, i + 1
            out.append(c)
        else:
            out.append(c)
        i += 1
    raise AmbiguousFrom("unbalanced parenthesis")


def _name_addr(tokens: list[tuple[int, str]]) -> Mailbox:
    words: list[str] = []
    comments: list[str] = []
    space = False
    seen_angle = False
    address = ""
    for kind, text in tokens:
        if kind == _WS:
            space = True
            continue
        if kind == _COMMENT:
            comments.append(text)
            space = True
            continue
        if seen_angle:
            raise AmbiguousFrom("text after the angle address")
        if kind == _ANGLE:
            address = _addr_spec(text.strip(" \t"))
            seen_angle = True
        elif kind in (_ATOMK, _QS, _DOT):
            if space and words:
                words.append(" ")
            words.append(text)
            space = False
        else:  # "@" outside the angle brackets: `approved@x <evil@y>`
            raise AmbiguousFrom("unquoted @ in the display name")
    display = "".join(words) if words else " ".join(c.strip() for c in comments)
    return Mailbox(_display(display), address)


def _bare_addr_spec(tokens: list[tuple[int, str]]) -> Mailbox:
    # Comments may surround the address (`x@y (Name)`) but not sit inside it.
    lo, hi = 0, len(tokens)
    while lo < hi and tokens[lo][0] in (_WS, _COMMENT):
        lo += 1
    while hi > lo and tokens[hi - 1][0] in (_WS, _COMMENT):
        hi -= 1
    comments = [text for kind, text in tokens[:lo] + tokens[hi:] if kind == _COMMENT]
    core = tokens[lo:hi]
    if not core:
        raise AmbiguousFrom("empty From")
    parts: list[str] = []
    for kind, text in core:
        if kind in (_WS, _COMMENT):
            raise AmbiguousFrom("whitespace or comment inside the address, or an unquoted display name")
        parts.append(_requote(text) if kind == _QS else text)
    address = _addr_spec("".join(parts))
    return Mailbox(_display(" ".join(c.strip() for c in comments)), address)


def _requote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _addr_spec(spec: str) -> str:
    """Check a ``local@domain`` and return it with the domain lower-cased."""
    if not spec:
        raise AmbiguousFrom("empty address")
    if not spec.isascii():
        raise AmbiguousFrom("non-ASCII address")
    if spec.startswith('"'):
        # A quoted local part is accepted only when it says nothing a dot-atom could not
        # ("john"@x is john@x); anything else is a disguise, e.g. "approved@x"@evil.
        local, end = _quoted_string(spec, 0)
        if not _DOT_ATOM.fullmatch(local):
            raise AmbiguousFrom("quoted local part")
        rest = spec[end:]
        if not rest.startswith("@"):
            raise AmbiguousFrom("address without @")
        domain = rest[1:]
    else:
        if spec.count("@") != 1:
            raise AmbiguousFrom("address must hold exactly one @")
        local, domain = spec.split("@")
        if not _DOT_ATOM.fullmatch(local):
            raise AmbiguousFrom("malformed local part")
    if not _DOMAIN.fullmatch(domain):
        raise AmbiguousFrom("malformed domain")
    if len(local) > 64 or len(local) + 1 + len(domain) > 254:
        raise AmbiguousFrom("address too long")
    return f"{local}@{domain.lower()}"


# -- display names: RFC 2047 encoded words --------------------------------------------

_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_ONLY_WS = re.compile(r"[ \t]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


def _display(text: str) -> str:
    if "=?" in text:
        text = _decode_words(text)
    # Decoded words can carry CR, LF or tabs; a display name is one line of text.
    return _CONTROL.sub(" ", text).strip()


def _decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words; a word that does not decode stays as written.

    Adjacent words of the same charset are decoded together, so a multi-byte character
    split across two words comes out whole, and whitespace between words is dropped.
    """
    out: list[str] = []
    pending = b""
    pending_charset = ""
    pos = 0

    def flush() -> None:
        nonlocal pending, pending_charset
        if pending:
            out.append(_bytes_to_text(pending, pending_charset))
        pending, pending_charset = b"", ""

    for m in _ENCODED_WORD.finditer(text):
        between = text[pos: m.start()]
        charset, enc, payload = m.group(1).lower(), m.group(2).lower(), m.group(3)
        data = _word_bytes(enc, payload)
        if data is None or not _known_charset(charset):
            flush()
            out.append(between + m.group())
            pos = m.end()
            continue
        if not (pending and _ONLY_WS.fullmatch(between)):
            flush()
            out.append(between)
        elif charset != pending_charset:
            flush()
        pending += data
        pending_charset = charset
        pos = m.end()
    flush()
    out.append(text[pos:])
    return "".join(out)


def _word_bytes(enc: str, payload: str) -> bytes | None:
    try:
        if enc == "b":
            return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        return binascii.a2b_qp(payload.encode("ascii"), header=True)
    except (binascii.Error, ValueError):
        return None


def _known_charset(charset: str) -> bool:
    try:
        "".encode(charset)
    except LookupError:
        return False
    return True


def _bytes_to_text(data: bytes, charset: str) -> str:
    return data.decode(charset, "replace")
