"""The embedded default: SQLite and a Maildir, nothing else running; and the CLI's manners."""

from __future__ import annotations

import email
import email.policy
import json
import time

from helpers import make_relay, message

SELLER = "seller@acme.example"
BUYER = "buyer@example.org"


def test_maildir_default_delivers_and_cli_refuses_with_one_line(tmp_path):
    relay = make_relay(tmp_path)            # no sink: [delivery] mode = "maildir"
    assert 'mode = "maildir"' in relay.config.read_text()
    relay.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    relay.cli("buyer", "add", "B1", "--email", BUYER, "--name", "Bea")
    relay.cli("order", "add", "111-2223334-4445556", "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    aliases = json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)
    assert set(aliases) == {"buyer_alias", "seller_alias"}

    # Refusals: non-zero exit, one line on stderr, no traceback.
    for args in (("seller", "add", "S1", "--name", "Again", "--email", "x@acme.example"),
                 ("alias", "S9", "B1"), ("order", "set", "000-0000000-0000000", "--status", "shipped"),
                 ("sender", "approve", "S9", "a@b.example")):
        res = relay.cli(*args, check=False, console=True)
        assert res.returncode == 1, args
        assert res.stderr.startswith("bsm-relay: ") and res.stderr.count("\n") == 1, res.stderr
        assert "Traceback" not in res.stderr

    relay.start()
    try:
        with relay.smtp() as c:
            c.sendmail(SELLER, [aliases["buyer_alias"]],
                       message(SELLER, aliases["buyer_alias"], subject="Order 111-2223334-4445556 shipped"))
        new = tmp_path / "maildir" / "new"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list(new.iterdir()):
            time.sleep(0.05)
        files = list(new.iterdir())
        assert len(files) == 1
        raw = files[0].read_bytes()
        assert SELLER.encode() not in raw
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert msg["Delivered-To"] == BUYER
        assert msg["From"].addresses[0].addr_spec == aliases["seller_alias"]
        assert msg["Subject"] == "Order 111-2223334-4445556 shipped"
        assert not list((tmp_path / "maildir" / "tmp").iterdir())
        assert json.loads(relay.cli("queue", "list", "--json").stdout) == []
    finally:
        assert relay.stop() == 0
