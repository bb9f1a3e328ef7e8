"""Acceptance catalogue, R (recipients): ../shared/CATALOGUE.md, mapped in docs/catalogue.md.

Covered elsewhere:
R2: tests/test_e2e_relay.py::test_foreign_domain_is_relay_denied
R4: tests/test_e2e_relay.py::test_recipient_tricks_refused_at_rcpt
R5: tests/test_e2e_relay.py::test_forged_altered_and_revoked_tokens_get_one_generic_reply,
    tests/test_alias_codec.py, tests/test_fuzz_properties.py::test_random_and_flipped_tokens_never_resolve
R6: tests/test_e2e_relay.py::test_postmaster_accepted_and_routed_to_operator (and R6 below, without EHLO domain)
R9: tests/test_e2e_relay.py::test_only_the_buyer_may_write_to_the_seller_alias

One relay for the module, seeded before ``serve`` starts: one seller and one buyer through the
CLI, and (R8) 150 more sellers through the store API in-process, which is what ``bsm-relay seller
add`` does, without 150 process starts.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import smtplib
import time

import pytest
from helpers import DEMO_BUYER, DEMO_ORDER, DEMO_SELLER, RelayProcess, make_relay, message, seed_pair, serving
from test_e2e_ops import Line

from bsm_relay.aliases.codec import Direction
from bsm_relay.config.settings import load
from bsm_relay.relay.server import open_relay

SELLER = DEMO_SELLER
BUYER = DEMO_BUYER
ORDER = DEMO_ORDER
HOSTNAME = "mx.relay.test"          # [smtp] hostname in tests/helpers.py: "srvname"
ALIAS_DOMAIN = "marketplace.example"
MANY = 150


async def _seed_many(config: str) -> list[str]:
    """150 sellers, each with its seller alias for buyer B1: the buyer may write to all of them."""
    relay = await open_relay(load(config))
    try:
        buyer = await relay.store.buyer(ext_id="B1")
        assert buyer is not None
        out = []
        for i in range(MANY):
            seller = await relay.store.add_seller(f"M{i}", f"Shop {i}", f"owner{i}@shop{i}.example")
            out.append(relay.alias(Direction.TO_SELLER, seller.id, buyer.id))
        return out
    finally:
        await relay.engine.dispose()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("cat-r"), sink_port=sink.port)
    seed_pair(r)
    r.many = asyncio.run(_seed_many(str(r.config)))  # type: ignore[attr-defined]
    yield from serving(r)


def test_R1_valid_alias_forwarded_once_with_one_received_of_ours(relay, sink, alias):
    before = len(sink.messages)
    data = message(SELLER, alias, subject=f"Order {ORDER}", extra_headers=(
        "Received: from laptop.acme.example (laptop [198.51.100.23]) by smtp.acme.example; "
        "Fri, 27 Nov 2026 09:59:00 +0000\r\n"
        "Received: from smtp.acme.example ([203.0.113.5]) by out.acme.example; Fri, 27 Nov 2026 09:59:30 +0000\r\n"))
    with relay.smtp() as c:
        c.sendmail(SELLER, [alias], data)
    got = sink.wait_for(before + 1)
    assert len(got) == before + 1                        # forwarded once
    out = got[-1]
    assert out.rcpt_tos == [BUYER]
    msg = email.message_from_bytes(out.data, policy=email.policy.default)
    received = msg.get_all("Received")
    assert len(received) == 1 and received[0].startswith(f"by {HOSTNAME} ")
    for leak in ("198.51.100.23", "203.0.113.5", "acme.example", "127.0.0.1", "laptop"):
        assert leak not in out.data.decode(), leak
    # The envelope sender is a signed bounce address in the alias domain.
    assert out.mail_from.endswith("@" + ALIAS_DOMAIN) and SELLER not in out.mail_from


def _matrix(domain: str, ip: str, names: list[str]) -> list[str]:
    forms = [f"relaytest@{domain}", f"relaytest%{domain}@{ip}", f'"relaytest@{domain}"', f'"relaytest%{domain}"',
             f"relaytest@{domain}@{ip}", f'"relaytest@{domain}"@{ip}', f"@{ip}:relaytest@{domain}",
             f"{domain}!relaytest", f"{domain}!relaytest@{ip}"]
    for name in names:
        forms += [f"relaytest%{domain}@{name}", f"relaytest@{domain}@{name}", f"@{name}:relaytest@{domain}",
                  f"{domain}!relaytest@{name}"]
    return forms


def test_R3_open_relay_matrix(relay, sink):
    """nmap's smtp-open-relay forms, with the three senders: 0 accepted."""
    before = len(sink.messages)
    rcpts = _matrix("victim.example", "[127.0.0.1]", [HOSTNAME, ALIAS_DOMAIN])
    assert len(set(rcpts)) >= 16
    accepted = []
    for sender in ("from@victim.example", "from@[127.0.0.1]", ""):
        # A fresh session per sender and at most 20 refusals per session (max_invalid_recipients).
        for start in range(0, len(rcpts), 10):
            with relay.smtp() as c:
                code, _ = c.mail(sender)
                assert code == 250, sender
                for rcpt in rcpts[start:start + 10]:
                    code, text = c.docmd(f"RCPT TO:<{rcpt}>")
                    assert 500 <= code < 600, (sender, rcpt, code, text)
                    if code == 250:
                        accepted.append(rcpt)
    assert accepted == []
    assert len(sink.messages) == before


def test_R6_postmaster_without_domain_and_in_the_alias_domain(relay, sink):
    before = len(sink.messages)
    with relay.smtp() as c:
        c.mail("")
        assert c.rcpt("postmaster")[0] == 250
        assert c.rcpt(f"PostMaster@{ALIAS_DOMAIN.upper()}")[0] == 250
        assert c.data(b"From: someone@outside.example\r\nSubject: report\r\n\r\nabuse report\r\n")[0] == 250
    got = sink.wait_for(before + 1)[-1]
    assert got.rcpt_tos == ["ops@operator.test"]


def test_R7_dictionary_attack_cut_off_after_the_limit(relay):
    conn = Line(relay.port)
    assert conn.reply().startswith("220")
    assert conn.cmd("EHLO dict.test").startswith("250")
    assert conn.cmd("MAIL FROM:<probe@dict.example>").startswith("250")
    for i in range(20):                                   # [smtp] max_invalid_recipients = 20
        assert conn.cmd(f"RCPT TO:<guess{i}@{ALIAS_DOMAIN}>").startswith("550 5.1.1"), i
    assert conn.cmd(f"RCPT TO:<guess20@{ALIAS_DOMAIN}>").startswith("421 4.7.0")
    assert conn.closed()
    conn.close()
    rejected = [json.loads(line) for line in relay.log().splitlines() if "too_many_invalid" in line]
    assert not rejected or all("guess" not in json.dumps(e) for e in rejected)


def test_R8_recipient_cap_100_then_452_and_delivered_to_the_100(relay: RelayProcess, sink):
    before = len(sink.messages)
    rcpts = relay.many  # type: ignore[attr-defined]
    codes = []
    with relay.smtp() as c:
        assert c.mail(BUYER)[0] == 250
        for rcpt in rcpts:
            codes.append(c.rcpt(rcpt))
        assert [code for code, _ in codes[:100]] == [250] * 100
        assert {(code, text[:5]) for code, text in codes[100:]} == {(452, b"4.5.3")}
        code, _ = c.data(message(BUYER, rcpts[0], subject=f"About order {ORDER}"))
        assert code == 250
    got = sink.wait_for(before + 100, timeout=120)
    time.sleep(1.0)
    assert len(sink.messages) == before + 100
    delivered = sorted(a for m in got[before:] for a in m.rcpt_tos)
    assert delivered == sorted(f"owner{i}@shop{i}.example" for i in range(100))


def test_R9_non_owner_to_a_reply_alias_sends_nothing_to_the_contact(relay, sink):
    seller_alias = json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)["seller_alias"]
    before = len(sink.messages)
    with relay.smtp() as c:
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail("stranger@evil.example", [seller_alias], message("stranger@evil.example", seller_alias))
    assert info.value.smtp_code == 550 and SELLER.encode() not in info.value.smtp_error
    assert len(sink.messages) == before



