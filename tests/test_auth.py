"""Sender authenticity (SPF, DKIM, relaxed alignment) against the test DNS server on loopback."""

from __future__ import annotations

import asyncio
import base64

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bsm_relay.relay import dns as rdns
from bsm_relay.relay.auth import AuthResult, check_sender, org_domain
from dnsserver import DnsServer

CLIENT = "192.0.2.25"
OTHER = "198.51.100.9"


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, str]:
    """A private key (PEM) and the DKIM TXT record publishing it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


@pytest.fixture
async def server(rsa_key):
    zone = {
        ("example.com", "TXT"): [f"v=spf1 ip4:{CLIENT} -all"],
        ("news.example.com", "TXT"): [f"v=spf1 ip4:{CLIENT} -all"],
        ("bounces.mailer.example", "TXT"): [f"v=spf1 ip4:{CLIENT} -all"],
        ("sel1._domainkey.example.com", "TXT"): [rsa_key[1]],
        ("sel1._domainkey.mailer.example", "TXT"): [rsa_key[1]],
        ("slow.example", "TXT"): [f"v=spf1 ip4:{CLIENT} -all"],
        ("broken.example", "TXT"): [f"v=spf1 ip4:{CLIENT} -all"],
        ("sel1._domainkey.slowkey.example", "TXT"): [rsa_key[1]],
        ("slowkey.example", "TXT"): ["v=spf1 -all"],
    }
    async with DnsServer(zone, servfail={"broken.example"},
                         delay={"slow.example": 3.0, "sel1._domainkey.slowkey.example": 3.0}) as srv:
        yield srv


@pytest.fixture
def resolver(server):
    return rdns.make_resolver([server.nameserver], timeout=1.0)


def message(from_addr: str = "Seller <seller@example.com>", body: bytes = b"Hello buyer,\r\nthanks.\r\n") -> bytes:
    return (f"From: {from_addr}\r\nTo: buyer-alias@marketplace.example\r\nSubject: Your order\r\n"
            "Message-ID: <1@example.com>\r\nDate: Mon, 1 Jun 2026 10:00:00 +0000\r\n\r\n").encode() + body


def signed(msg: bytes, key: bytes, domain: str = "example.com", selector: str = "sel1") -> bytes:
    signature = dkim.sign(msg, selector.encode(), domain.encode(), key,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return signature + msg


async def check(resolver, *, mail_from: str = "seller@example.com", from_domain: str = "example.com",
                ip: str = CLIENT, msg: bytes | None = None, helo: str = "mail.example.com") -> AuthResult:
    return await check_sender(resolver=resolver, client_ip=ip, helo=helo, mail_from=mail_from,
                              from_domain=from_domain, message=msg if msg is not None else message())


def test_org_domain() -> None:
    assert org_domain("Mail.Example.COM.") == "example.com"
    assert org_domain("bounces.mailer.example") == "mailer.example"
    assert org_domain("a.b.example.co.uk") == "example.co.uk"
    assert org_domain("co.uk") == "co.uk"


async def test_spf_pass_aligned(resolver) -> None:
    result = await check(resolver)
    assert (result.spf, result.spf_domain, result.dkim) == ("pass", "example.com", ())
    assert result.aligned and not result.temperror and result.reason is None


async def test_spf_fail_and_no_dkim_is_not_aligned(resolver) -> None:
    result = await check(resolver, ip=OTHER)
    assert result.spf == "fail"
    assert not result.aligned and not result.temperror
    assert result.reason == "auth.failed"


async def test_spf_pass_for_an_unaligned_envelope_domain(resolver) -> None:
    result = await check(resolver, mail_from="bounce-123@bounces.mailer.example")
    assert result.spf == "pass"
    assert not result.aligned and not result.temperror


async def test_spf_pass_for_a_subdomain_is_aligned(resolver) -> None:
    result = await check(resolver, mail_from="list@news.example.com")
    assert (result.spf, result.spf_domain) == ("pass", "news.example.com")
    assert result.aligned


async def test_null_sender_checks_helo(resolver) -> None:
    result = await check(resolver, mail_from="", helo="news.example.com")
    assert (result.spf, result.spf_domain, result.spf_scope) == ("pass", "news.example.com", "helo")
    assert result.aligned
    assert "smtp.helo=news.example.com" in result.authentication_results("relay.example")


async def test_dkim_pass_aligned_with_spf_fail(resolver, rsa_key) -> None:
    result = await check(resolver, ip=OTHER, msg=signed(message(), rsa_key[0]))
    assert result.spf == "fail"
    assert result.dkim == (("example.com", "pass"),)
    assert result.aligned


async def test_dkim_pass_unaligned_is_not_enough(resolver, rsa_key) -> None:
    result = await check(resolver, ip=OTHER, msg=signed(message(), rsa_key[0], domain="mailer.example"))
    assert result.dkim == (("mailer.example", "pass"),)
    assert not result.aligned


async def test_dkim_broken_by_a_body_change(resolver, rsa_key) -> None:
    msg = signed(message(), rsa_key[0]).replace(b"thanks.", b"send me your card number.")
    result = await check(resolver, ip=OTHER, msg=msg)
    assert result.dkim == (("example.com", "fail"),)
    assert not result.aligned and not result.temperror


async def test_dkim_without_published_key(resolver, rsa_key) -> None:
    result = await check(resolver, ip=OTHER, msg=signed(message(), rsa_key[0], selector="gone"))
    assert result.dkim == (("example.com", "permerror"),)
    assert not result.aligned and not result.temperror


async def test_several_signatures(resolver, rsa_key) -> None:
    msg = signed(signed(message(), rsa_key[0], domain="mailer.example"), rsa_key[0])
    result = await check(resolver, ip=OTHER, msg=msg)
    assert result.dkim == (("example.com", "pass"), ("mailer.example", "pass"))
    assert result.aligned


async def test_spf_dns_timeout_is_temperror(resolver) -> None:
    result = await check(resolver, mail_from="seller@slow.example", from_domain="slow.example")
    assert result.spf == "temperror"
    assert result.temperror and not result.aligned
    assert result.reason == "auth.temperror"
    assert result.dmarc == "temperror"


async def test_spf_servfail_is_temperror(resolver) -> None:
    result = await check(resolver, mail_from="seller@broken.example", from_domain="broken.example")
    assert result.spf == "temperror"
    assert result.temperror and not result.aligned


async def test_dkim_key_timeout_is_temperror(resolver, rsa_key) -> None:
    msg = signed(message("seller@slowkey.example"), rsa_key[0], domain="slowkey.example")
    result = await check(resolver, mail_from="seller@slowkey.example", from_domain="slowkey.example", msg=msg)
    assert result.spf == "fail"
    assert result.dkim == (("slowkey.example", "temperror"),)
    assert result.temperror and not result.aligned


async def test_trouble_that_could_not_have_helped_decides_nothing(resolver) -> None:
    # SPF times out for an envelope domain that would not align anyway: a plain failure.
    result = await check(resolver, mail_from="bounce@slow.example", from_domain="example.com", ip=OTHER)
    assert result.spf == "temperror"
    assert not result.temperror and not result.aligned


async def test_aligned_pass_wins_over_trouble(resolver, rsa_key) -> None:
    msg = signed(message("seller@slowkey.example"), rsa_key[0], domain="slowkey.example")
    msg = signed(msg, rsa_key[0])  # and a good example.com signature
    result = await check(resolver, mail_from="seller@example.com", from_domain="example.com", msg=msg)
    assert result.aligned and not result.temperror


async def test_event_loop_is_not_blocked_by_a_slow_answer(rsa_key) -> None:
    # The server runs in a thread of its own, so a check that blocked this loop would
    # still get its answer; but then nothing else on this loop could run until the
    # server had answered.  So: other work must get done while the answer is pending.
    server = DnsServer({("slow.example", "TXT"): [f"v=spf1 ip4:{CLIENT} -all"]}, delay={"slow.example": 1.0})
    server.start_in_thread()
    try:
        resolver = rdns.make_resolver([server.nameserver], timeout=3.0)
        events: list[str] = []

        async def run_check() -> AuthResult:
            result = await check(resolver, mail_from="seller@slow.example", from_domain="slow.example")
            events.append("check done")
            return result

        async def meanwhile() -> None:
            async with asyncio.timeout(5):
                while not server.queried("slow.example", "TXT"):
                    await asyncio.sleep(0.01)
            events.append("query pending")
            for _ in range(3):
                await asyncio.sleep(0)
            events.append("other work done" if not server.answered("slow.example") else "answered already")

        task = asyncio.create_task(run_check())
        await meanwhile()
        result = await task
    finally:
        server.stop()
    assert events == ["query pending", "other work done", "check done"]
    assert result.aligned


async def test_authentication_results_names_no_mailbox(resolver, rsa_key) -> None:
    result = await check(resolver, mail_from="seller.private+tag@news.example.com", ip=OTHER,
                         msg=signed(message(), rsa_key[0]))
    header = result.authentication_results("relay.marketplace.example")
    assert header == ("relay.marketplace.example; spf=fail smtp.mailfrom=news.example.com; "
                      "dkim=pass header.d=example.com; dmarc=pass header.from=example.com")
    assert "@" not in header and "seller" not in header


def test_authentication_results_without_dkim_and_with_junk_domains() -> None:
    result = AuthResult(spf="none", spf_domain="bad;domain", dkim=(), from_domain="x@y\r\nz",
                        aligned=False, temperror=False)
    assert result.authentication_results("relay.example") == "relay.example; spf=none; dkim=none; dmarc=fail"
