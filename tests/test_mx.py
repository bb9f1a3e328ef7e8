"""MX target resolution against the test DNS server (RFC 5321 §5.1, RFC 7505)."""

from __future__ import annotations

import pytest

from bsm_relay.relay import dns as rdns
from bsm_relay.relay.mx import PermanentDnsFailure, TemporaryDnsFailure, addresses, resolve_targets
from dnsserver import DnsServer

ZONE = {
    ("multi.example.", "MX"): ["20 backup.multi.example.", "10 mx1.multi.example.", "10 mx2.multi.example.",
                               "30 last.multi.example."],
    ("null.example.", "MX"): ["0 ."],
    ("null.example.", "A"): ["192.0.2.9"],
    ("plain.example.", "A"): ["192.0.2.1"],
    ("plain.example.", "AAAA"): ["2001:db8::1"],
    ("v6only.example.", "AAAA"): ["2001:db8::2"],
    ("nomail.example.", "TXT"): ["no mail here"],
    ("broken.example.", "A"): ["192.0.2.3"],
    ("slow.example.", "MX"): ["10 mx.slow.example."],
}


@pytest.fixture
async def server():
    async with DnsServer(ZONE, servfail={("broken.example.", "MX")}, delay={"slow.example.": 3.0}) as srv:
        yield srv


@pytest.fixture
def resolver(server):
    return rdns.make_resolver([server.nameserver], timeout=1.0)


async def test_mx_in_preference_order(resolver) -> None:
    targets = await resolve_targets(resolver, "Multi.Example.")
    assert [pref for _, pref in targets] == [10, 10, 20, 30]
    assert {host for host, _ in targets[:2]} == {"mx1.multi.example", "mx2.multi.example"}
    assert targets[2:] == [("backup.multi.example", 20), ("last.multi.example", 30)]


async def test_null_mx_is_permanent_5_1_10(resolver) -> None:
    with pytest.raises(PermanentDnsFailure) as info:
        await resolve_targets(resolver, "null.example")
    assert info.value.status == "5.1.10"


async def test_no_mx_falls_back_to_the_domain(resolver) -> None:
    assert await resolve_targets(resolver, "plain.example") == [("plain.example", 0)]
    assert await resolve_targets(resolver, "v6only.example") == [("v6only.example", 0)]
    assert await addresses(resolver, "plain.example") == ["192.0.2.1", "2001:db8::1"]


async def test_no_mx_and_no_address_is_permanent(resolver) -> None:
    with pytest.raises(PermanentDnsFailure) as info:
        await resolve_targets(resolver, "nomail.example")
    assert info.value.status == "5.1.2"


async def test_nxdomain_is_permanent_5_1_2(resolver) -> None:
    with pytest.raises(PermanentDnsFailure) as info:
        await resolve_targets(resolver, "nowhere.example")
    assert info.value.status == "5.1.2"
    assert "nowhere.example" in str(info.value)


async def test_servfail_is_temporary(resolver) -> None:
    with pytest.raises(TemporaryDnsFailure) as info:
        await resolve_targets(resolver, "broken.example")
    assert info.value.status.startswith("4.")


async def test_timeout_is_temporary(resolver) -> None:
    with pytest.raises(TemporaryDnsFailure):
        await resolve_targets(resolver, "slow.example")


async def test_address_lookup_trouble(server, resolver) -> None:
    server.servfail.add("plain.example")
    with pytest.raises(TemporaryDnsFailure):
        await addresses(resolver, "plain.example")
    # One family failing while the other answers is not a failure.
    server.servfail.clear()
    server.servfail.add(("plain.example", "AAAA"))
    assert await addresses(resolver, "plain.example") == ["192.0.2.1"]


async def test_literals_need_no_dns(resolver) -> None:
    assert await resolve_targets(resolver, "[192.0.2.5]") == [("192.0.2.5", 0)]
    assert await resolve_targets(resolver, "[IPv6:2001:db8::5]") == [("2001:db8::5", 0)]
    assert await addresses(resolver, "192.0.2.6") == ["192.0.2.6"]
