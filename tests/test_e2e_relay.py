"""End to end over real SMTP: client -> bsm-relay serve (subprocess) -> recording downstream."""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import json
import re
import smtplib
import time

import pytest
from helpers import DEMO_BUYER, DEMO_SELLER, RelayProcess, make_relay, message, seed_pair, serving

from bsm_relay.relay.delivery import HAND_OFF_MIN

SELLER = DEMO_SELLER
SELLER_ALT = "orders@acme.example"
BUYER = DEMO_BUYER


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("relay"), sink_port=sink.port)
    seed_pair(r)
    r.cli("seller", "add", "S2", "--name", "Other Shop", "--email", "owner@other.example")
    yield from serving(r)


@pytest.fixture(scope="module")
def aliases(relay):
    a = json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)
    b = json.loads(relay.cli("alias", "S2", "B1", "--json").stdout)
    return {"buyer": a["buyer_alias"], "seller": a["seller_alias"], "buyer_s2": b["buyer_alias"]}


def send(relay: RelayProcess, mail_from: str, rcpts: list[str], data: bytes) -> None:
    with relay.smtp() as c:
        c.sendmail(mail_from, rcpts, data)


def refused(relay: RelayProcess, mail_from: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
    with relay.smtp() as c:
        with pytest.raises((smtplib.SMTPDataError, smtplib.SMTPRecipientsRefused)) as info:
            c.sendmail(mail_from, rcpts, data)
    exc = info.value
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, text = next(iter(exc.recipients.values()))
    else:
        code, text = exc.smtp_code, exc.smtp_error
    return code, text.decode() if isinstance(text, bytes) else text


GMAIL = (
    "Return-Path: <seller@acme.example>\r\n"
    "Received: from mail-sor-f41.google.com (mail-sor-f41.google.com [209.85.220.41])\r\n"
    "        by mx.google.com with SMTPS id abc; Fri, 27 Nov 2026 10:00:00 -0800\r\n"
    "DKIM-Signature: v=1; a=rsa-sha256; d=acme.example; s=s1; h=from:to; bh=x; b=y\r\n"
    "X-Originating-IP: [203.0.113.77]\r\n"
    "Message-ID: <CAF+orig-1@mail.gmail.com>\r\n"
    "From: Acme Books <seller@acme.example>\r\n"
    "To: {to}\r\n"
    "Cc: Secret Partner <partner@acme.example>\r\n"
    "Sender: seller@acme.example\r\n"
    "Reply-To: seller@acme.example\r\n"
    "X-Mailer: Acme Mailer on host ws17.acme.example\r\n"
    "Subject: Your order 111-2223334-4445556\r\n"
    "Date: Fri, 27 Nov 2026 10:00:00 -0800\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Hello Bea, your book ships today.\r\n"
)


def test_seller_to_buyer_delivered_and_scrubbed_then_reply_threads(relay, sink, aliases):
    before = len(sink.messages)
    send(relay, SELLER, [aliases["buyer"]], GMAIL.format(to=aliases["buyer"]).encode())
    got = sink.wait_for(before + 1)[-1]
    assert got.rcpt_tos == [BUYER]
    raw = got.data
    text = raw.decode()
    for leak in ("seller@acme.example", "partner@acme.example", "acme.example", "203.0.113.77",
                 "209.85.220.41", "google.com", "CAF+orig-1", "ws17", "X-Originating-IP",
                 "Return-Path"):
        assert leak not in text, leak
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == aliases["seller"]
    assert msg["From"].addresses[0].display_name == "Acme Books via Marketplace"
    assert msg["Reply-To"].addresses[0].addr_spec == aliases["seller"]
    assert msg["To"].addresses[0].addr_spec == BUYER
    assert msg["Cc"] is None and msg["Sender"] is None
    assert len(msg.get_all("Received")) == 1 and "mx.relay.test" in msg["Received"]
    # The sender side's signature is gone; ours, for the alias domain, is the only one.
    signatures = msg.get_all("DKIM-Signature")
    assert len(signatures) == 1 and "d=marketplace.example;" in signatures[0]
    assert msg["Subject"] == "Your order 111-2223334-4445556"
    assert raw.endswith(b"\r\n\r\nHello Bea, your book ships today.\r\n")
    minted = msg["Message-ID"].strip("<>")
    assert minted.endswith("@marketplace.example")
    # The envelope sender is a bounce address in the alias domain, never the seller.
    assert got.mail_from.endswith("@marketplace.example") and got.mail_from != aliases["seller"]

    # The buyer replies to the seller alias, threading on the id they saw.
    reply = (f"From: Bea Buyer <{BUYER}>\r\nTo: {aliases['seller']}\r\nSubject: Re: Your order\r\n"
             f"Message-ID: <reply-1@buyer-host.example.org>\r\nIn-Reply-To: <{minted}>\r\n"
             f"References: <{minted}>\r\nReceived: from buyer-laptop [198.51.100.9]\r\n\r\nThanks!\r\n")
    send(relay, BUYER, [aliases["seller"]], reply.encode())
    got2 = sink.wait_for(before + 2)[-1]
    assert got2.rcpt_tos == [SELLER]
    text2 = got2.data.decode()
    for leak in (BUYER, "buyer-host", "198.51.100.9", "buyer-laptop", minted):
        assert leak not in text2, leak
    msg2 = email.message_from_bytes(got2.data, policy=email.policy.default)
    assert msg2["From"].addresses[0].addr_spec == aliases["buyer"]
    assert msg2["From"].addresses[0].display_name == "Bea Buyer via Marketplace"
    assert msg2["To"].addresses[0].addr_spec == SELLER
    # Mapped back: the seller's client sees its own original Message-ID.
    assert msg2["In-Reply-To"] == "<CAF+orig-1@mail.gmail.com>"
    assert "<CAF+orig-1@mail.gmail.com>" in msg2["References"]
    reply_minted = msg2["Message-ID"].strip("<>")
    # The reply had no Date: it gets the time it arrived, with RFC 5322's numeric zone (not the
    # obsolete "GMT"), the same text as the date of our Received field.
    date = re.search(rb"(?m)^Date: (.*)\r$", got2.data).group(1).decode()
    assert re.fullmatch(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} \+0000", date), date
    assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 300
    assert " ".join(msg2["Received"].split()).endswith("; " + date)

    # And the seller's answer to that reply threads for the buyer on the buyer's own id.
    answer = (f"From: {SELLER}\r\nTo: {aliases['buyer']}\r\nSubject: Re: Re: Your order\r\n"
              f"In-Reply-To: <{reply_minted}>\r\nReferences: <CAF+orig-1@mail.gmail.com> <{reply_minted}>\r\n"
              "\r\nYou are welcome.\r\n")
    send(relay, SELLER, [aliases["buyer"]], answer.encode())
    got3 = sink.wait_for(before + 3)[-1]
    msg3 = email.message_from_bytes(got3.data, policy=email.policy.default)
    assert msg3["In-Reply-To"] == "<reply-1@buyer-host.example.org>"
    assert msg3["References"].split() == [f"<{minted}>", "<reply-1@buyer-host.example.org>"]


def test_a_large_message_is_delivered_once_and_intact(relay, sink, aliases):
    # 100 KB: over delivery.HAND_OFF_MIN, so the serving process delivers it straight from memory.
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 300
    encoded = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    data = (f"From: Acme Books <{SELLER}>\r\nTo: {aliases['buyer']}\r\nSubject: Your invoice\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=bb\r\n\r\n--bb\r\n"
            "Content-Type: text/plain\r\n\r\nThe invoice is attached.\r\n--bb\r\n"
            "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
            'Content-Disposition: attachment; filename="invoice.pdf"\r\n\r\n').encode() + encoded + b"--bb--\r\n"
    assert len(data) > HAND_OFF_MIN
    before = len(sink.messages)
    send(relay, SELLER, [aliases["buyer"]], data)
    got = sink.wait_for(before + 1)[before:]
    assert [m.rcpt_tos for m in got] == [[BUYER]]
    msg = email.message_from_bytes(got[0].data, policy=email.policy.default)
    attachment = next(msg.iter_attachments())
    assert attachment.get_content() == pdf
    time.sleep(0.5)
    assert len(sink.messages) == before + 1          # delivered once

def test_unapproved_sender_refused_recorded_pending_then_approved(relay, sink, aliases):
    before = len(sink.messages)
    code, text = refused(relay, SELLER_ALT, [aliases["buyer"]], message(SELLER_ALT, aliases["buyer"]))
    assert code == 550 and text.startswith("5.7.1 ")
    assert "not approved for this seller account" in text and SELLER_ALT in text and "approve" in text
    listing = json.loads(relay.cli("sender", "list", "S1", "--json").stdout)
    pending = [r for r in listing if r["address"] == SELLER_ALT]
    assert pending and pending[0]["status"] == "pending" and pending[0]["attempts"] == 1
    # Pending is still refused (and counted).
    refused(relay, SELLER_ALT, [aliases["buyer"]], message(SELLER_ALT, aliases["buyer"]))
    listing = json.loads(relay.cli("sender", "list", "S1", "--status", "pending", "--json").stdout)
    assert [r["attempts"] for r in listing if r["address"] == SELLER_ALT] == [2]
    assert len(sink.messages) == before
    assert json.loads(relay.cli("queue", "list", "--json").stdout) == []
    # Approved: now it passes.
    relay.cli("sender", "approve", "S1", SELLER_ALT)
    send(relay, SELLER_ALT, [aliases["buyer"]], message(SELLER_ALT, aliases["buyer"]))
    assert sink.wait_for(before + 1)[-1].rcpt_tos == [BUYER]
    # Blocked: refused with its own sentence.
    relay.cli("sender", "block", "S1", SELLER_ALT)
    code, text = refused(relay, SELLER_ALT, [aliases["buyer"]], message(SELLER_ALT, aliases["buyer"]))
    assert code == 550 and "5.7.1" in text and "blocked" in text
    assert len(sink.messages) == before + 1


def test_approval_is_per_seller(relay, sink, aliases):
    # S1's primary address is not approved for S2's buyer alias.
    code, text = refused(relay, SELLER, [aliases["buyer_s2"]], message(SELLER, aliases["buyer_s2"]))
    assert code == 550 and "not approved" in text


def test_only_the_buyer_may_write_to_the_seller_alias(relay, sink, aliases):
    before = len(sink.messages)
    stranger = "stranger@evil.example"
    code, text = refused(relay, stranger, [aliases["seller"]], message(stranger, aliases["seller"]))
    assert code == 550 and text.startswith("5.7.1") and SELLER not in text
    # Even the seller cannot write to its own seller alias (that would reach itself).
    code, _ = refused(relay, SELLER, [aliases["seller"]], message(SELLER, aliases["seller"]))
    assert code == 550
    assert len(sink.messages) == before


@pytest.mark.parametrize("rcpt", [
    "x@victim.example", "relaytest%victim.example@marketplace.example", "victim.example!relaytest",
    "victim.example!relaytest@marketplace.example", '"relaytest@victim.example"@marketplace.example',
    "@marketplace.example:relaytest@victim.example", "relaytest@victim.example@marketplace.example",
    "relaytest@victim.example@[127.0.0.1]", '"relaytest@victim.example"', "relaytest%victim.example@[127.0.0.1]",
    "evil@mx.relay.test",
])
def test_recipient_tricks_refused_at_rcpt(relay, rcpt):
    with relay.smtp() as c:
        c.mail("someone@anywhere.example")
        code, text = c.rcpt(rcpt)
    assert 500 <= code < 600, (rcpt, code, text)


def test_foreign_domain_is_relay_denied(relay):
    with relay.smtp() as c:
        c.mail("someone@anywhere.example")
        code, text = c.rcpt("x@victim.example")
    assert code == 550 and text.startswith(b"5.7.1")


def test_forged_altered_and_revoked_tokens_get_one_generic_reply(relay, aliases):
    token = aliases["buyer"].split("@")[0]
    flipped = token[:10] + ("a" if token[10] != "a" else "b") + token[11:]
    revoked_pair = json.loads(relay.cli("alias", "S2", "B1", "--json").stdout)
    replies = set()
    with relay.smtp() as c:
        c.mail("someone@anywhere.example")
        for bad in (flipped, token[:-1], token + "a", "a" * 40, "a" * 65, "zzzz"):
            replies.add(c.rcpt(f"{bad}@marketplace.example"))
    assert replies == {(550, b"5.1.1 Recipient address rejected: no such alias")}
    # Upper case and a trailing dot still resolve.
    with relay.smtp() as c:
        c.mail(SELLER)
        assert c.rcpt(f"{token.upper()}@MARKETPLACE.EXAMPLE.")[0] == 250
    relay.cli("alias", "S2", "B1", "--revoke")
    with relay.smtp() as c:
        c.mail("owner@other.example")
        assert c.rcpt(revoked_pair["buyer_alias"]) == (550, b"5.1.1 Recipient address rejected: no such alias")


@pytest.mark.parametrize("from_header", [
    f'"{SELLER}" <evil@evil.example>',                      # judged on evil@evil.example
    f"{SELLER})<evil@evil.example>",                          # CVE-2023-27043 shape
    f"{SELLER}, evil@evil.example",                           # two mailboxes
    f"Team: {SELLER};",                                       # group
    f"{SELLER} <evil@evil.example>",                          # unquoted display name with @
    "",                                                       # empty
])
def test_strict_from_refusals(relay, sink, aliases, from_header):
    before = len(sink.messages)
    data = (f"From: {from_header}\r\nTo: {aliases['buyer']}\r\nSubject: x\r\n\r\nbody\r\n").encode()
    code, text = refused(relay, SELLER, [aliases["buyer"]], data)
    assert code == 550 and text.startswith("5.7.1")
    assert len(sink.messages) == before


def test_two_from_headers_refused(relay, sink, aliases):
    data = (f"From: {SELLER}\r\nFrom: evil@evil.example\r\nTo: {aliases['buyer']}\r\n\r\nbody\r\n").encode()
    code, text = refused(relay, SELLER, [aliases["buyer"]], data)
    assert code == 550 and "exactly one mailbox" in text


def test_postmaster_accepted_and_routed_to_operator(relay, sink):
    before = len(sink.messages)
    with relay.smtp() as c:
        c.mail("anyone@outside.example")
        assert c.rcpt("postmaster")[0] == 250
        assert c.rcpt("Postmaster@marketplace.example")[0] == 250
        c.data(b"From: anyone@outside.example\r\nSubject: abuse report\r\n\r\nhello postmaster\r\n")
    got = sink.wait_for(before + 1)[-1]
    assert got.rcpt_tos == ["ops@operator.test"]
    assert b"hello postmaster" in got.data


def test_bare_lf_and_nul_refused(relay, sink, aliases):
    before = len(sink.messages)
    for body in ("line one\nline two\r\n", "nul\x00here\r\n"):
        data = f"From: {SELLER}\r\nTo: {aliases['buyer']}\r\nSubject: x\r\n\r\n{body}".encode()
        code, text = refused(relay, SELLER, [aliases["buyer"]], data)
        assert code == 550 and text.startswith("5.6.0")
    assert len(sink.messages) == before


def test_internal_failure_never_shows_a_traceback_or_default_500(relay):
    with relay.smtp() as c:
        code, text = c.docmd("RCPT TO:<x@marketplace.example>")
        assert code == 503
        code, text = c.docmd("BOGUS")
        assert b"Error: (" not in text


def test_log_has_events_and_no_real_addresses(relay, aliases):
    log = relay.log()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    names = {e["event"] for e in events}
    assert {"relay.started", "message.accepted", "smtp.rejected", "delivery.delivered"} <= names
    assert any(e.get("reason") == "sender.not_approved" for e in events)
    assert all("queue_id" in e for e in events if e["event"] == "message.accepted")
    for address in (SELLER, SELLER_ALT, BUYER, "evil@evil.example"):
        assert address not in log


def test_real_addresses_never_pass_in_the_subject(relay, sink, aliases):
    before = len(sink.messages)
    subject = f"Order 111-2223334-4445556: write to {SELLER.upper()} or =?utf-8?q?{BUYER}?="
    send(relay, SELLER, [aliases["buyer"]], message(SELLER, aliases["buyer"], subject=subject))
    got = sink.wait_for(before + 1)[-1]
    assert SELLER.encode() not in got.data.lower()
    msg = email.message_from_bytes(got.data, policy=email.policy.default)
    assert msg["Subject"] == "Order 111-2223334-4445556: write to [email removed] or [email removed]"
