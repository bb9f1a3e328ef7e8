"""Nothing accepted is lost: kill -9 the relay right after a batch of 250s, restart it, and
every message is delivered (a subprocess test against `bsm-relay serve`, not a mock)."""

from __future__ import annotations

import email
import email.policy
import json
import signal

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
