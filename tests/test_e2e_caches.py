"""What the serving relay keeps in memory must never outlive the truth (issue 7).

* Marketplace facts are cached behind a counter that database triggers bump (migration 0004):
  a change made straight in the database, as the marketplace's own integration would make it,
  is seen by the very next message.
* DNS answers are kept for their TTL: the same sender domain's SPF record is asked for once,
  not with every message.
* ``[smtp] event_loop = "asyncio"`` serves as the default uvloop does.
"""

from __future__ import annotations

import smtplib
import time

import pytest
from helpers import DEMO_SELLER, make_relay, message, seed_pair, serving, shared_dns

from bsm_relay.config import settings as config

ORDER = "111-2223334-4445556"


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("caches"), sink_port=sink.port)
    r.aliases = seed_pair(r)
    yield from serving(r)


def send(relay, to: str, sender: str = DEMO_SELLER, subject: str = f"About order {ORDER}") -> str:
    """The reply to the end of DATA: "250" or the refusal's code and text."""
    with relay.smtp() as client:
        try:
            client.sendmail(sender, [to], message(sender, to, subject=subject))
        except smtplib.SMTPDataError as exc:
            return f"{exc.smtp_code} {exc.smtp_error.decode()}"
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return f"{code} {text.decode()}"
    return "250"


def test_a_revocation_written_straight_into_the_database_applies_to_the_next_message(relay, sink):
    alias = relay.aliases["buyer_alias"]
    before = len(sink.messages)
    assert send(relay, alias) == "250"          # the pair is now in the relay's memory
    sink.wait_for(before + 1)
    token = alias.split("@")[0].lower()
    relay.database.execute("INSERT INTO revoked_aliases (token, revoked_at) VALUES (?, ?)", token, time.time())
    assert send(relay, alias).startswith("550")


def test_an_approval_written_straight_into_the_database_applies_to_the_next_message(relay, sink):
    other = "orders@acme.example"
    fresh = seed_alias(relay)
    subject = "About order 111-2223334-4445599"
    refused = send(relay, fresh, sender=other, subject=subject)         # unknown: recorded as pending
    assert refused.startswith("550 5.7.1") and "not approved" in refused, refused
    seller_id = relay.database.query("SELECT id FROM sellers WHERE ext_id = ?", "S2")[0][0]
    relay.database.execute("UPDATE seller_addresses SET status = 'approved' WHERE seller_id = ? AND address = ?",
                           seller_id, other)
    before = len(sink.messages)
    assert send(relay, fresh, sender=other, subject=subject) == "250"
    sink.wait_for(before + 1)


def seed_alias(relay) -> str:
    """A second pair (S2, B2, one shipped order): its buyer alias."""
    import json
    relay.cli("seller", "add", "S2", "--name", "Acme Two", "--email", "two@acme.example")
    relay.cli("buyer", "add", "B2", "--email", "b2@example.org")
    relay.cli("order", "add", "111-2223334-4445599", "--seller", "S2", "--buyer", "B2", "--status", "shipped")
    return json.loads(relay.cli("alias", "S2", "B2", "--json").stdout)["buyer_alias"]


def test_the_sender_domains_spf_record_is_asked_for_once_across_messages(relay, sink):
    dns = shared_dns()
    alias = relay.aliases["seller_alias"]          # the buyer writes back: SPF for example.org
    before, asked = len(sink.messages), dns.queried("example.org", "TXT")
    for i in range(3):
        assert send(relay, alias, sender="buyer@example.org", subject=f"Re: order {ORDER} {i}") == "250"
    sink.wait_for(before + 3)
    assert dns.queried("example.org", "TXT") - asked == 1      # asked for the first, kept after


def test_the_stdlib_event_loop_serves_too(tmp_path, sink):
    r = make_relay(tmp_path, sink_port=sink.port)
    r.config.write_text(r.config.read_text().replace("[smtp]\n", '[smtp]\nevent_loop = "asyncio"\n', 1))
    alias = seed_pair(r)["buyer_alias"]
    r.start()
    try:
        before = len(sink.messages)
        assert send(r, alias) == "250"
        sink.wait_for(before + 1)
    finally:
        assert r.stop() == 0


def test_an_unknown_event_loop_is_a_configuration_error(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[smtp]\nevent_loop = "trio"\n')
    with pytest.raises(config.ConfigError, match="event_loop"):
        config.load(str(path))
