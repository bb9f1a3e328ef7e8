"""Coverage-guided fuzzing of the message parser, the masking and the rewrite (atheris), for a fixed time.

Not part of ``make test``: ``make fuzz`` runs it (see fuzz/README.md).  Each input is one message
as it arrives after DATA, and goes through what intake and the policy stage do with it, without
the database:

1. ``rewrite.render`` on the raw bytes (``relay/headers`` must be safe on its own, bare CR/LF and
   NUL included): the documented refusal ``MalformedHeader`` (554 5.6.0) or a rendered message.
2. The bytes as the SMTP stage would hand them over (line ends made CRLF, NUL dropped):
   ``parse_headers`` -> ``parse_from`` -> ``parse_msg_ids`` -> ``mime.parse`` -> the content
   rules and ``mask_part`` on every text part with both parties' real addresses -> the Subject
   masked as ``marketplace.check`` masks it -> ``mime.rewrite_texts`` / ``replace_header_lines``
   -> ``render`` with the relay's plan.  A refusal is ``MalformedHeader`` / ``AmbiguousFrom`` /
   ``MalformedMime``; nothing else may be raised.

Properties of the forwarded message: the stdlib parses it; its body is the masked body; its
header block has CRLF line ends only and no line over 998 octets; exactly one Received (ours);
From is our alias; neither party's real address (any letter case) in a field the relay writes, in
the Subject as a reader decodes it, or in a text part -- read by ``mime.parse`` (what policy
reads) and by the stdlib parser (what mail clients read), HTML character references decoded.
Any other exception, or a broken property, is a finding: atheris saves the input as crash-*.
"""

from __future__ import annotations

import email
import email.policy
import html
import re
import sys
from email.errors import CharsetError
from email.header import decode_header, make_header

try:
    import atheris
except ImportError:          # replaying saved inputs works without it: python fuzz/fuzz_rewrite.py FILE...
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["bsm_relay.relay.headers", "bsm_relay.relay.rewrite",
                                             "bsm_relay.relay.mime", "bsm_relay.relay.marketplace",
                                             "bsm_relay.policy.content"]):
        from bsm_relay.policy import content as content_rules
        from bsm_relay.relay import mime
        from bsm_relay.relay.headers import (AmbiguousFrom, MalformedHeader, parse_from, parse_headers,
                                             parse_msg_ids, split_message)
        from bsm_relay.relay.marketplace import _encode_header
        from bsm_relay.policy.content import mask_subject as _mask_parties
        from bsm_relay.relay.rewrite import _ADDRESS, _MSG_ID, RewritePlan, render
else:
    from bsm_relay.policy import content as content_rules
    from bsm_relay.relay import mime
    from bsm_relay.relay.headers import (AmbiguousFrom, MalformedHeader, parse_from, parse_headers,
                                         parse_msg_ids, split_message)
    from bsm_relay.relay.marketplace import _encode_header
    from bsm_relay.policy.content import mask_subject as _mask_parties
    from bsm_relay.relay.rewrite import _ADDRESS, _MSG_ID, RewritePlan, render

SELLER = "jane.seller@acme-shop.example"
BUYER = "bob.buyer@real-mail.example"
PARTIES = (SELLER, BUYER)
ALIAS = "b7k2qxm4d9f3h8j2k5l7m1n4p6q8r2t5@marketplace.example"
PLAN = RewritePlan(from_display="Acme via Marketplace", from_alias=ALIAS, to_address="reader@inbox.example",
                   reply_to=ALIAS, message_id="0123abcd@marketplace.example", in_reply_to=[], references=[],
                   received="by mx.marketplace.example (bsm-relay) with ESMTP id q0123456789ab; "
                            "Fri, 27 Nov 2026 10:00:00 +0000",
                   date_if_missing="Fri, 27 Nov 2026 10:00:00 +0000")
# Every rule masks (links too), so masking always runs; the refusing defaults go through
# content_decision only.
MASK_ALL = content_rules.ContentRules(links=content_rules.Action.MASK)
DEFAULTS = content_rules.ContentRules()
# Fields the relay writes; the Subject is checked as decoded.  The other pass-through fields
# (Date, Content-*, Importance, ...) are the sender's own bytes, as are attachment names and
# contents: policy does not read them, and nothing is claimed about them here.
OURS = ("Received", "From", "Reply-To", "To", "Message-ID", "In-Reply-To", "References")


def _leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [p for p in PARTIES if p in lowered]


def _shown_leaks(text: str, content_type: str) -> list[str]:
    """Leaks in a text part; in HTML, written with character references too (anywhere in the markup)."""
    return _leaks(text) + (_leaks(html.unescape(text)) if content_type == "text/html" else [])


def _crlf(data: bytes) -> bytes:
    """What the SMTP stage accepts: CRLF line ends only, no NUL."""
    return data.replace(b"\0", b"").replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def check_rendered(out: bytes, body: bytes) -> None:
    head, out_body = split_message(out)
    assert out_body == body, "body changed by the rewrite"
    assert head.count(b"\r") == head.count(b"\n") == head.count(b"\r\n"), "bare CR/LF in the header block"
    assert all(len(line) <= 998 for line in head.split(b"\r\n")), "header line over 998 octets"
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert len(msg.get_all("Received") or []) == 1, "not exactly one Received"
    assert msg["From"].addresses[0].addr_spec == ALIAS, "From is not the alias"
    for name in OURS:
        for value in msg.get_all(name) or []:
            assert not _leaks(str(value)), f"real address in {name}"


# FINDING 1, FIXED (fuzz/README.md, tests/test_fuzz_regressions.py): policy.content.mask_subject (was marketplace._mask_parties)
# failed open.  It reads the Subject with decode_header/make_header only, and when that raises --
# an encoded word in an unknown charset ("=?ut-8?b?...?="), 8-bit text beside an encoded word --
# it passes the Subject on unmasked, while the modern parser and mail clients decode the word
# anyway; so they do an encoded word with control characters inside, which decode_header leaves
# alone.  The fix belongs in relay/marketplace.py; until it is made, a Subject of these shapes is
# not checked, so the run can find other things.  Set to False to see them.
KNOWN_UNDECODABLE_SUBJECT = False
# FINDING 2, FIXED: marketplace._decode_header let email.errors.CharsetError escape (an encoded
# word whose charset name is not ASCII, "=?utf\u00ef8?q?x?="): marketplace.check raises, and the
# sender is answered 451 4.3.0 and retries.  The fix (catch it there) belongs in relay/marketplace.py.
KNOWN_SUBJECT_CHARSET_ERROR = False
_CONTROL_IN_WORD = re.compile(r"=\?[^?]*\?[bBqQ]\?[^?]*[\x00-\x1f\x7f][^?]*\?=")


def _undecodable(value: str) -> bool:
    if _CONTROL_IN_WORD.search(value):
        return True
    try:
        make_header(decode_header(value))
    except Exception:
        return True
    return False


def _reader_subject(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except Exception:          # what a reader cannot decode it shows as written
        return value


def check_texts(out: bytes) -> None:
    """No real address in a text part, as policy reads it and as a mail client reads it."""
    block, body = split_message(out)
    for leaf in mime.parse(block, body).leaves:
        if leaf.text is not None:
            assert not _shown_leaks(leaf.text.text, leaf.content_type), "real address in a text part"
    for part in email.message_from_bytes(out, policy=email.policy.compat32).walk():
        if part.is_multipart() or part.get_content_type() not in ("text/plain", "text/html"):
            continue
        if part.get_filename() or part.get_content_disposition() == "attachment":
            continue
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            continue
        try:
            text = data.decode(part.get_content_charset() or "utf-8", "replace")
        except LookupError:
            text = data.decode("utf-8", "replace")
        assert not _shown_leaks(text, part.get_content_type()), "real address in a text part (stdlib)"


def one_input(data: bytes) -> None:
    # 1. The raw bytes: headers.py and the rewrite on their own.
    try:
        out = render(data, PLAN)
    except MalformedHeader:
        pass
    else:
        check_rendered(out, split_message(data)[1])

    # 2. The pipeline on what the SMTP stage accepts.
    raw = _crlf(data)
    block, body = split_message(raw)
    try:
        headers = parse_headers(block)
    except MalformedHeader:
        return
    try:
        sender = parse_from(headers)
    except AmbiguousFrom:
        pass                   # refused by intake; the rest is still worth running
    else:
        assert _ADDRESS.fullmatch(sender.address), "parse_from accepted an address the relay cannot write"
        assert sender.address == sender.address.strip() and "\r" not in sender.display_name
    for name in ("Message-ID", "In-Reply-To", "References"):
        for h in headers:
            if h.name.lower() == name.lower():
                ids = parse_msg_ids(h.value)
                assert len(ids) == len(set(ids)) and all(_MSG_ID.fullmatch(i) for i in ids), "bad message id"

    header_block = b"".join(h.raw for h in headers)      # as marketplace.check rebuilds it
    try:
        parsed = mime.parse(header_block, body)
    except mime.MalformedMime:
        return
    content_rules.content_decision(parsed.text_parts, DEFAULTS, PARTIES)

    def masked(part: content_rules.TextPart) -> str:
        return content_rules.mask_part(part, MASK_ALL, PARTIES)[0].text

    rewritten = mime.rewrite_texts(parsed, masked)
    fields = dict(rewritten.headers or {}) if rewritten.changed else {}
    subjects = [h for h in headers if h.name.lower() == "subject"]
    subject = subjects[0].value if subjects else ""
    try:
        safe_subject = _mask_parties(subject, PARTIES)
    except CharsetError:
        if KNOWN_SUBJECT_CHARSET_ERROR:
            return             # the known finding, see KNOWN_SUBJECT_CHARSET_ERROR
        raise
    if safe_subject != subject:
        fields["Subject"] = _encode_header(safe_subject)
    content = raw
    if fields or rewritten.changed:
        new_block = mime.replace_header_lines(header_block, fields) if fields else header_block
        content = new_block + b"\r\n" + (rewritten.body if rewritten.changed else body)
    try:
        out = render(content, PLAN)
    except MalformedHeader:
        raise AssertionError("the masked message no longer parses") from None
    check_rendered(out, split_message(content)[1])
    # The Subject as two different decoders show it (decode_header, and the modern parser).
    if not (KNOWN_UNDECODABLE_SUBJECT and _undecodable(subject)):
        for value in email.message_from_bytes(out, policy=email.policy.compat32).get_all("Subject") or []:
            assert not _leaks(_reader_subject(str(value))), "real address in the Subject (decode_header)"
        for value in email.message_from_bytes(out, policy=email.policy.default).get_all("Subject") or []:
            assert not _leaks(str(value)), "real address in the Subject"
    check_texts(out)


def main() -> None:
    if atheris is None:      # replay: python fuzz/fuzz_rewrite.py FILE... (with atheris, libFuzzer replays FILEs)
        for path in sys.argv[1:]:
            with open(path, "rb") as fh:
                one_input(fh.read())
            print(f"{path}: ok")
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
