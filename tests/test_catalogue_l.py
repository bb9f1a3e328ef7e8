"""Acceptance catalogue, L (loops): ../shared/CATALOGUE.md, mapped in docs/catalogue.md.

L1: more than 50 Received lines (intake.MAX_HOPS, Postfix's hopcount_limit) -> 554 5.4.6.
L2: every forwarded message carries our loop marker (``X-BSM-Relay-Loop``, a keyed digest of
[smtp] hostname, see relay/intake.py); a message arriving with it is refused with 554 5.4.6.
Auto-Submitted mail: tests/test_catalogue_b.py::test_B5_auto_replied_mail_is_forwarded_and_never_answered.
"""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
import time

import pytest
from helpers import DEMO_BUYER, DEMO_ORDER, DEMO_SELLER, make_relay, message, seed_pair, serving
from test_e2e_ops import events

from bsm_relay.policy.reasons import reply

SELLER = DEMO_SELLER
BUYER = DEMO_BUYER
ORDER = DEMO_ORDER
SUBJECT = f"Order {ORDER}"
HOP = "Received: from a.example by b.example; Fri, 27 Nov 2026 09:00:00 +0000\r\n"


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("cat-l"), sink_port=sink.port)
    r.alias = seed_pair(r)["buyer_alias"]  # type: ignore[attr-defined]
    yield from serving(r)


def send(relay, data: bytes) -> tuple[int, bytes]:
    with relay.smtp() as c:
        try:
            c.sendmail(SELLER, [relay.alias], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error
    return 250, b""


def test_L1_50_received_delivered_51_refused_as_a_loop(relay, sink):
    before = len(sink.messages)
    assert send(relay, message(SELLER, relay.alias, subject=SUBJECT, extra_headers=HOP * 50))[0] == 250
    sink.wait_for(before + 1)
    code, text = send(relay, message(SELLER, relay.alias, subject=SUBJECT, extra_headers=HOP * 51))
    assert f"{code} {text.decode()}" == reply("msg.loop")
    time.sleep(0.5)
    assert len(sink.messages) == before + 1


def test_L2_our_loop_marker_is_added_and_refused_when_it_comes_back(relay, sink):
    before = len(sink.messages)
    assert send(relay, message(SELLER, relay.alias, subject=SUBJECT))[0] == 250
    out = email.message_from_bytes(sink.wait_for(before + 1)[-1].data, policy=email.policy.default)
    marker = out["X-BSM-Relay-Loop"]
    assert marker and len(out.get_all("X-BSM-Relay-Loop")) == 1
    assert "mx.relay.test" not in marker                    # a digest: it names nothing
    back = message(SELLER, relay.alias, subject=SUBJECT, extra_headers=f"X-BSM-Relay-Loop: {marker}\r\n")
    code, text = send(relay, back)
    assert f"{code} {text.decode()}" == reply("msg.own_loop")
    # Another installation's marker is not ours: passed (and replaced by ours).
    other = message(SELLER, relay.alias, subject=SUBJECT, extra_headers="X-BSM-Relay-Loop: 0123456789abcdef\r\n")
    assert send(relay, other)[0] == 250
    got = email.message_from_bytes(sink.wait_for(before + 2)[-1].data, policy=email.policy.default)
    assert got.get_all("X-BSM-Relay-Loop") == [marker]


def test_L2_alias_whose_mailbox_is_one_of_our_aliases_is_refused_once_no_ping_pong(tmp_path):
    """The buyer's "real" address is a seller alias of ours, and the relay's next hop is itself:
    the forwarded copy comes straight back, is refused once, the seller gets one DSN attempt,
    and nothing circulates."""
    r = make_relay(tmp_path, sink_port=1)
    cfg = r.config.read_text()
    r.config.write_text(cfg.replace('smarthost = "127.0.0.1:1"', f'smarthost = "127.0.0.1:{r.port}"'))
    r.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    r.cli("seller", "add", "S2", "--name", "Other", "--email", "owner@other.example")
    r.cli("buyer", "add", "B2", "--email", "real@example.org")
    looped = json.loads(r.cli("alias", "S2", "B2", "--json").stdout)["seller_alias"]
    r.cli("buyer", "add", "B1", "--email", looped, "--name", "Loop Buyer")
    r.cli("order", "add", ORDER, "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    alias = json.loads(r.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]
    r.start()
    try:
        with r.smtp() as c:
            c.sendmail(SELLER, [alias], message(SELLER, alias, subject=SUBJECT))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not events(r, "delivery.failed"):
            time.sleep(0.1)
        time.sleep(3.0)        # a few delivery polls and retry slots (max_backoff = 2 s): does anything circulate?
        loops = [e for e in events(r, "smtp.rejected") if e.get("reason") == "msg.own_loop"]
        assert len(loops) == 1
        assert len(events(r, "message.accepted")) == 1          # only the seller's own message
        failed = events(r, "delivery.failed")
        assert failed and "5.4.6" in failed[0]["reply"]
        assert json.loads(r.cli("queue", "list", "--json").stdout) == []   # nothing left circulating
    finally:
        assert r.stop() == 0
    assert "Traceback" not in r.log()
