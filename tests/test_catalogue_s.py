"""Acceptance catalogue, S (senders): ../shared/CATALOGUE.md, mapped in docs/catalogue.md.

Covered elsewhere:
S1: tests/test_e2e_auth.py::test_spf_pass_aligned_is_delivered_with_authentication_results,
    tests/test_e2e_auth.py::test_dkim_pass_aligned_with_spf_fail_is_delivered
S3: tests/test_e2e_auth.py::test_spf_fail_without_dkim_is_refused_naming_address_and_domain
S4: tests/test_e2e_relay.py::test_strict_from_refusals (the display-name case)
S6: tests/test_e2e_auth.py::test_dns_trouble_answers_451_never_a_decision
S7: tests/test_e2e_auth.py::test_proxy_from_an_untrusted_peer_is_dropped,
    tests/test_e2e_auth.py::test_proxy_from_a_trusted_peer_spf_judges_the_proxied_source
"""

from __future__ import annotations

import json
import smtplib
import time

import pytest
from helpers import DEMO_BUYER, DEMO_ORDER, DEMO_SELLER, make_relay, message, seed_pair, serving

SELLER = DEMO_SELLER
STRANGER = "orders@acme.example"
BUYER = DEMO_BUYER
ORDER = DEMO_ORDER


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("cat-s"), sink_port=sink.port)
    seed_pair(r)
    yield from serving(r)


def _refused(relay, mail_from: str, rcpt: str, data: bytes) -> tuple[int, bytes]:
    with relay.smtp() as c:
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail(mail_from, [rcpt], data)
    return info.value.smtp_code, info.value.smtp_error


def test_S2_unapproved_sender_refused_in_session_no_queue_entry_no_bounce(relay, sink, alias):
    before = len(sink.messages)
    code, text = _refused(relay, STRANGER, alias, message(STRANGER, alias, subject=f"Order {ORDER}"))
    assert code == 550 and text.startswith(b"5.7.1")
    # Nothing queued (not even done items), so nothing can ever be delivered or bounced by us.
    assert json.loads(relay.cli("queue", "list", "--all", "--json").stdout) == []
    time.sleep(1.0)   # a few delivery polls: no DSN leaves either
    assert len(sink.messages) == before


@pytest.mark.parametrize("shape", ["cve-2023-27043", "two-from-headers", "two-addresses"])
def test_S5_ambiguous_from(relay, sink, alias, shape):
    headers = {
        "cve-2023-27043": f"From: {SELLER})<evil@evil.example>\r\n",
        "two-from-headers": f"From: {SELLER}\r\nFrom: evil@evil.example\r\n",
        "two-addresses": f"From: {SELLER}, evil@evil.example\r\n",
    }[shape]
    before = len(sink.messages)
    data = f"{headers}To: {alias}\r\nSubject: Order {ORDER}\r\n\r\nbody\r\n".encode()
    code, text = _refused(relay, SELLER, alias, data)
    assert (code, text[:5]) in {(550, b"5.7.1"), (554, b"5.6.0")}
    assert b"evil" not in text
    assert len(sink.messages) == before
