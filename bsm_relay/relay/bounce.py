"""Delivery status notifications (RFC 3464), expressed in aliases. Pure: values in, bytes out.

relay/delivery calls :func:`build_dsn` when recipients fail for good (5xx, expiry) or have been
delayed past the warning time, and queues the result with ``MAIL FROM:<>`` to the original,
authenticated sender. The DSN speaks only of the alias the sender wrote to: everything that came
from outside (the downstream's reply text, its host name, the returned headers) passes through a
scrubber that replaces the strings the caller names (the real address, its local part, ...), in
any letter case, so that the recipient's real address never reaches the sender.
"""

from __future__ import annotations

import re
import secrets
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import format_datetime

__all__ = ["ADDRESS_REMOVED", "FailedRecipient", "build_dsn"]

ADDRESS_REMOVED = "[address removed]"

_ACTIONS = ("failed", "delayed")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_MAX_DIAGNOSTIC = 900  # keeps every line of the report under the 998-octet limit
_FIELD_END = re.compile(rb"\r\n(?![ \t])")
_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f<>]")


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient of the DSN, as the sender knows it.

    ``alias`` is the address the sender wrote to (Original- and Final-Recipient); ``diagnostic``
    is the downstream's reply as received, scrubbed by :func:`build_dsn`.
    """

    alias: str
    status: str  # enhanced status code, e.g. "5.1.1"
    action: str  # "failed" | "delayed"
    diagnostic: str
    remote_mta: str | None = None
    will_retry_until: datetime | None = None  # for "delayed" only


class _Scrubber:
    """Replaces each of a set of strings, in any letter case, longest first."""

    def __init__(self, scrub: Iterable[str]) -> None:
        if isinstance(scrub, Mapping):
            pairs = [(str(k), str(v)) for k, v in scrub.items()]
        else:
            pairs = [(s, ADDRESS_REMOVED) for s in scrub]
        pairs = sorted((p for p in pairs if p[0]), key=lambda p: len(p[0]), reverse=True)
        self._replacements = [replacement for _, replacement in pairs]
        alternatives = "|".join(f"(?P<s{i}>{re.escape(s)})" for i, (s, _) in enumerate(pairs))
        self._pattern = re.compile(alternatives, re.IGNORECASE) if pairs else None

    def _replace(self, match: re.Match[str]) -> str:
        assert match.lastgroup is not None
        return self._replacements[int(match.lastgroup[1:])]

    def __call__(self, text: str) -> str:
        return self._pattern.sub(self._replace, text) if self._pattern else text

    def found_in(self, text: str) -> bool:
        return bool(self._pattern and self._pattern.search(text))


def _one_line_ascii(text: str) -> str:
    """Whitespace (CR and LF included) to single spaces, anything not printable ASCII to '?'."""
    text = " ".join(text.split())
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _check_plain(what: str, value: str) -> str:
    """Values we write into header fields ourselves must not be able to add lines or fields."""
    if not value or _CONTROL_OR_SPACE.search(value):
        raise ValueError(f"DSN {what} must be non-empty without spaces, controls or <>: {value!r}")
    return value


def _field(name: str, value: str) -> str:
    """A header-style line, folded at spaces to about 78 columns."""
    lines = textwrap.wrap(
        f"{name}: {value}",
        width=78,
        subsequent_indent=" ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\r\n".join(lines) + "\r\n"


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _returned_headers(original: bytes, scrub: _Scrubber, limit: int) -> tuple[bytes, bool]:
    """The original header fields, scrubbed, whole fields only, at most ``limit`` bytes."""
    block = original.replace(b"\r\n", b"\n").replace(b"\r", b"").replace(b"\n", b"\r\n")
    block = block.split(b"\r\n\r\n", 1)[0]  # headers only, even if given a whole message
    if block and not block.endswith(b"\r\n"):
        block += b"\r\n"
    out = bytearray()
    truncated = False
    for raw in _FIELD_END.split(block)[:-1]:
        if not _FIELD_NAME.match(raw):
            continue  # not a header field: it would break the text/rfc822-headers part
        text = scrub(raw.decode("utf-8", "surrogateescape"))
        if _ENCODED_WORD.search(text):
            # An address can hide inside an RFC 2047 encoded word; if one does, drop the value.
            try:
                decoded = str(make_header(decode_header(text.split(":", 1)[1])))
            except (HeaderParseError, LookupError, ValueError, UnicodeError):
                decoded = ""
            if not decoded or scrub.found_in(decoded):
                text = text.split(":", 1)[0] + ": " + ADDRESS_REMOVED
        field = text.encode("utf-8", "surrogateescape") + b"\r\n"
        if len(out) + len(field) > limit:
            truncated = True
            break
        out += field
    return bytes(out), truncated


def build_dsn(
    *,
    reporting_mta: str,
    postmaster_from: str,
    to: str,
    original_headers: bytes,
    recipients: list[FailedRecipient],
    arrival: datetime,
    scrub: Iterable[str],
    message_id: str,
    max_returned: int = 16384,
    now: datetime | None = None,
) -> bytes:
    """The complete DSN message (CRLF line ends), ready to queue with a null envelope sender.

    ``scrub`` lists the strings that must not appear (real address, real local part, ...); they
    become ``[address removed]``. A mapping may be given instead, to say what replaces each one
    (typically the alias). Only text that came from outside is scrubbed: the diagnostics, the
    remote MTA names and the returned headers; the other arguments are the relay's own values.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for recipient in recipients:
        if recipient.action not in _ACTIONS:
            raise ValueError(f"DSN action must be one of {_ACTIONS}: {recipient.action!r}")
        if not _STATUS.fullmatch(recipient.status):
            raise ValueError(f"not an enhanced status code: {recipient.status!r}")
        _check_plain("recipient alias", recipient.alias)
    _check_plain("reporting MTA", reporting_mta)
    _check_plain("postmaster address", postmaster_from)
    _check_plain("recipient", to)
    bare_id = message_id[1:-1] if message_id.startswith("<") and message_id.endswith(">") else message_id
    message_id = "<" + _check_plain("Message-ID", bare_id) + ">"

    scrubber = _Scrubber(scrub)
    now = _aware(now or datetime.now(UTC))
    delayed_only = all(r.action == "delayed" for r in recipients)
    subject = "Delayed Mail (still being retried)" if delayed_only else "Undelivered Mail Returned to Sender"

    def outside(text: str) -> str:
        # Scrubbed before the ASCII cleanup, so that an address with non-ASCII letters still matches.
        cleaned = _one_line_ascii(scrubber(" ".join(text.split())))
        if len(cleaned) > _MAX_DIAGNOSTIC:
            cleaned = cleaned[: _MAX_DIAGNOSTIC - 3] + "..."
        return cleaned

    diagnostics = [outside(r.diagnostic) for r in recipients]
    returned, truncated = _returned_headers(original_headers, scrubber, max_returned)

    # Part 1: for the person who sent the mail.
    if delayed_only:
        intro = (
            "Your message has not been delivered yet to the recipients below. The relay keeps "
            "trying; you need not do anything now, and you will get another notice if it gives up."
        )
    else:
        intro = (
            "Your message could not be delivered to one or more recipients below. "
            "This is a permanent error; the message will not be retried."
        )
    human = [f"This is the mail system at {reporting_mta}.", "", *textwrap.wrap(intro, 76), ""]
    for recipient, diagnostic in zip(recipients, diagnostics, strict=True):
        state = "delayed" if recipient.action == "delayed" else "failed"
        human.append(f"<{recipient.alias}>: {state}, status {recipient.status}")
        if diagnostic:
            human += textwrap.wrap(
                f"The receiving server said: {diagnostic}",
                76,
                initial_indent="    ",
                subsequent_indent="    ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        human.append("")
    human.append(
        "The headers of your message are attached" + (f" (cut to {max_returned} bytes)." if truncated else ".")
    )
    part_text = ("\r\n".join(human) + "\r\n").encode("ascii")

    # Part 2: for programs (RFC 3464 §2.2 per-message fields, §2.3 per-recipient fields).
    report = _field("Reporting-MTA", f"dns; {reporting_mta}")
    report += _field("Arrival-Date", format_datetime(_aware(arrival)))
    for recipient, diagnostic in zip(recipients, diagnostics, strict=True):
        report += "\r\n"
        report += _field("Original-Recipient", f"rfc822;{recipient.alias}")
        report += _field("Final-Recipient", f"rfc822; {recipient.alias}")
        report += _field("Action", recipient.action)
        report += _field("Status", recipient.status)
        if recipient.remote_mta:
            report += _field("Remote-MTA", f"dns; {outside(recipient.remote_mta)}")
        if diagnostic:
            report += _field("Diagnostic-Code", f"smtp; {diagnostic}")
        if recipient.action == "delayed" and recipient.will_retry_until is not None:
            report += _field("Will-Retry-Until", format_datetime(_aware(recipient.will_retry_until)))
    part_report = report.encode("ascii")

    # Part 3: the original headers. 8bit only if they were (SMTPUTF8 / raw 8-bit headers).
    cte = "8bit" if any(b > 0x7F for b in returned) else "7bit"

    boundary = "=_bsm_dsn_" + secrets.token_hex(12)
    while any(boundary.encode() in part for part in (part_text, part_report, returned)):
        boundary = "=_bsm_dsn_" + secrets.token_hex(12)  # never in practice; cheap to be sure

    head = (
        f"From: Mail Delivery System <{postmaster_from}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"Message-ID: {message_id}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f' boundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
    ).encode("ascii")
    delimiter = f"--{boundary}\r\n".encode("ascii")
    return b"".join(
        [
            head,
            delimiter,
            b"Content-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
            part_text,
            b"\r\n",
            delimiter,
            b"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n",
            part_report,
            b"\r\n",
            delimiter,
            b"Content-Description: Undelivered Message Headers\r\n"
            b"Content-Type: text/rfc822-headers\r\n" + f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode("ascii"),
            returned,
            b"\r\n",
            f"--{boundary}--\r\n".encode("ascii"),
        ]
    )
