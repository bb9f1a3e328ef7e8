"""Nothing accepted is lost: kill -9 the relay right after a batch of 250s, restart it, and
every message is delivered (a subprocess test against `bsm-relay serve`, not a mock)."""

from __future__ import annotations

import email
import email.policy
import json
import signal
import time

from helpers import Sink, make_relay, message

SELLER = "seller@acme.example"


def test_kill_9_after_250_then_restart_delivers_everything(tmp_path):
    sink = Sink()                      # not started yet: delivery fails until after the crash
    relay = make_relay(tmp_path, sink_port=sink.port)
    relay.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    relay.cli("buyer", "add", "B1", "--email", "buyer@example.org")
    relay.cli("order", "add", "111-2223334-4445556", "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    alias = json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]
    relay.start()
    n = 25
    with relay.smtp() as client:
        for i in range(n):
            client.sendmail(SELLER, [alias], message(SELLER, alias, subject=f"Order 111-2223334-4445556 durable {i}"))
    relay.stop(signal.SIGKILL)
    with sink:
        relay.start()
        try:
            got = sink.wait_for(n, timeout=60)
            subjects = [email.message_from_bytes(m.data, policy=email.policy.default)["Subject"] for m in got]
            assert sorted(set(subjects)) == sorted(f"Order 111-2223334-4445556 durable {i}" for i in range(n))
            assert all(m.rcpt_tos == ["buyer@example.org"] for m in got)
        finally:
            assert relay.stop() == 0


def test_inbound_bounce_to_our_bounce_address_becomes_our_dsn_in_aliases(tmp_path):
    with Sink() as sink:
        relay = make_relay(tmp_path, sink_port=sink.port)
        relay.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
        relay.cli("buyer", "add", "B1", "--email", "bea.real@buyers.example")
        relay.cli("order", "add", "111-2223334-4445556", "--seller", "S1", "--buyer", "B1", "--status", "shipped")
        alias = json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]
        relay.start()
        try:
            with relay.smtp() as client:
                client.sendmail(SELLER, [alias], message(SELLER, alias, subject="Order 111-2223334-4445556"))
            forwarded = sink.wait_for(1)[0]
            bounce_address = forwarded.mail_from
            assert bounce_address.startswith("b-") and bounce_address.endswith("@marketplace.example")
            # The buyer's provider bounces it later, to the envelope sender.
            dsn = ("From: MAILER-DAEMON@buyers.example\r\nTo: " + bounce_address + "\r\n"
                   "Subject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
                   "Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
                   "--b\r\nContent-Type: text/plain\r\n\r\n<bea.real@buyers.example>: mailbox disabled\r\n"
                   "--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.buyers.example\r\n\r\n"
                   "Final-Recipient: rfc822; bea.real@buyers.example\r\nAction: failed\r\nStatus: 5.2.1\r\n"
                   "Diagnostic-Code: smtp; 550 5.2.1 <bea.real@buyers.example>: mailbox disabled\r\n--b--\r\n")
            with relay.smtp() as client:
                client.sendmail("", [bounce_address], dsn.encode())
            ours = sink.wait_for(2)[1]
            assert ours.mail_from in ("", "<>") and ours.rcpt_tos == [SELLER]
            assert b"bea.real" not in ours.data and b"buyers.example" not in ours.data
            report = email.message_from_bytes(ours.data, policy=email.policy.default)
            status = list(report.iter_parts())[1].as_string()
            assert f"rfc822; {alias}" in status and "Status: 5.2.1" in status and "Action: failed" in status
            # A forged or tampered bounce address is refused at RCPT.
            local, _, domain = bounce_address.partition("@")
            forged = local[:-2] + ("aa" if local[-2:] != "aa" else "bb") + "@" + domain
            with relay.smtp() as client:
                client.mail("")
                assert client.rcpt(forged) == (550, b"5.1.1 Recipient address rejected: no such bounce address")
            # An auto-reply (non-null sender) to the bounce address is accepted and dropped.
            with relay.smtp() as client:
                client.sendmail("vacation@buyers.example", [bounce_address],
                                b"From: vacation@buyers.example\r\nAuto-Submitted: auto-replied\r\n\r\naway\r\n")
            relay.cli("queue", "flush")
            time.sleep(1.0)
            assert len(sink.messages) == 2
        finally:
            assert relay.stop() == 0
