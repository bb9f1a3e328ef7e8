"""Property-based tests (hypothesis) for the pure parts that see hostile input: the header rewrite,
content masking, the alias codec and DSN building (catalogue issue 8; the coverage-guided
harness for the same code is fuzz/fuzz_rewrite.py).

The properties:
- rewrite: any message either raises the documented ``MalformedHeader`` (the relay answers
  ``554 5.6.0``) or renders into a message that the stdlib parses, whose body bytes are the
  original's, with exactly one Received (ours) and neither party's real address in a field
  the relay does not pass through verbatim (the Subject is masked by policy before the rewrite,
  see the masking property; the other ``KEEP`` fields are the sender's own bytes);
- masking: a real address anywhere in a text, in any letter case, is gone after masking;
- alias codec: random and bit-flipped tokens never resolve; case does not matter to real ones;
- DSN: any diagnostic, remote MTA name and returned header block either raises the documented
  ``ValueError`` (for values the relay writes itself) or yields a parseable RFC 3464 report
  without the real address, CRLF only, no line over 998 octets.
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
from datetime import UTC, datetime

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from bsm_relay.aliases.codec import AliasCodec, Direction
from bsm_relay.aliases.routing import Kind, route
from bsm_relay.policy.content import Action, ContentRules, mask_html, mask_text
from bsm_relay.relay.bounce import FailedRecipient, build_dsn
from bsm_relay.relay.headers import MalformedHeader, split_message
from bsm_relay.relay.rewrite import KEEP, RewritePlan, render

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SELLER = "jane.seller@acme-shop.example"
BUYER = "bob.buyer@real-mail.example"
DOMAIN = "marketplace.example"
ALIAS = "b7k2qxm4d9f3h8j2k5l7m1n4p6q8r2t5@" + DOMAIN

PLAN = RewritePlan(from_display="Acme via Marketplace", from_alias=ALIAS, to_address="reader@inbox.example",
                   reply_to=ALIAS, message_id="0123abcd@" + DOMAIN, in_reply_to=[], references=[],
                   received="by mx.marketplace.example (bsm-relay) with ESMTP id q0123456789ab; "
                            "Fri, 27 Nov 2026 10:00:00 +0000",
                   date_if_missing="Fri, 27 Nov 2026 10:00:00 +0000")

# -- strategies --------------------------------------------------------------------------------

printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
leak = st.sampled_from([SELLER, BUYER, SELLER.upper(), BUYER.title(), f"<{SELLER}>", f"{BUYER}>"])
names = st.sampled_from(["From", "To", "Cc", "Bcc", "Reply-To", "Sender", "Return-Path", "Received",
                         "X-Originating-IP", "DKIM-Signature", "Message-ID", "In-Reply-To", "References",
                         "X-Mailer", "List-Unsubscribe", "Disposition-Notification-To", "Thread-Topic",
                         "Subject", "Date", "Content-Type", "MIME-Version", "Auto-Submitted", "X-Junk"])


@st.composite
def header_value(draw: st.DrawFn, name: str) -> str:
    value = draw(printable)
    if name.lower() not in KEEP and draw(st.booleans()):
        cut = draw(st.integers(0, len(value)))
        value = value[:cut] + draw(leak) + value[cut:]
    if draw(st.booleans()):          # folded continuation lines
        value += "\r\n " + draw(printable)
    return value


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(raw message, its body): well-formed header lines mostly, hostile now and then."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(names)
        lines.append(f"{name}: {draw(header_value(name))}\r\n")
    if draw(st.integers(0, 9)) == 0:                        # a line that is not a field
        junk = draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=60))
        lines.insert(draw(st.integers(0, len(lines))), junk + "\r\n")
    body_lines = draw(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                               max_size=6))
    body = b"".join(line + b"\r\n" for line in body_lines)
    head = "".join(lines).encode("ascii")
    return head + b"\r\n" + body, body


# -- rewrite ------------------------------------------------------------------------------------

@SETTINGS
@given(messages())
@example((b"From: a@b.example\r\n\r\nbody\r\n", b"body\r\n"))
@example((b"\r\nno headers\r\n", b"no headers\r\n"))
def test_rewrite_refuses_or_renders_a_parseable_message_without_real_addresses(case: tuple[bytes, bytes]) -> None:
    raw, body = case
    try:
        out = render(raw, PLAN)
    except MalformedHeader:
        return                                              # the documented refusal: 554 5.6.0
    head, out_body = split_message(out)
    assert out_body == split_message(raw)[1]                # the body is untouched
    if not raw.startswith(b"\r\n"):                         # (an empty first line: all of it is body)
        assert out_body == body
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == ALIAS
    assert len(msg.get_all("Received")) == 1
    assert head.count(b"\r") == head.count(b"\n") == head.count(b"\r\n")   # CRLF only in what we write
    lowered = head.decode("ascii", "replace").lower()
    for real in (SELLER, BUYER):
        assert real.lower() not in lowered
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))


# -- masking ------------------------------------------------------------------------------------

MASK = ContentRules(emails=Action.MASK, phones=Action.MASK)


@st.composite
def texts_with_an_address(draw: st.DrawFn) -> tuple[str, str]:
    real = draw(st.sampled_from([SELLER, BUYER]))
    spelled = draw(st.sampled_from([real, real.upper(), real.title(), f"<{real}>", f"mailto:{real}",
                                    f"({real})", f"{real}."]))
    before, after = draw(any_text), draw(any_text)
    sep = draw(st.sampled_from([" ", "\n", "\t", ": ", " \u00a0", ""]))
    return before + sep + spelled + draw(st.sampled_from([" ", "\n", ",", "", "!"])) + after, real


@SETTINGS
@given(texts_with_an_address())
def test_masking_removes_a_real_address_in_any_spelling(case: tuple[str, str]) -> None:
    text, real = case
    masked, findings = mask_text(text, MASK, parties=[SELLER, BUYER])
    assert real.lower() not in masked.lower()
    assert findings


@SETTINGS
@given(texts_with_an_address(), st.sampled_from(["<p>{}</p>", "<a href=\"mailto:{0}\">{0}</a>", "<div>x {} y</div>",
                                                 "<p title=\"{}\">hi</p>"]))
def test_html_masking_removes_a_real_address(case: tuple[str, str], shape: str) -> None:
    text, real = case
    markup = shape.format(text.replace("<", " ").replace(">", " ").replace("&", " ").replace('"', " "))
    masked, _ = mask_html(markup, MASK, parties=[SELLER, BUYER])
    assert real.lower() not in masked.lower()


# -- alias codec --------------------------------------------------------------------------------

CODEC = AliasCodec({1: bytes(range(64)), 2: bytes(range(64, 128))}, current=2)
B32 = "abcdefghijklmnopqrstuvwxyz234567"


@SETTINGS
@given(st.text(st.sampled_from(B32), min_size=1, max_size=80))
def test_random_tokens_never_resolve(token: str) -> None:
    assert CODEC.decode(token) is None
    r = route(f"{token}@{DOMAIN}", DOMAIN, frozenset())
    assert r.kind in (Kind.ALIAS, Kind.INVALID, Kind.BOUNCE)


@SETTINGS
@given(st.sampled_from(list(Direction)), st.integers(1, 2**40), st.integers(1, 2**40), st.data())
def test_bit_flipped_tokens_never_resolve_and_case_does_not_matter(direction: Direction, seller: int, buyer: int,
                                                                  data: st.DataObject) -> None:
    token = CODEC.encode(direction, seller, buyer)
    ref = CODEC.decode(token.upper())
    assert ref is not None and (ref.direction, ref.seller_id, ref.buyer_id) == (direction, seller, buyer)
    raw = bytearray(base64.b32decode(token.upper() + "=" * (-len(token) % 8)))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    forged = base64.b32encode(bytes(raw)).decode().rstrip("=").lower()
    assume(forged != token)
    assert CODEC.decode(forged) is None
    # Truncated or extended by one character: never the pair either.
    assert CODEC.decode(token[:-1]) is None
    extended = CODEC.decode(token + data.draw(st.sampled_from(B32)))
    assert extended is None or (extended.seller_id, extended.buyer_id) != (seller, buyer) or extended is None


# -- DSN ----------------------------------------------------------------------------------------

@SETTINGS
@given(any_text, st.one_of(st.none(), printable), st.binary(max_size=400), leak, st.sampled_from(["failed", "delayed"]))
def test_dsn_parses_and_never_carries_the_real_address(diagnostic: str, remote: str | None, headers: bytes,
                                                       real: str, action: str) -> None:
    original = b"Subject: x\r\nX-Leak: " + real.encode() + b"\r\n" + headers
    recipient = FailedRecipient(alias=ALIAS, status="5.1.1" if action == "failed" else "4.4.1", action=action,
                                diagnostic=f"550 {real} {diagnostic}", remote_mta=remote)
    try:
        raw = build_dsn(reporting_mta="mx.marketplace.example", postmaster_from="postmaster@" + DOMAIN,
                        to=SELLER, original_headers=original, recipients=[recipient],
                        arrival=datetime(2026, 11, 27, tzinfo=UTC), scrub=[BUYER, "bob.buyer"],
                        message_id="<dsn-1@marketplace.example>")
    except ValueError:
        assert remote is not None                           # only a remote MTA name that is not a plain name
        return
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report" and msg["Auto-Submitted"] == "auto-replied"
    assert BUYER.encode().lower() not in raw.lower()


def test_the_examples_run_quickly_enough_for_make_test() -> None:
    # Guard against someone raising max_examples into a soak test: that is what fuzz/ is for.
    assert SETTINGS.max_examples <= 200 and os.environ.get("HYPOTHESIS_PROFILE", "") != "soak"
