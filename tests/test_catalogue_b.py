"""Acceptance catalogue, B (bounces): ../shared/CATALOGUE.md, mapped in docs/catalogue.md.

Covered elsewhere:
B1: tests/test_bounce.py::test_structure_of_a_failure_dsn, tests/test_delivery.py::test_5xx_bounces_once_in_aliases
B2, B3: tests/test_delivery.py::test_no_bounce_without_a_verified_sender
B4 (valid and bad VERP address):
    tests/test_e2e_durability.py::test_inbound_bounce_to_our_bounce_address_becomes_our_dsn_in_aliases,
    tests/test_verp.py; the stray DSN to an alias is below.
"""

from __future__ import annotations

import email
import email.policy
import json
import time

import pytest
from helpers import DEMO_BUYER, DEMO_ORDER, DEMO_SELLER, make_relay, message, seed_pair, serving
from test_e2e_ops import events

from bsm_relay.policy.reasons import reply

SELLER = DEMO_SELLER
BUYER = DEMO_BUYER
ORDER = DEMO_ORDER


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("cat-b"), sink_port=sink.port)
    r.aliases = seed_pair(r)  # type: ignore[attr-defined]
    yield from serving(r)


STRAY_DSN = (
    "From: Mail Delivery System <MAILER-DAEMON@mx.elsewhere.example>\r\n"
    "To: {to}\r\n"
    "Subject: Undelivered Mail Returned to Sender\r\n"
    "Auto-Submitted: auto-replied\r\n"
    "MIME-Version: 1.0\r\n"
    'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
    "\r\n"
    "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
    "--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.elsewhere.example\r\n\r\n"
    "Final-Recipient: rfc822; someone@elsewhere.example\r\nAction: failed\r\nStatus: 5.1.1\r\n"
    "--B--\r\n"
)


@pytest.mark.parametrize("which", ["buyer", "seller"])
def test_B4_stray_dsn_to_an_alias_is_dropped(relay, sink, which):
    alias = relay.aliases[f"{which}_alias"]
    before = len(sink.messages)
    with relay.smtp() as c:
        assert c.mail("")[0] == 250
        assert c.rcpt(alias)[0] == 250
        code, text = c.data(STRAY_DSN.format(to=alias).encode())
    assert f"{code} {text.decode()}" == reply("ok.bounce")     # 250: nobody retries or bounces it
    time.sleep(1.0)
    assert len(sink.messages) == before                        # ... and it is not forwarded
    stray = [e for e in events(relay, "bounce.received") if e.get("bounce") == "stray"]
    assert stray and stray[-1]["alias"] == alias
    # The daemon's address was not recorded as a pending sender for the seller.
    pending = json.loads(relay.cli("sender", "list", "S1", "--json").stdout)
    assert all("mailer-daemon" not in row["address"].lower() for row in pending)
    assert json.loads(relay.cli("queue", "list", "--json").stdout) == []


def test_B5_auto_replied_mail_is_forwarded_and_never_answered(relay, sink):
    seller_alias = relay.aliases["seller_alias"]
    before = len(sink.messages)
    data = message(f"Bea Buyer <{BUYER}>", seller_alias, subject=f"Out of office: order {ORDER}",
                   extra_headers="Auto-Submitted: auto-replied\r\nPrecedence: bulk\r\n",
                   body="I am away until Monday.\r\n")
    with relay.smtp() as c:
        c.sendmail(BUYER, [seller_alias], data)
    got = sink.wait_for(before + 1)
    time.sleep(1.5)                                           # a few delivery polls: nothing else leaves
    assert len(sink.messages) == before + 1
    assert got[-1].rcpt_tos == [SELLER]
    out = email.message_from_bytes(got[-1].data, policy=email.policy.default)
    assert out["Auto-Submitted"] == "auto-replied"             # kept: the seller's own responder stays quiet
    assert BUYER not in got[-1].data.decode()


def test_B5_our_own_notices_carry_auto_submitted(relay, sink):
    buyer_alias = relay.aliases["buyer_alias"]
    before = len(sink.messages)
    sink.handler.rcpt_reply = lambda rcpt: "550 5.1.1 no such user" if rcpt == BUYER else None
    try:
        with relay.smtp() as c:
            c.sendmail(SELLER, [buyer_alias], message(SELLER, buyer_alias, subject=f"Order {ORDER}"))
        dsn = sink.wait_for(before + 1)[-1]
    finally:
        sink.handler.rcpt_reply = lambda rcpt: None
    assert dsn.rcpt_tos == [SELLER] and dsn.mail_from in ("", "<>")
    msg = email.message_from_bytes(dsn.data, policy=email.policy.default)
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert BUYER not in dsn.data.decode()
