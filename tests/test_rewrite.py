"""The header rewrite: allowlist, our own fields, folding, and what must never leak."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from datetime import UTC, datetime, timedelta, timezone

import pytest

from bsm_relay.relay.headers import Mailbox, MalformedHeader, parse_headers, parse_mailbox, split_message
from bsm_relay.relay.rewrite import KEEP, RewritePlan, format_received, render, rewrite_headers

SELLER_ADDRESS = b"jane.seller.shop@gmail.com"
SELLER_IP = b"93.209.194.163"
SELLER_HOME = b"p5dd1c2a3.dip0.t-ipconnect.de"

# A seller writing from Gmail through SMTP submission, as it arrives at the relay.
GMAIL = (
    b"Return-Path: <jane.seller.shop@gmail.com>\r\n"
    b"Received: from mail-wr1-f41.google.com (mail-wr1-f41.google.com [209.85.221.41])\r\n"
    b"\tby mx.marketplace.example (bsm-relay) with ESMTPS id 4TvB2k1xQz\r\n"
    b"\tfor <b7k2qxm4@marketplace.example>; Tue, 12 Mar 2024 10:15:02 +0000 (UTC)\r\n"
    b"Received: by mail-wr1-f41.google.com with SMTP id ffacd0b85a97d-33e7ae72312so2310021f8f.1\r\n"
    b"        for <b7k2qxm4@marketplace.example>; Tue, 12 Mar 2024 03:15:01 -0700 (PDT)\r\n"
    b"Received: from [192.168.1.23] (p5dd1c2a3.dip0.t-ipconnect.de. [93.209.194.163])\r\n"
    b"        by smtp.gmail.com with ESMTPSA id n9-20020a5d4009000000b0033e7a2f1c0dsm1234567wrp.45.2024.03.12\r\n"
    b"        for <b7k2qxm4@marketplace.example>\r\n"
    b"        (version=TLS1_3 cipher=TLS_AES_256_GCM_SHA384 bits=256/256);\r\n"
    b"        Tue, 12 Mar 2024 03:15:01 -0700 (PDT)\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b"        d=gmail.com; s=20230601; t=1710238501; x=1710843301; darn=marketplace.example;\r\n"
    b"        h=to:subject:message-id:date:from:in-reply-to:references:mime-version\r\n"
    b"         :from:to:cc:subject:date:message-id:reply-to;\r\n"
    b"        bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
    b"        b=Kx2fVw0yZb8Qm1uF3pX+7Lr9DkS0aTq4NcHjE6iYvW5oUgPzMlRtBsCyAe2fOdIh\r\n"
    b"         Jn3QkLr8Vw1ZpXyT6mUa9sDcFgHbEi0o==\r\n"
    b"X-Google-DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b"        d=1e100.net; s=20230601; t=1710238501; x=1710843301;\r\n"
    b"        bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=abcdEFGH==\r\n"
    b"X-Gm-Message-State: AOJu0YxQ3kH7r2s9Jd0LrP5v8mN1oE4tWcZyBg6fUaXiKpHl\r\n"
    b"X-Google-Smtp-Source: AGHT+IFq8Wm2Lk0sN3vB5xR7tY9uJ1hG4fD6aS8zX0cV2bN4mQ==\r\n"
    b"X-Received: by 2002:a5d:4e4f:0:b0:33e:7a1d:1e3b with SMTP id r15-20020a5d4e4f; Tue, 12 Mar 2024\r\n"
    b" 03:15:01 -0700 (PDT)\r\n"
    b"MIME-Version: 1.0\r\n"
    b"References: <0100018e2a1b2c3d-aaaa@marketplace.example>\r\n"
    b"In-Reply-To: <0100018e2a1b2c3d-aaaa@marketplace.example>\r\n"
    b"From: Jane Seller <jane.seller.shop@gmail.com>\r\n"
    b"Date: Tue, 12 Mar 2024 11:14:49 +0100\r\n"
    b"Message-ID: <CAJx7Kd0=8Qw+K3f5vRjane.seller.shop@mail.gmail.com>\r\n"
    b"Subject: Re: Your order #1234 has shipped\r\n"
    b"To: b7k2qxm4@marketplace.example\r\n"
    b'Content-Type: multipart/alternative; boundary="000000000000a1b2c3d4e5f6"\r\n'
    b"\r\n"
    b"--000000000000a1b2c3d4e5f6\r\n"
    b'Content-Type: text/plain; charset="UTF-8"\r\n'
    b"\r\n"
    b"Hello, your parcel is on its way.\r\n"
    b"\r\n"
    b"--000000000000a1b2c3d4e5f6\r\n"
    b'Content-Type: text/html; charset="UTF-8"\r\n'
    b"\r\n"
    b"<div dir=\"ltr\">Hello, your parcel is on its way.</div>\r\n"
    b"\r\n"
    b"--000000000000a1b2c3d4e5f6--\r\n"
)

# A seller writing from Outlook.com / Exchange Online.
OUTLOOK = (
    b"Received: from EUR05-AM6-obe.outbound.protection.outlook.com\r\n"
    b" (mail-am6eur05olkn2011.outbound.protection.outlook.com [40.92.91.11])\r\n"
    b" by mx.marketplace.example (bsm-relay) with ESMTPS id 4TvC9p2LmN;\r\n"
    b" Tue, 12 Mar 2024 10:20:13 +0000 (UTC)\r\n"
    b"ARC-Seal: i=1; a=rsa-sha256; s=arcselector9901; d=microsoft.com; cv=none;\r\n"
    b" b=dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZQ==\r\n"
    b"ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=microsoft.com;\r\n"
    b" s=arcselector9901; h=From:Date:Subject:Message-ID:Content-Type:MIME-Version;\r\n"
    b" bh=frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY=; b=c2lnbmF0dXJl\r\n"
    b"ARC-Authentication-Results: i=1; mx.microsoft.com 1; spf=none; dmarc=none;\r\n"
    b" dkim=none; arc=none\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=hotmail.com;\r\n"
    b" s=selector1; h=From:Date:Subject:Message-ID:Content-Type:MIME-Version:X-MS-Exchange-SenderADCheck;\r\n"
    b" bh=frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY=; b=aGVsbG8gd29ybGQ=\r\n"
    b"Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=rene.mueller.shop@hotmail.com\r\n"
    b"Received: from DB9PR02MB1234.eurprd02.prod.outlook.com (2603:10a6:10:2a3::12)\r\n"
    b" by AM6PR02MB5678.eurprd02.prod.outlook.com with HTTPS; Tue, 12 Mar 2024 10:20:12 +0000\r\n"
    b"Received: from [10.0.0.5] (93.209.194.163) by DB9PR02MB1234.eurprd02.prod.outlook.com\r\n"
    b" with Microsoft SMTP Server; Tue, 12 Mar 2024 10:20:11 +0000\r\n"
    b"X-Originating-IP: [93.209.194.163]\r\n"
    b"From: =?iso-8859-1?Q?Ren=E9_M=FCller?= <rene.mueller.shop@hotmail.com>\r\n"
    b'To: "b7k2qxm4@marketplace.example" <b7k2qxm4@marketplace.example>\r\n'
    b"Subject: =?iso-8859-1?Q?Ihre_Bestellung_=FCber_den_Marktplatz?=\r\n"
    b"Thread-Topic: =?iso-8859-1?Q?Ihre_Bestellung_=FCber_den_Marktplatz?=\r\n"
    b"Thread-Index: AQHadGvB3J4+0W8nQkqy1xO9b6A5Xg==\r\n"
    b"Date: Tue, 12 Mar 2024 10:20:11 +0000\r\n"
    b"Message-ID:\r\n"
    b" <DB9PR02MB12345678ABCDEF9876543210@DB9PR02MB1234.eurprd02.prod.outlook.com>\r\n"
    b"Accept-Language: de-DE, en-US\r\n"
    b"Content-Language: de-DE\r\n"
    b"X-MS-Has-Attach:\r\n"
    b"X-MS-TNEF-Correlator:\r\n"
    b"x-ms-exchange-messagesentrepresentingtype: 1\r\n"
    b"x-tmn: [Wm9tYmllIHRleHQgZm9yIGEgdGVzdA==]\r\n"
    b"x-ms-publictraffictype: Email\r\n"
    b"x-ms-traffictypediagnostic: DB9PR02MB1234:EE_|AM6PR02MB5678:EE_\r\n"
    b"x-microsoft-antispam: BCL:0;\r\n"
    b"Content-Type: text/plain; charset=\"iso-8859-1\"\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"MIME-Version: 1.0\r\n"
    b"X-OriginatorOrg: sct-15-20-4755-11-msonline-outlook-c0b75.templateTenant\r\n"
    b"\r\n"
    b"Guten Tag,\r\n"
    b"=FCber den Marktplatz: Ihre Bestellung ist unterwegs.\r\n"
    b"Ren=E9\r\n"
)

ALIAS = "s4f7hq2c@marketplace.example"
BUYER = "buyer.real@example.net"
WHEN = datetime(2024, 3, 12, 10, 20, 14, tzinfo=UTC)

PLAN = RewritePlan(
    from_display="Jane Seller via Marketplace",
    from_alias=ALIAS,
    to_address=BUYER,
    reply_to=ALIAS,
    message_id="r.0f1e2d3c4b5a@marketplace.example",
    in_reply_to=["buyer-side.1@mail.example.net"],
    references=["buyer-side.0@mail.example.net", "buyer-side.1@mail.example.net"],
    received=format_received("relay1.marketplace.example", "01HRZ4Q8J6", WHEN),
    extra=[("Authentication-Results", "relay1.marketplace.example; dkim=pass header.d=gmail.com")],
    date_if_missing="Tue, 12 Mar 2024 10:20:14 +0000",
)

# Names the relay writes itself (so they may appear, with our values).
OURS = {"received", "authentication-results", "from", "reply-to", "to", "message-id", "in-reply-to",
        "references", "date"}


def _out(raw: bytes, plan: RewritePlan = PLAN) -> tuple[bytes, bytes, list[str]]:
    out = render(raw, plan)
    block, body = split_message(out)
    return block, body, [h.name.lower() for h in parse_headers(block)]


def _lines(block: bytes) -> list[bytes]:
    assert block.endswith(b"\r\n")
    return block[:-2].split(b"\r\n")


# -- the two real-looking messages ------------------------------------------------------


@pytest.mark.parametrize("raw", [pytest.param(GMAIL, id="gmail"), pytest.param(OUTLOOK, id="outlook")])
def test_real_messages_leak_nothing_of_the_sender(raw: bytes) -> None:
    out = render(raw, PLAN)
    block, body = split_message(out)
    for secret in (
        SELLER_ADDRESS, b"rene.mueller.shop", b"hotmail.com", SELLER_IP, SELLER_HOME, b"192.168.1.23",
        b"10.0.0.5", b"209.85.221.41", b"40.92.91.11", b"mail.gmail.com", b"CAJx7Kd0",
        b"DB9PR02MB1234", b"eurprd02.prod.outlook.com", b"smtp.gmail.com", b"google", b"AQHadGvB",
        b"b7k2qxm4",  # the buyer alias the seller wrote to is not the buyer's business either
    ):
        assert secret.lower() not in block.lower(), secret
    assert body == split_message(raw)[1]
    assert out.endswith(body)


@pytest.mark.parametrize("raw", [pytest.param(GMAIL, id="gmail"), pytest.param(OUTLOOK, id="outlook")])
def test_real_messages_parse_with_the_stdlib_as_planned(raw: bytes) -> None:
    out = render(raw, PLAN)
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert not msg.defects
    (frm,) = msg["From"].addresses
    assert (frm.display_name, frm.addr_spec) == ("Jane Seller via Marketplace", ALIAS)
    assert msg["Reply-To"].addresses[0].addr_spec == ALIAS
    assert msg["To"].addresses[0].addr_spec == BUYER
    assert msg["Message-ID"] == "<r.0f1e2d3c4b5a@marketplace.example>"
    assert msg["In-Reply-To"] == "<buyer-side.1@mail.example.net>"
    assert msg["References"] == "<buyer-side.0@mail.example.net> <buyer-side.1@mail.example.net>"
    assert msg.get_all("Received") == [PLAN.received]
    assert msg["Authentication-Results"] == "relay1.marketplace.example; dkim=pass header.d=gmail.com"
    for name in ("From", "Reply-To", "To", "Message-ID", "Subject", "Date", "Content-Type", "MIME-Version"):
        assert len(msg.get_all(name) or []) == 1, name


def test_gmail_body_and_mime_survive() -> None:
    msg = email.message_from_bytes(render(GMAIL, PLAN), policy=email.policy.default)
    assert msg.is_multipart()
    assert msg["Subject"] == "Re: Your order #1234 has shipped"
    assert msg.get_body(("plain",)).get_content().strip() == "Hello, your parcel is on its way."


def test_outlook_encoded_subject_and_qp_body_survive() -> None:
    msg = email.message_from_bytes(render(OUTLOOK, PLAN), policy=email.policy.default)
    assert msg["Subject"] == "Ihre Bestellung über den Marktplatz"
    assert "über den Marktplatz" in msg.get_content()
    assert "Thread-Topic" not in msg and "Thread-Index" not in msg


@pytest.mark.parametrize("raw", [pytest.param(GMAIL, id="gmail"), pytest.param(OUTLOOK, id="outlook")])
def test_real_messages_header_order_and_kept_fields(raw: bytes) -> None:
    original = parse_headers(split_message(raw)[0])
    block, _, names = _out(raw)
    ours = ["received", "authentication-results", "from", "reply-to", "to", "message-id", "in-reply-to",
            "references"]
    assert names[: len(ours)] == ours
    kept = [h for h in original if h.name.lower() in KEEP]
    assert names[len(ours):] == [h.name.lower() for h in kept]
    assert block.endswith(b"".join(h.raw for h in kept))
    for h in original:
        if h.name.lower() not in KEEP:
            assert h.raw not in block, h.name
            if h.name.lower() not in OURS:
                assert h.name.lower() not in names, h.name


# -- the allowlist, field by field -------------------------------------------------------

DROPPED = [
    b"Received: from laptop (home.example [198.51.100.7]) by smtp.example; Tue, 12 Mar 2024 10:00:00 +0000",
    b"Return-Path: <seller@private.example>",
    b"X-Originating-IP: [198.51.100.7]",
    b"DKIM-Signature: v=1; d=private.example; s=s1; b=abc",
    b"ARC-Seal: i=1; d=private.example; b=abc",
    b"ARC-Message-Signature: i=1; d=private.example; b=abc",
    b"ARC-Authentication-Results: i=1; mx.private.example; spf=pass",
    b"Authentication-Results: mx.private.example; spf=pass smtp.mailfrom=seller@private.example",
    b"Received-SPF: pass (private.example: 198.51.100.7 is permitted)",
    b"Message-ID: <123@host.private.example>",
    b"X-Mailer: Private Mailer 1.0",
    b"User-Agent: Mozilla/5.0 Thunderbird/115.8.0",
    b"Sender: seller@private.example",
    b"Cc: partner@private.example",
    b"Bcc: secret@private.example",
    b"Reply-To: seller@private.example",
    b"To: someone@private.example",
    b"List-Unsubscribe: <mailto:unsub@private.example>",
    b"List-Id: <list.private.example>",
    b"Disposition-Notification-To: seller@private.example",
    b"Return-Receipt-To: seller@private.example",
    b"Delivered-To: seller@private.example",
    b"Resent-From: seller@private.example",
    b"Errors-To: seller@private.example",
    b"Organization: Private Shop Ltd",
    b"X-Forwarded-For: 198.51.100.7",
    b"X-Anything: seller@private.example",
    b"Thread-Topic: talk to me at seller@private.example",
    b"Thread-Index: AQHadGvB3J4+0W8nQkqy1xO9b6A5Xg==",
    b"In-Reply-To: <old@host.private.example>",
    b"References: <old@host.private.example>",
    b"Content-Description: seller@private.example",
    b"Comments: call 555-0100",
]

KEPT = [
    b"Subject: Hello\r\n  there",
    b"Date: Tue, 12 Mar 2024 11:14:49 +0100",
    b"MIME-Version: 1.0",
    b"Content-Type: text/plain;\r\n\tcharset=\"utf-8\"; format=flowed",
    b"Content-Transfer-Encoding: 8bit",
    b"Content-Disposition: inline",
    b"Content-Language: en-GB",
    b"Content-ID: <part0@local>",
    b"Auto-Submitted: auto-replied",
    b"Importance: high",
    b"Priority: urgent",
    b"X-Priority: 1 (Highest)",
    b"Sensitivity: Personal",
]

KITCHEN_SINK = b"From: Seller <seller@private.example>\r\n" + b"".join(
    line + b"\r\n" for line in DROPPED + KEPT
) + b"\r\nbody\r\n"


@pytest.mark.parametrize("line", [pytest.param(x, id=x.split(b":")[0].decode()) for x in DROPPED])
def test_dropped_header_is_absent(line: bytes) -> None:
    block, _, names = _out(KITCHEN_SINK)
    name = line.split(b":")[0].decode().lower()
    assert line not in block
    if name not in OURS:
        assert name not in names
    else:  # ours is there exactly once, with our value
        assert names.count(name) == 1


def test_nothing_of_the_kitchen_sink_sender_survives() -> None:
    block, body, _ = _out(KITCHEN_SINK)
    for secret in (b"private.example", b"198.51.100.7", b"Thunderbird", b"555-0100", b"AQHadGvB"):
        assert secret not in block
    assert body == b"body\r\n"


@pytest.mark.parametrize("line", [pytest.param(x, id=x.split(b":")[0].decode()) for x in KEPT])
def test_kept_header_is_byte_identical(line: bytes) -> None:
    block, _, _ = _out(KITCHEN_SINK)
    assert b"\r\n" + line + b"\r\n" in block


def test_keep_is_the_documented_allowlist() -> None:
    assert {x.split(b":")[0].decode().lower() for x in KEPT} == KEEP


def test_kept_names_match_case_insensitively_and_keep_their_spelling() -> None:
    block, _, _ = _out(b"From: a@b.example\r\nSUBJECT: shout\r\ncontent-type: text/plain\r\n\r\nx")
    assert b"\r\nSUBJECT: shout\r\ncontent-type: text/plain\r\n" in block


@pytest.mark.parametrize("name", [b"Subject", b"Date", b"Content-Type", b"MIME-Version", b"Content-Transfer-Encoding"])
def test_duplicate_kept_header_keeps_the_first_only(name: bytes) -> None:
    raw = b"From: a@b.example\r\n" + name + b": first\r\nX-Y: z\r\n" + name + b": second\r\n\r\nbody"
    block, _, names = _out(raw)
    assert name + b": first\r\n" in block
    assert b"second" not in block
    assert names.count(name.decode().lower()) == 1


def test_output_order() -> None:
    raw = b"Content-Type: text/plain\r\nX-A: 1\r\nSubject: s\r\nFrom: a@b.example\r\nMIME-Version: 1.0\r\n\r\nb"
    _, _, names = _out(raw)
    assert names == ["received", "authentication-results", "from", "reply-to", "to", "message-id",
                     "in-reply-to", "references", "content-type", "subject", "mime-version", "date"]


def test_date_added_only_when_missing() -> None:
    block, _, _ = _out(b"Subject: s\r\n\r\nb")
    assert block.endswith(b"Date: Tue, 12 Mar 2024 10:20:14 +0000\r\n")
    block, _, names = _out(b"Date: Mon, 11 Mar 2024 09:00:00 +0000\r\n\r\nb")
    assert names.count("date") == 1
    assert b"Date: Mon, 11 Mar 2024 09:00:00 +0000\r\n" in block


def test_no_in_reply_to_or_references_when_empty() -> None:
    plan = dataclasses.replace(PLAN, in_reply_to=[], references=[], extra=[])
    _, _, names = _out(b"Subject: s\r\n\r\nb", plan)
    assert names == ["received", "from", "reply-to", "to", "message-id", "subject", "date"]


# -- From, display names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("display", "header"),
    [
        ("Jane Seller via Marketplace", b'From: "Jane Seller via Marketplace" <s4f7hq2c@marketplace.example>'),
        ('Jane "JJ" O\\Hara via M', b'From: "Jane \\"JJ\\" O\\\\Hara via M" <s4f7hq2c@marketplace.example>'),
        ("Seller, Jane via M", b'From: "Seller, Jane via M" <s4f7hq2c@marketplace.example>'),
        ("", b"From: <s4f7hq2c@marketplace.example>"),
        ("Jane\r\nBcc: victim@example.com", b'From: "Jane Bcc: victim@example.com" <s4f7hq2c@marketplace.example>'),
    ],
)
def test_from_header_ascii(display: str, header: bytes) -> None:
    block, _, _ = _out(b"Subject: s\r\n\r\nb", dataclasses.replace(PLAN, from_display=display))
    assert b"\r\n" + header + b"\r\n" in block


@pytest.mark.parametrize(
    "display",
    [
        "René Müller via Marketplace",
        "山田太郎 via マーケットプレイス",
        "Jane 🚀 Seller via Marketplace",
        'Zoë "the best" \\ Seller',
        "=?utf-8?q?not_an_encoded_word?= via M",  # shown literally, not decoded
        "Jane Seller via Marketplace",
        'Plain "quoted" \\ name',
    ],
)
def test_display_name_round_trips_through_the_stdlib(display: str) -> None:
    out = render(b"Subject: s\r\n\r\nb", dataclasses.replace(PLAN, from_display=display))
    block = split_message(out)[0]
    assert block.isascii()
    assert all(len(line) <= 78 for line in _lines(block) if not line.startswith(b"Authentication-Results"))
    msg = email.message_from_bytes(out, policy=email.policy.default)
    (frm,) = msg["From"].addresses
    assert (frm.display_name, frm.addr_spec) == (display, ALIAS)


def test_long_display_name_is_split_into_words_at_spaces() -> None:
    display = "Ünïcödé Seller " * 6 + "via Marketplace"
    out = render(b"Subject: s\r\n\r\nb", dataclasses.replace(PLAN, from_display=display))
    block = split_message(out)[0]
    (frm,) = [h for h in parse_headers(block) if h.name == "From"]
    assert frm.raw.count(b"=?utf-8?b?") > 1
    assert all(len(line) <= 78 for line in frm.raw[:-2].split(b"\r\n"))
    # An RFC 2047 reader (ours) drops the whitespace between words: exact round trip.
    assert parse_mailbox(frm.value) == Mailbox(display, ALIAS)
    # CPython keeps it (its own bug), which costs a doubled space between words at most.
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["From"].addresses[0].display_name.split() == display.split()


# -- folding and line limits ---------------------------------------------------------------


def test_long_references_fold_to_78_and_unfold_to_the_ids() -> None:
    ids = [f"{i:04d}.{'x' * 30}@marketplace.example" for i in range(60)]
    plan = dataclasses.replace(PLAN, references=ids)
    out = render(b"Subject: s\r\n\r\nb", plan)
    block = split_message(out)[0]
    assert all(len(line) <= 78 for line in _lines(block))
    refs = [h for h in parse_headers(block) if h.name == "References"]
    assert len(refs) == 1 and refs[0].raw.count(b"\r\n") > 10
    assert refs[0].value == " ".join(f"<{i}>" for i in ids)
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["References"].split() == [f"<{i}>" for i in ids]


def test_long_id_that_cannot_fold_to_78_stays_under_998() -> None:
    ids = ["a" * 240 + "@x.example", "b" * 240 + "@x.example"]
    block, _, _ = _out(b"\r\nb", dataclasses.replace(PLAN, references=ids))
    assert all(len(line) <= 998 for line in _lines(block))
    assert b"\r\nReferences: <" + ids[0].encode() + b">\r\n <" + ids[1].encode() + b">\r\n" in block


def test_overlong_kept_line_is_refolded_under_998() -> None:
    subject = " ".join(["word"] * 400)  # a 1999-character line
    raw = b"Subject: " + subject.encode() + b"\r\nShort: x\r\n\r\nbody"
    block, body, _ = _out(raw)
    assert all(len(line) <= 998 for line in _lines(block))
    (kept,) = [h for h in parse_headers(block) if h.name == "Subject"]
    assert kept.value == subject
    assert body == b"body"


def test_overlong_kept_word_is_broken_rather_than_sent_invalid() -> None:
    raw = b"Subject: " + "é".encode() * 1000 + b"\r\n\r\nbody"
    block, _, _ = _out(raw)
    assert all(len(line) <= 998 for line in _lines(block))
    (kept,) = [h for h in parse_headers(block) if h.name == "Subject"]
    assert kept.value.replace(" ", "") == "é" * 1000  # broken on a character boundary


def test_overlong_kept_line_without_any_space_is_broken() -> None:
    raw = b"Subject:" + b"x" * 2500 + b"\r\n\r\nbody"
    block, _, _ = _out(raw)
    assert all(len(line) <= 998 for line in _lines(block))
    (kept,) = [h for h in parse_headers(block) if h.name == "Subject"]
    assert kept.value.replace(" ", "") == "x" * 2500


def test_kept_line_within_limits_is_not_refolded() -> None:
    subject = b"Subject: " + b"x" * 900  # long, unfoldable, but legal: passes untouched
    block, _, _ = _out(subject + b"\r\n\r\nb")
    assert b"\r\n" + subject + b"\r\n" in block


# -- message shapes --------------------------------------------------------------------------


def test_header_only_message() -> None:
    raw = b"From: a@b.example\r\nSubject: only headers\r\n"
    out = render(raw, PLAN)
    block, body = split_message(out)
    assert body == b""
    assert out.endswith(b"Subject: only headers\r\nDate: Tue, 12 Mar 2024 10:20:14 +0000\r\n\r\n")


def test_header_only_message_without_final_crlf() -> None:
    out = render(b"Subject: last", PLAN)
    assert out.endswith(b"\r\nSubject: last\r\nDate: Tue, 12 Mar 2024 10:20:14 +0000\r\n\r\n")


def test_body_only_message() -> None:
    out = render(b"\r\nFrom: not-a-header@evil.example\r\n\r\nbody\r\n", PLAN)
    block, body = split_message(out)
    assert body == b"From: not-a-header@evil.example\r\n\r\nbody\r\n"
    assert b"evil.example" not in block
    assert [h.name for h in parse_headers(block)][-1] == "Date"


def test_body_bytes_pass_through_untouched() -> None:
    body = b"line one\r\n.\r\n..dot\r\n\xff\xfe binary \x00 junk\r\nSubject: not a header\r\n\r\n\r\n"
    out = render(b"Subject: s\r\n\r\n" + body, PLAN)
    assert split_message(out)[1] == body
    assert out.endswith(b"\r\n\r\n" + body)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"Subject: s\r\nthis line has no colon\r\n\r\nbody", id="no-colon"),
        pytest.param(b" leading continuation\r\nSubject: s\r\n\r\nbody", id="continuation-first"),
        pytest.param(b"Subject: s\nBcc: x@y.example\r\n\r\nbody", id="bare-lf"),
    ],
)
def test_malformed_header_block_raises(raw: bytes) -> None:
    with pytest.raises(MalformedHeader):
        render(raw, PLAN)


def test_all_output_lines_are_crlf_and_bounded() -> None:
    for raw in (GMAIL, OUTLOOK, KITCHEN_SINK):
        block = split_message(render(raw, PLAN))[0]
        assert block.count(b"\n") == block.count(b"\r\n") == block.count(b"\r")
        assert all(0 < len(line) <= 998 for line in _lines(block))


# -- our own values ----------------------------------------------------------------------------


def test_format_received() -> None:
    value = format_received("relay1.marketplace.example", "01HRZ4Q8J6", WHEN)
    assert value == (
        "by relay1.marketplace.example (bsm-relay) with ESMTP id 01HRZ4Q8J6; Tue, 12 Mar 2024 10:20:14 +0000")
    assert "from" not in value
    cet = datetime(2024, 3, 12, 11, 20, 14, tzinfo=timezone(timedelta(hours=1)))
    assert format_received("h.example", "Q", cet, protocol="ESMTPS").endswith(
        "with ESMTPS id Q; Tue, 12 Mar 2024 11:20:14 +0100")


def test_received_dates_are_kept_per_second_and_zone_only() -> None:
    # The date text is formatted once a second: microseconds never show, the next second does,
    # and the same instant in another zone (an equal datetime) keeps its own offset.
    texts = [format_received("h.example", "Q", when).rsplit("; ", 1)[1] for when in (
        WHEN, WHEN.replace(microsecond=999_999), WHEN + timedelta(seconds=1),
        WHEN.astimezone(timezone(timedelta(hours=-5))), WHEN)]
    assert texts == ["Tue, 12 Mar 2024 10:20:14 +0000", "Tue, 12 Mar 2024 10:20:14 +0000",
                     "Tue, 12 Mar 2024 10:20:15 +0000", "Tue, 12 Mar 2024 05:20:14 -0500",
                     "Tue, 12 Mar 2024 10:20:14 +0000"]


@pytest.mark.parametrize(
    ("hostname", "queue_id", "protocol"),
    [
        ("relay.example\r\nBcc: x@y", "Q", "ESMTP"),
        ("relay example", "Q", "ESMTP"),
        ("relay.example", "Q;1", "ESMTP"),
        ("relay.example", "", "ESMTP"),
        ("relay.example", "Q", "ESMTP (x)"),
    ],
)
def test_format_received_refuses_odd_tokens(hostname: str, queue_id: str, protocol: str) -> None:
    with pytest.raises(ValueError):
        format_received(hostname, queue_id, WHEN, protocol)


@pytest.mark.parametrize(
    "change",
    [
        {"from_alias": "a@b.example\r\nBcc: x@y.example"},
        {"from_alias": "not an address"},
        {"from_alias": "a@b..example"},
        {"reply_to": "<a@b.example>"},
        {"to_address": "a@b.example, c@d.example"},
        {"message_id": "<id@x>"},
        {"message_id": "id with space@x"},
        {"message_id": "x" * 251},
        {"references": ["ok@x", "bad id@x"]},
        {"in_reply_to": [""]},
        {"received": "by x; date\r\nBcc: y@z.example"},
        {"date_if_missing": "Tue\r\n"},
        {"extra": [("From", "evil@y.example")]},
        {"extra": [("Subject", "second subject")]},
        {"extra": [("Bad Name", "x")]},
        {"extra": [("X-Ok", "caf\u00e9")]},
    ],
)
def test_plan_values_that_would_corrupt_the_header_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        rewrite_headers([], dataclasses.replace(PLAN, **change))  # type: ignore[arg-type]
