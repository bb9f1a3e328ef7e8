"""End to end: sender authentication (SPF, DKIM, DMARC-style alignment), the PROXY
protocol, and the Messaging Permissions lifecycle, over real SMTP against
``bsm-relay serve`` with its resolver pointed at a real DNS responder on loopback.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import smtplib
import socket
import struct
import threading
import time
from collections.abc import Callable

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnsserver import DnsServer
from helpers import LOOPBACK_SPF, RelayProcess, Sink, make_relay, message

BUYER = "buyer@example.org"
SELLERS = {  # seller id -> (primary address, order id)
    "ACME": ("seller@acme.example", "111-0000001-0000001"),        # SPF passes from loopback
    "SPOOF": ("seller@spoofed.example", "111-0000002-0000002"),    # SPF allows only 192.0.2.1
    "SIGNED": ("seller@signed.example", "111-0000003-0000003"),    # SPF -all, DKIM key published
    "PROXIED": ("seller@proxied.example", "111-0000004-0000004"),  # SPF allows only 192.0.2.10
    "SLOW": ("seller@slow.example", "111-0000005-0000005"),        # SPF answer arrives late
    "TIMEOUT": ("seller@timeout.example", "111-0000006-0000006"),  # SPF query never answered
    "BROKEN": ("seller@servfail.example", "111-0000007-0000007"),  # SPF query gets SERVFAIL
    "LIMIT": ("seller@limit.example", "111-0000008-0000008"),
}
SLOW_DELAY = 1.5      # below the resolver's 2 s per try, so the slow answer is used
DNS_TIMEOUT = 3.0


def _dkim_key() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"


DKIM_PRIVATE, DKIM_RECORD = _dkim_key()


@pytest.fixture(scope="module")
def dns():
    server = DnsServer({
        ("acme.example", "TXT"): LOOPBACK_SPF,
        ("spoofed.example", "TXT"): "v=spf1 ip4:192.0.2.1 -all",
        ("signed.example", "TXT"): "v=spf1 -all",
        ("sel._domainkey.signed.example", "TXT"): DKIM_RECORD,
        ("proxied.example", "TXT"): "v=spf1 ip4:192.0.2.10 -all",
        ("slow.example", "TXT"): LOOPBACK_SPF,
        ("timeout.example", "TXT"): LOOPBACK_SPF,
        ("servfail.example", "TXT"): LOOPBACK_SPF,
    }, spf_fallback=LOOPBACK_SPF, delay={("slow.example", "TXT"): SLOW_DELAY},
        drop={("timeout.example", "TXT")}, servfail={("servfail.example", "TXT")})
    server.start_in_thread()
    yield server
    server.stop()


def _seed(relay: RelayProcess, *seller_ids: str) -> None:
    relay.cli("buyer", "add", "B1", "--email", BUYER, "--name", "Bea Buyer")
    for seller_id in seller_ids or tuple(SELLERS):
        address, order_id = SELLERS[seller_id]
        relay.cli("seller", "add", seller_id, "--name", f"{seller_id.title()} Shop", "--email", address)
        relay.cli("order", "add", order_id, "--seller", seller_id, "--buyer", "B1", "--status", "shipped")


def _finish(relay: RelayProcess) -> None:
    assert relay.stop() == 0
    log = relay.log()
    assert "Traceback" not in log
    # No real address ever reaches the log (all are redacted).
    for address in [BUYER, "orders@acme.example", "other@example.org"] + [a for a, _ in SELLERS.values()]:
        assert address not in log, address


@pytest.fixture(scope="module")
def relay(tmp_path_factory, dns, sink):
    r = make_relay(tmp_path_factory.mktemp("auth"), sink_port=sink.port, dns=dns, dns_timeout=DNS_TIMEOUT,
                   extra="[auth]\nmax_approved_senders = 2\n")
    _seed(r)
    r.start()
    yield r
    _finish(r)


@pytest.fixture(scope="module")
def proxy_relay(tmp_path_factory, dns, sink):
    r = make_relay(tmp_path_factory.mktemp("proxy"), sink_port=sink.port, dns=dns, dns_timeout=DNS_TIMEOUT)
    # As an operator would: the environment overrides [smtp] of the config file.
    r.env["BSM_RELAY_SMTP_PROXY_PROTOCOL"] = "true"
    r.env["BSM_RELAY_SMTP_TRUSTED_PROXIES"] = "127.0.0.1/32, 2001:db8::/32"
    _seed(r, "PROXIED")
    r.start()
    yield r
    _finish(r)


_ALIASES: dict[tuple[int, str], dict[str, str]] = {}


def aliases_of(relay: RelayProcess, seller_id: str) -> dict[str, str]:
    key = (relay.port, seller_id)
    if key not in _ALIASES:  # a CLI run costs a couple of seconds on a busy machine
        _ALIASES[key] = json.loads(relay.cli("alias", seller_id, "B1", "--json").stdout)
    return _ALIASES[key]


def mail(from_: str, to: str, seller_id: str, marker: str, body: str = "Your parcel is on its way.\r\n") -> bytes:
    order_id = SELLERS[seller_id][1]
    return message(from_, to, subject=f"Your order {order_id} [{marker}]", body=body)


def send(relay: RelayProcess, mail_from: str, rcpt: str, data: bytes) -> tuple[int, str]:
    """The DATA reply (code, text), whether accepted or refused."""
    with relay.smtp() as c:
        return _transaction(c, mail_from, rcpt, data)


def _transaction(c: smtplib.SMTP, mail_from: str, rcpt: str, data: bytes) -> tuple[int, str]:
    assert c.mail(mail_from)[0] == 250
    code, text = c.rcpt(rcpt)
    assert code == 250, (code, text)
    code, text = c.data(data)
    return code, text.decode()


def delivered(sink: Sink, marker: str, timeout: float = 20.0) -> email.message.EmailMessage:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in sink.messages:
            if f"[{marker}]".encode() in m.data:
                return email.message_from_bytes(m.data, policy=email.policy.default)  # type: ignore[return-value]
        time.sleep(0.05)
    raise AssertionError(f"message {marker} was not delivered")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def senders(relay: RelayProcess, seller_id: str, *status: str) -> dict[str, dict[str, object]]:
    args = ["sender", "list", seller_id, "--json"] + (["--status", status[0]] if status else [])
    return {r["address"]: r for r in json.loads(relay.cli(*args).stdout)}


# -- SPF and DKIM, aligned or not -------------------------------------------------------


def test_spf_pass_aligned_is_delivered_with_authentication_results(relay, sink):
    a = aliases_of(relay, "ACME")
    code, text = send(relay, "seller@acme.example", a["buyer_alias"],
                      mail("Acme <seller@acme.example>", a["buyer_alias"], "ACME", "spf-pass"))
    assert code == 250, text
    msg = delivered(sink, "spf-pass")
    results = msg.get_all("Authentication-Results")
    assert results and len(results) == 1
    value = str(results[0])
    # RFC 8601: our own authserv-id first, then what was checked and how it came out.
    assert value.startswith("mx.relay.test;")
    assert "spf=pass" in value and "dkim=none" in value and "dmarc=pass" in value
    # Neither the writer's address nor its domain reaches the reader.
    raw = msg.as_bytes()
    assert b"acme.example" not in raw and b"seller@" not in raw


def test_spf_fail_without_dkim_is_refused_naming_address_and_domain(relay, sink):
    a = aliases_of(relay, "SPOOF")
    code, text = send(relay, "seller@spoofed.example", a["buyer_alias"],
                      mail("seller@spoofed.example", a["buyer_alias"], "SPOOF", "spf-fail"))
    assert code == 550 and text.startswith("5.7.26 ")
    assert "seller@spoofed.example" in text and "for spoofed.example" in text and "SPF or DKIM" in text
    assert BUYER not in text


def test_spf_pass_for_an_unaligned_envelope_domain_is_refused(relay, sink):
    # SPF passes, but for envelope.example: that says nothing about acme.example in From.
    a = aliases_of(relay, "ACME")
    code, text = send(relay, "bounces@envelope.example", a["buyer_alias"],
                      mail("seller@acme.example", a["buyer_alias"], "ACME", "unaligned"))
    assert code == 550 and text.startswith("5.7.26 ") and "seller@acme.example" in text


def _signed(data: bytes) -> bytes:
    signature = dkim.sign(data, b"sel", b"signed.example", DKIM_PRIVATE,
                          include_headers=[b"from", b"to", b"subject", b"date"])
    return signature + data


def test_dkim_pass_aligned_with_spf_fail_is_delivered(relay, sink):
    a = aliases_of(relay, "SIGNED")
    data = _signed(mail("seller@signed.example", a["buyer_alias"], "SIGNED", "dkim-pass"))
    code, text = send(relay, "seller@signed.example", a["buyer_alias"], data)
    assert code == 250, text
    msg = delivered(sink, "dkim-pass")
    value = str(msg["Authentication-Results"])
    assert "spf=fail" in value and "dkim=pass" in value and "dmarc=pass" in value
    assert "signed.example" not in value
    # The writer's signature does not travel on (only the relay's own, if any, is there).
    assert all("signed.example" not in str(v) for v in msg.get_all("DKIM-Signature") or [])


def test_dkim_broken_by_a_body_change_is_refused(relay, sink):
    a = aliases_of(relay, "SIGNED")
    data = _signed(mail("seller@signed.example", a["buyer_alias"], "SIGNED", "dkim-broken"))
    tampered = data.replace(b"Your parcel is on its way.", b"Your parcel is on its WAY.")
    assert tampered != data
    code, text = send(relay, "seller@signed.example", a["buyer_alias"], tampered)
    assert code == 550 and text.startswith("5.7.26 ") and "signed.example" in text


@pytest.mark.parametrize("seller_id", ["TIMEOUT", "BROKEN"])
def test_dns_trouble_answers_451_never_a_decision(relay, sink, dns, seller_id):
    address = SELLERS[seller_id][0]
    domain = address.partition("@")[2]
    before = dns.queried(domain, "TXT")
    a = aliases_of(relay, seller_id)
    code, text = send(relay, address, a["buyer_alias"], mail(address, a["buyer_alias"], seller_id, "dns-" + seller_id))
    assert code == 451 and text.startswith("4.7.5 ") and "try again later" in text
    assert dns.queried(domain, "TXT") > before  # the relay asked, and got no usable answer
    assert not any(f"[dns-{seller_id}]".encode() in m.data for m in sink.messages)


# -- buyers -----------------------------------------------------------------------------


def test_buyer_reply_from_a_different_address_is_refused(relay, sink):
    a = aliases_of(relay, "ACME")
    # Authentic (example.org passes SPF), but not the buyer of this conversation.
    code, text = send(relay, "other@example.org", a["seller_alias"],
                      mail("other@example.org", a["seller_alias"], "ACME", "buyer-other"))
    assert code == 550 and text.startswith("5.7.1 ") and "only the buyer" in text
    assert "seller@acme.example" not in text
    # The buyer's own address passes, and the reply reaches the seller.
    code, text = send(relay, BUYER, a["seller_alias"], mail(BUYER, a["seller_alias"], "ACME", "buyer-own"))
    assert code == 250, text
    assert delivered(sink, "buyer-own")["To"].addresses[0].addr_spec == "seller@acme.example"


def test_buyer_reply_that_is_not_authentic_is_refused(relay, sink):
    a = aliases_of(relay, "ACME")
    # The buyer's address in From, but sent through a host example.org's SPF does not allow
    # (the envelope says spoofed.example, which only allows 192.0.2.1).
    code, text = send(relay, "x@spoofed.example", a["seller_alias"],
                      mail(BUYER, a["seller_alias"], "ACME", "buyer-spoof"))
    assert code == 550 and text.startswith("5.7.26 ") and "example.org" in text


# -- Messaging Permissions --------------------------------------------------------------


def test_pending_approved_blocked_lifecycle(relay, sink):
    a = aliases_of(relay, "ACME")
    alt = "orders@acme.example"

    def attempt(marker: str) -> tuple[int, str]:
        return send(relay, alt, a["buyer_alias"], mail(alt, a["buyer_alias"], "ACME", marker))

    # An unknown address that tries to send is refused and recorded as pending.
    code, text = attempt("life-1")
    assert code == 550 and "not approved" in text and alt in text
    row = senders(relay, "ACME")[alt]
    assert row["status"] == "pending" and row["attempts"] == 1 and row["first_seen"] and not row["primary"]
    first_seen = row["first_seen"]
    attempt("life-2")
    pending = senders(relay, "ACME", "pending")
    assert list(pending) == [alt] and pending[alt]["attempts"] == 2 and pending[alt]["first_seen"] == first_seen
    assert alt not in senders(relay, "ACME", "approved")
    assert list(senders(relay, "ACME", "approved")) == ["seller@acme.example"]

    # A pending address can be deleted; it comes back as pending when it tries again.
    deleted = json.loads(relay.cli("sender", "delete", "ACME", alt, "--json").stdout)
    assert deleted == {"seller_id": "ACME", "address": alt, "deleted": True}
    assert alt not in senders(relay, "ACME")
    attempt("life-3")
    assert senders(relay, "ACME")[alt]["attempts"] == 1

    # Approved: it passes, and it can no longer be deleted, only blocked.
    approved = json.loads(relay.cli("sender", "approve", "ACME", alt, "--json").stdout)
    assert approved == {"seller_id": "ACME", "address": alt, "status": "approved"}
    code, text = attempt("life-4")
    assert code == 250, text
    delivered(sink, "life-4")
    res = relay.cli("sender", "delete", "ACME", alt, check=False)
    assert res.returncode == 1 and "cannot be deleted" in res.stderr and "sender block ACME" in res.stderr
    assert senders(relay, "ACME")[alt]["status"] == "approved"

    # Blocked: refused with its own sentence, not recorded again, and not deletable either.
    relay.cli("sender", "block", "ACME", alt)
    code, text = attempt("life-5")
    assert code == 550 and "blocked" in text and alt in text
    assert list(senders(relay, "ACME", "blocked")) == [alt]
    assert senders(relay, "ACME")[alt]["attempts"] == 1
    res = relay.cli("sender", "delete", "ACME", alt, check=False)
    assert res.returncode == 1 and "cannot be deleted" in res.stderr and "sender approve ACME" in res.stderr

    # Switched back to approved, it passes again.
    relay.cli("sender", "approve", "ACME", alt)
    code, text = attempt("life-6")
    assert code == 250, text
    delivered(sink, "life-6")

    # The primary address is always approved: neither deleted nor blocked.
    for action in ("delete", "block"):
        res = relay.cli("sender", action, "ACME", "seller@acme.example", check=False)
        assert res.returncode == 1 and "primary" in res.stderr
    res = relay.cli("sender", "delete", "ACME", "nobody@acme.example", check=False)
    assert res.returncode == 1 and "no address" in res.stderr

    # The plain listing shows the same, for a person.
    listing = relay.cli("sender", "list", "ACME").stdout
    assert "primary" in listing and alt in listing and "approved" in listing


def test_an_unapproved_address_is_refused_without_asking_dns(relay, dns):
    # Approval decides first: a message its seller never approved is refused before SPF and
    # DKIM are looked up (no DNS traffic, no CPU spent on a message that cannot pass).
    a = aliases_of(relay, "ACME")
    stranger = "someone@never-asked.example"
    code, text = send(relay, stranger, a["buyer_alias"], mail(stranger, a["buyer_alias"], "ACME", "nodns"))
    assert code == 550 and "not approved" in text
    assert senders(relay, "ACME")[stranger]["status"] == "pending"
    assert dns.queried("never-asked.example") == 0


def test_approved_addresses_per_seller_are_limited(relay):
    # [auth] max_approved_senders = 2 in this relay's config; the primary does not count.
    relay.cli("sender", "approve", "LIMIT", "a@limit.example")
    relay.cli("sender", "approve", "LIMIT", "b@limit.example")
    res = relay.cli("sender", "approve", "LIMIT", "c@limit.example", check=False)
    assert res.returncode == 1 and "max_approved_senders = 2" in res.stderr and "block one" in res.stderr
    assert "c@limit.example" not in senders(relay, "LIMIT")
    relay.cli("sender", "approve", "LIMIT", "a@limit.example")  # approving again is no new approval
    relay.cli("sender", "block", "LIMIT", "b@limit.example")    # blocking is never limited
    relay.cli("sender", "block", "LIMIT", "c@limit.example")
    relay.cli("sender", "approve", "LIMIT", "c@limit.example")  # room again, after b was blocked
    assert set(senders(relay, "LIMIT", "approved")) == {"seller@limit.example", "a@limit.example",
                                                        "c@limit.example"}


# -- the event loop -----------------------------------------------------------------------


def test_a_slow_dns_answer_does_not_hold_up_other_sessions(relay, sink, dns):
    a = aliases_of(relay, "SLOW")
    queried = dns.queried("slow.example", "TXT")
    events: list[str] = []
    results: list[tuple[int, str]] = []

    def first_session() -> None:
        results.append(send(relay, "seller@slow.example", a["buyer_alias"],
                            mail("seller@slow.example", a["buyer_alias"], "SLOW", "slow-dns")))
        events.append("first session's DATA answered")

    thread = threading.Thread(target=first_session)
    thread.start()
    try:
        # The first session's SPF lookup has reached the DNS server, whose answer is held back.
        wait_until(lambda: dns.queried("slow.example", "TXT") > queried, "the SPF query")
        with relay.smtp() as c:
            assert c.noop()[0] == 250
            events.append("second session's NOOP answered")
    finally:
        thread.join(30)
    assert events == ["second session's NOOP answered", "first session's DATA answered"]
    assert results and results[0][0] == 250, results  # and the slow answer was then used
    assert dns.answered("slow.example", "TXT") > queried


# -- the PROXY protocol -------------------------------------------------------------------


class ProxiedSMTP(smtplib.SMTP):
    """smtplib, but the connection starts with a PROXY header (as a load balancer sends it)."""

    def __init__(self, header: bytes, port: int, source: str = "127.0.0.1") -> None:
        self.header = header
        super().__init__("127.0.0.1", port, timeout=30, source_address=(source, 0))

    def _get_socket(self, host, port, timeout):  # type: ignore[no-untyped-def]
        sock = socket.create_connection((host, port), timeout, self.source_address)
        sock.sendall(self.header)
        return sock


def proxy_v1(source: str) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 40000 25\r\n".encode()


def proxy_v2(source: str) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 40000, 25)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


@pytest.mark.parametrize("header", [proxy_v1, proxy_v2], ids=["v1", "v2"])
def test_proxy_from_a_trusted_peer_spf_judges_the_proxied_source(proxy_relay, sink, header):
    a = aliases_of(proxy_relay, "PROXIED")
    sender = "seller@proxied.example"
    # proxied.example allows only 192.0.2.10: the TCP peer (127.0.0.1) would fail.
    with ProxiedSMTP(header("192.0.2.10"), proxy_relay.port) as c:
        c.ehlo("lb-client.test")
        code, text = _transaction(c, sender, a["buyer_alias"],
                                  mail(sender, a["buyer_alias"], "PROXIED", f"proxy-ok-{header.__name__}"))
    assert code == 250, text
    delivered(sink, f"proxy-ok-{header.__name__}")
    with ProxiedSMTP(header("192.0.2.99"), proxy_relay.port) as c:
        c.ehlo("lb-client.test")
        code, text = _transaction(c, sender, a["buyer_alias"],
                                  mail(sender, a["buyer_alias"], "PROXIED", f"proxy-bad-{header.__name__}"))
    assert code == 550 and text.startswith("5.7.26 ")


def test_proxy_from_an_untrusted_peer_is_dropped(proxy_relay):
    # 127.0.0.2 is loopback too, but not in trusted_proxies.
    with pytest.raises(smtplib.SMTPServerDisconnected):
        ProxiedSMTP(proxy_v1("192.0.2.10"), proxy_relay.port, source="127.0.0.2")
    with socket.create_connection(("127.0.0.1", proxy_relay.port), timeout=30,
                                  source_address=("127.0.0.2", 0)) as s:
        assert closed_without_greeting(s)
    # A trusted peer that does not send the header is not served either.
    with socket.create_connection(("127.0.0.1", proxy_relay.port), timeout=30) as s:
        s.sendall(b"EHLO direct.test\r\n")
        assert closed_without_greeting(s)

    def logged() -> bool:
        events = [json.loads(line) for line in proxy_relay.log().splitlines() if line.startswith("{")]
        return any(e.get("reason") == "proxy.untrusted" and e.get("peer") == "127.0.0.2" for e in events)
    wait_until(logged, "the proxy.untrusted log line")


def closed_without_greeting(s: socket.socket) -> bool:
    try:
        return s.recv(1024) == b""   # closed (FIN) before a byte was sent
    except ConnectionResetError:     # closed with our bytes unread (RST): the same, for a client
        return True


def test_without_proxy_protocol_a_proxy_line_is_an_unknown_command(relay):
    with relay.smtp() as c:
        code, _ = c.docmd("PROXY", "TCP4 192.0.2.10 127.0.0.1 40000 25")
        assert code == 500
        assert c.noop()[0] == 250


# -- mode "none" ----------------------------------------------------------------------------


def test_mode_none_delivers_without_dns_and_says_so_loudly(tmp_path, sink):
    silent = DnsServer()  # knows nothing; it must not even be asked
    silent.start_in_thread()
    try:
        r = make_relay(tmp_path, sink_port=sink.port, dns=silent,
                       extra='[auth]\nsender_authentication = "none"\n')
        _seed(r, "SPOOF")
        r.start()
        try:
            a = aliases_of(r, "SPOOF")
            code, text = send(r, "seller@spoofed.example", a["buyer_alias"],
                              mail("seller@spoofed.example", a["buyer_alias"], "SPOOF", "mode-none"))
            assert code == 250, text
            msg = delivered(sink, "mode-none")
            assert msg["Authentication-Results"] is None  # nothing was checked, so nothing is claimed
            # Approval still holds in this mode.
            code, text = send(r, "x@spoofed.example", a["buyer_alias"],
                              mail("x@spoofed.example", a["buyer_alias"], "SPOOF", "mode-none-2"))
            assert code == 550 and "not approved" in text
        finally:
            _finish(r)
        assert silent.queries == []
        events = [json.loads(line) for line in r.log().splitlines() if line.startswith("{")]
        disabled = [e for e in events if e["event"] == "auth.disabled"]
        assert len(disabled) == 1 and disabled[0]["level"] == "warning"
    finally:
        silent.stop()


def test_refusals_are_logged_with_their_reason_codes(relay):
    events = [json.loads(line) for line in relay.log().splitlines() if line.startswith("{")]
    reasons = {e.get("reason") for e in events if e["event"] == "smtp.rejected"}
    assert {"auth.failed", "auth.temperror", "sender.not_approved", "sender.blocked", "sender.not_buyer"} <= reasons
