"""DSN building (relay/bounce.py): RFC 3464 structure, aliases only, no real address anywhere."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import pytest

from bsm_relay.relay.bounce import ADDRESS_REMOVED, FailedRecipient, build_dsn

ALIAS = "k3v7q2m9x4b8n1c5@marketplace.example"
ALIAS2 = "p8r2t6w4y1z3a7d9@marketplace.example"
REAL = "bob.buyer@real-mail.example"
REAL2 = "carol@other-real.example"
ARRIVAL = datetime(2026, 1, 1, 9, 30, tzinfo=UTC)
NOW = datetime(2026, 1, 1, 9, 45, tzinfo=UTC)

ORIGINAL = (
    b"Received: from seller-mx.example by relay.marketplace.example\r\n"
    b"From: Anna Seller <anna@seller.example>\r\n"
    b"To: " + ALIAS.encode() + b"\r\n"
    b"Subject: Your order 1234 has shipped\r\n"
    b"Date: Thu, 01 Jan 2026 09:29:00 +0000\r\n"
    b"Message-ID: <m1@seller.example>\r\n"
    b"X-Leak: forwarded for BOB.BUYER@REAL-MAIL.EXAMPLE\r\n"
    b"References: <a@seller.example>\r\n <b@seller.example>\r\n"
)


def _failed(**overrides: object) -> FailedRecipient:
    values: dict[str, object] = {
        "alias": ALIAS,
        "status": "5.1.1",
        "action": "failed",
        "diagnostic": "550 5.1.1 <Bob.Buyer@Real-Mail.Example>: Recipient address rejected: User unknown",
        "remote_mta": "mx1.real-mail.example",
    }
    values.update(overrides)
    return FailedRecipient(**values)  # type: ignore[arg-type]


def _build(recipients: list[FailedRecipient] | None = None, **overrides: object) -> bytes:
    arguments: dict[str, object] = {
        "reporting_mta": "relay.marketplace.example",
        "postmaster_from": "postmaster@marketplace.example",
        "to": "anna@seller.example",
        "original_headers": ORIGINAL,
        "recipients": recipients if recipients is not None else [_failed()],
        "arrival": ARRIVAL,
        "scrub": [REAL, "bob.buyer", REAL2],
        "message_id": "<dsn-q4f9c2a1b7e@marketplace.example>",
        "now": NOW,
    }
    arguments.update(overrides)
    return build_dsn(**arguments)  # type: ignore[arg-type]


def _parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _recipient_blocks(report: EmailMessage) -> list[dict[str, str]]:
    blocks = report.get_payload()
    assert isinstance(blocks, list)
    return [{k.lower(): str(v) for k, v in block.items()} for block in blocks]


def test_structure_of_a_failure_dsn() -> None:
    raw = _build()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    message = _parse(raw)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["From"] == "Mail Delivery System <postmaster@marketplace.example>"
    assert message["To"] == "anna@seller.example"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["Message-ID"] == "<dsn-q4f9c2a1b7e@marketplace.example>"
    assert message["Date"].datetime == NOW
    assert not message.defects

    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    human = parts[0].get_content()
    assert ALIAS in human and "5.1.1" in human and "User unknown" in human

    per_message, per_recipient = _recipient_blocks(parts[1])
    assert per_message["reporting-mta"] == "dns; relay.marketplace.example"
    assert email.utils.parsedate_to_datetime(per_message["arrival-date"]) == ARRIVAL
    assert per_recipient["original-recipient"] == f"rfc822;{ALIAS}"
    assert per_recipient["final-recipient"] == f"rfc822; {ALIAS}"
    assert per_recipient["action"] == "failed"
    assert per_recipient["status"] == "5.1.1"
    assert per_recipient["remote-mta"] == "dns; mx1.real-mail.example"
    assert per_recipient["diagnostic-code"] == (
        f"smtp; 550 5.1.1 <{ADDRESS_REMOVED}>: Recipient address rejected: User unknown"
    )
    assert "will-retry-until" not in per_recipient

    returned = parts[2].get_payload(decode=True)
    assert returned.startswith(b"Received: from seller-mx.example")
    assert b"Subject: Your order 1234 has shipped\r\n" in returned
    assert b"References: <a@seller.example>\r\n <b@seller.example>\r\n" in returned


@pytest.mark.parametrize("spelling", [REAL, REAL.upper(), "Bob.Buyer@Real-Mail.Example", "BOB.buyer"])
def test_real_address_appears_nowhere(spelling: str) -> None:
    raw = _build([_failed(diagnostic=f"550 5.1.1 <{spelling}> unknown; see {spelling}")])
    assert REAL.lower().encode() not in raw.lower()
    assert b"bob.buyer" not in raw.lower()
    text = _parse(raw).get_body(preferencelist=("plain",))
    assert text is not None and ADDRESS_REMOVED in text.get_content()


def test_scrub_mapping_replaces_with_the_alias() -> None:
    raw = _build(scrub={REAL: ALIAS, "bob.buyer": "[removed]"})
    assert b"bob.buyer" not in raw.lower()
    per_recipient = _recipient_blocks(list(_parse(raw).iter_parts())[1])[1]
    assert per_recipient["diagnostic-code"].startswith(f"smtp; 550 5.1.1 <{ALIAS}>:")


def test_address_inside_an_encoded_word_is_removed() -> None:
    encoded = b"X-Name: =?utf-8?b?" + __import__("base64").b64encode(b"To bob.buyer@real-mail.example") + b"?=\r\n"
    raw = _build(original_headers=ORIGINAL + encoded)
    returned = list(_parse(raw).iter_parts())[2].get_payload(decode=True)
    assert f"X-Name: {ADDRESS_REMOVED}".encode() in returned


def test_diagnostic_cannot_inject_fields_or_lines() -> None:
    nasty = "451 4.4.1 try later\r\nFinal-Recipient: rfc822; bob.buyer@real-mail.example\r\n\r\nX: \x00\u00e9"
    raw = _build([_failed(diagnostic=nasty, status="4.4.1", action="delayed")])
    blocks = _recipient_blocks(list(_parse(raw).iter_parts())[1])
    assert len(blocks) == 2
    assert blocks[1]["final-recipient"] == f"rfc822; {ALIAS}"
    assert blocks[1]["diagnostic-code"] == (
        f"smtp; 451 4.4.1 try later Final-Recipient: rfc822; {ADDRESS_REMOVED} X: ??"
    )


def test_returned_headers_are_capped_at_a_header_boundary() -> None:
    many = b"".join(b"X-Filler-%03d: %s\r\n" % (i, b"y" * 80) for i in range(400))
    original = ORIGINAL + many + b"\r\nBody text that must not be returned\r\n"
    raw = _build(original_headers=original, max_returned=4096)
    parts = list(_parse(raw).iter_parts())
    returned = parts[2].get_payload(decode=True)
    assert 0 < len(returned) <= 4096
    assert returned.endswith(b"\r\n")
    assert all(line.startswith((b"X-", b" ")) or b": " in line for line in returned.split(b"\r\n")[:-1])
    assert b"Body text" not in raw
    assert "cut to 4096 bytes" in parts[0].get_content()
    # Uncapped, every field comes back and the note is absent.
    full = list(_parse(_build(original_headers=original, max_returned=10**6)).iter_parts())
    assert full[2].get_payload(decode=True).count(b"X-Filler-") == 400
    assert "cut to" not in full[0].get_content()


def test_delayed_variant() -> None:
    until = ARRIVAL + timedelta(days=5)
    delayed = _failed(action="delayed", status="4.4.1", diagnostic="451 4.4.1 Try again later", will_retry_until=until)
    message = _parse(_build([delayed]))
    assert message["Subject"] == "Delayed Mail (still being retried)"
    parts = list(message.iter_parts())
    assert "not been delivered yet" in parts[0].get_content()
    block = _recipient_blocks(parts[1])[1]
    assert block["action"] == "delayed" and block["status"] == "4.4.1"
    assert email.utils.parsedate_to_datetime(block["will-retry-until"]) == until


def test_mixed_failed_and_delayed_with_two_recipients() -> None:
    recipients = [
        _failed(),
        _failed(
            alias=ALIAS2, action="delayed", status="4.2.2", diagnostic=f"452 <{REAL2}> mailbox full", remote_mta=None
        ),
    ]
    raw = _build(recipients)
    message = _parse(raw)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    per_message, first, second = _recipient_blocks(list(message.iter_parts())[1])
    assert "reporting-mta" in per_message and "final-recipient" not in per_message
    assert first["final-recipient"] == f"rfc822; {ALIAS}" and first["action"] == "failed"
    assert second["final-recipient"] == f"rfc822; {ALIAS2}" and second["action"] == "delayed"
    assert "remote-mta" not in second
    assert REAL2.encode() not in raw.lower()


def test_long_diagnostic_is_folded_and_bounded() -> None:
    raw = _build([_failed(diagnostic="550 5.7.1 " + "blocked " * 300)])
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    block = _recipient_blocks(list(_parse(raw).iter_parts())[1])[1]
    assert block["diagnostic-code"].startswith("smtp; 550 5.7.1 blocked blocked")
    assert block["diagnostic-code"].endswith("...")


def test_boundary_is_random() -> None:
    first, second = _parse(_build()), _parse(_build())
    assert first.get_boundary() != second.get_boundary()


@pytest.mark.parametrize(
    "overrides",
    [
        {"recipients": []},
        {"recipients": [_failed(action="delivered")]},
        {"recipients": [_failed(status="550")]},
        {"recipients": [_failed(alias="x@y\r\nBcc: z@w")]},
        {"to": "anna@seller.example\r\nBcc: victim@example.com"},
        {"to": ""},
        {"postmaster_from": "a b@c"},
        {"message_id": "<x@y>\r\nX: 1"},
    ],
)
def test_invalid_input_is_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _build(**overrides)  # type: ignore[arg-type]


def test_message_id_brackets_and_naive_datetimes() -> None:
    message = _parse(_build(message_id="bare@marketplace.example", now=NOW.replace(tzinfo=None)))
    assert message["Message-ID"] == "<bare@marketplace.example>"
    assert message["Date"].datetime == NOW


def test_eight_bit_headers_are_declared() -> None:
    raw = _build(original_headers=ORIGINAL + "Subject: Grüße\r\n".encode())
    part = list(_parse(raw).iter_parts())[2]
    assert part["Content-Transfer-Encoding"] == "8bit"
    assert list(_parse(_build()).iter_parts())[2]["Content-Transfer-Encoding"] == "7bit"
