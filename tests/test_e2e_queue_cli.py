"""Operator commands on a running relay: queue list/show/hold/release/retry/flush/delete, dkim keygen."""

from __future__ import annotations

import json
from pathlib import Path

import dkim

from helpers import Sink, make_relay, message

SELLER = "seller@acme.example"


def test_queue_commands_and_dkim_keygen(tmp_path):
    sink = Sink()                                      # down at first: messages wait in the queue
    relay = make_relay(tmp_path, sink_port=sink.port, extra="")
    relay.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    relay.cli("buyer", "add", "B1", "--email", "buyer@example.org")
    relay.cli("order", "add", "111-2223334-4445556", "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    alias = json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]
    relay.start()
    try:
        with relay.smtp() as c:
            for i in range(3):
                c.sendmail(SELLER, [alias], message(SELLER, alias, subject=f"Order 111-2223334-4445556 #{i}"))
        rows = json.loads(relay.cli("queue", "list", "--json").stdout)
        assert len(rows) == 3 and all(r["status"] == "queued" and r["kind"] == "forward" for r in rows)
        first, second, third = (r["id"] for r in rows)
        shown = json.loads(relay.cli("queue", "show", first, "--json").stdout)
        assert shown["id"] == first and shown["recipients"] == [
            {"alias": alias, "status": "pending", "last_error": shown["recipients"][0]["last_error"]}]
        assert "buyer@example.org" not in json.dumps(shown)     # operators see aliases, not addresses
        assert json.loads(relay.cli("queue", "hold", first, "--json").stdout)["changed"] == 1
        assert json.loads(relay.cli("queue", "delete", third, "--json").stdout)["changed"] == 1
        assert relay.cli("queue", "show", third, check=False).returncode == 1
        assert relay.cli("queue", "release", second, check=False).returncode == 1   # not held
        statuses = {r["id"]: r["status"] for r in json.loads(relay.cli("queue", "list", "--json").stdout)}
        assert statuses == {first: "hold", second: "queued"}
        with sink:
            relay.cli("queue", "flush")
            got = sink.wait_for(1)
            assert len(got) == 1                               # the held one stays
            assert json.loads(relay.cli("queue", "release", first, "--json").stdout)["changed"] == 1
            assert len(sink.wait_for(2)) == 2
        assert json.loads(relay.cli("queue", "list", "--json").stdout) == []
        done = {r["id"]: r["status"] for r in json.loads(relay.cli("queue", "list", "--all", "--json").stdout)}
        assert done == {first: "done", second: "done"}
    finally:
        assert relay.stop() == 0

    # A new ed25519 key under another selector, with the TXT record to publish; it signs verifiably.
    out = json.loads(relay.cli("dkim", "keygen", "--selector", "ed1", "--algorithm", "ed25519", "--json").stdout)
    assert out["name"] == "ed1._domainkey.marketplace.example" and out["value"].startswith("v=DKIM1; k=ed25519; p=")
    assert relay.cli("dkim", "keygen", "--selector", "ed1", check=False).returncode == 1   # never overwrites
    from bsm_relay.relay.dkim import DkimSigner
    signer = DkimSigner.load(Path(out["path"]), "marketplace.example", "ed1")
    head, body = b"From: a@marketplace.example\r\nSubject: x\r\n", b"hello\r\n"
    signed = signer.sign(head, body) + head + b"\r\n" + body
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: out["value"].encode())
