"""The test DNS responder answers like a real server (checked with dnspython's resolver)."""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.resolver
import pytest

from bsm_relay.relay import dns as rdns
from dnsserver import DnsServer

ZONE = {
    ("example.com.", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
    ("example.com.", "MX"): ["10 mx.example.com."],
    ("mx.example.com.", "A"): ["127.0.0.1"],
    ("www.example.com.", "CNAME"): ["mx.example.com."],
    ("sel._domainkey.example.com.", "TXT"): ["v=DKIM1; k=rsa; p=" + "A" * 600],
}


def plain_resolver(server: DnsServer, *, edns: bool = False, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
    """dnspython's resolver as anyone would set it up (without our helpers' EDNS)."""
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    if edns:
        resolver.use_edns(0, 0, 1232)
    return resolver


async def wait_for_query(server: DnsServer, name: str, rdtype: str, count: int = 1) -> None:
    async with asyncio.timeout(5):
        while server.queried(name, rdtype) < count:
            await asyncio.sleep(0.005)


async def test_answers_nxdomain_and_nodata() -> None:
    async with DnsServer(ZONE) as server:
        resolver = plain_resolver(server)
        answer = await resolver.resolve("example.com.", "MX")
        assert [r.to_text() for r in answer] == ["10 mx.example.com."]
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve("nope.example.com.", "A")
        with pytest.raises(dns.resolver.NoAnswer):
            await resolver.resolve("example.com.", "A")
        # An empty non-terminal exists: NODATA, not NXDOMAIN.
        with pytest.raises(dns.resolver.NoAnswer):
            await resolver.resolve("_domainkey.example.com.", "TXT")
        answer = await resolver.resolve("WWW.Example.COM.", "A")  # case-insensitive, CNAME chased
        assert [r.address for r in answer] == ["127.0.0.1"]


async def test_long_txt_is_split_and_falls_back_to_tcp() -> None:
    async with DnsServer(ZONE) as server:
        answer = await plain_resolver(server).resolve("sel._domainkey.example.com.", "TXT")
        strings = answer[0].strings
        assert [len(s) for s in strings] == [255, 255, 108]
        assert b"".join(strings).endswith(b"A" * 600)
        # No EDNS: 512 bytes over UDP, so the answer came truncated and was asked again over TCP.
        assert ("udp", "sel._domainkey.example.com.", "TXT") in server.queries
        assert ("tcp", "sel._domainkey.example.com.", "TXT") in server.queries


async def test_zone_can_change_while_running() -> None:
    async with DnsServer(ZONE) as server:
        resolver = rdns.make_resolver([server.nameserver], timeout=1.0)
        assert await rdns.a(resolver, "new.example.com") == []
        server.zone[("New.Example.com", "A")] = ["192.0.2.7"]
        assert await rdns.a(resolver, "new.example.com") == ["192.0.2.7"]


async def test_servfail_drop_and_delay() -> None:
    async with DnsServer(ZONE, servfail={"example.com."}, drop={("mx.example.com.", "A")}) as server:
        resolver = rdns.make_resolver([server.nameserver], timeout=0.5)
        with pytest.raises(rdns.DnsTempError):
            await rdns.txt(resolver, "example.com")
        with pytest.raises(rdns.DnsTempError):
            await rdns.a(resolver, "mx.example.com")
        server.drop.clear()
        server.delay["mx.example.com"] = 1.0
        resolver = rdns.make_resolver([server.nameserver], timeout=3.0)
        # A slow answer does not hold up a quick one asked after it.
        before = server.queried("mx.example.com", "A")
        slow = asyncio.create_task(rdns.a(resolver, "mx.example.com"))
        await wait_for_query(server, "mx.example.com", "A", before + 1)
        fast = await rdns.txt(resolver, "sel._domainkey.example.com")
        assert not slow.done()
        assert fast[0].startswith("v=DKIM1")
        assert await slow == ["127.0.0.1"]


async def test_helpers_map_empty_results() -> None:
    async with DnsServer(ZONE) as server:
        resolver = rdns.make_resolver([server.nameserver], timeout=1.0)
        assert await rdns.mx(resolver, "example.com") == [(10, "mx.example.com")]
        assert await rdns.mx(resolver, "nope.example.com") == []
        answer = await rdns.lookup(resolver, "nope.example.com", "MX")
        assert answer.nxdomain and not answer
        assert await rdns.txt(resolver, "x" * 70 + ".example.com") == []  # not a valid name


def test_runs_in_a_thread() -> None:
    server = DnsServer(ZONE)
    host, port = server.start_in_thread()
    try:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
        resolver.lifetime = 2.0
        assert [r.address for r in resolver.resolve("mx.example.com.", "A")] == ["127.0.0.1"]
        assert [r.address for r in resolver.resolve("mx.example.com.", "A", tcp=True)] == ["127.0.0.1"]
    finally:
        server.stop()


def test_make_resolver_parses_nameservers() -> None:
    resolver = rdns.make_resolver(["127.0.0.1:5353", "::1", "[::1]:53"], timeout=3.0)
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [  # type: ignore[union-attr]
        ("127.0.0.1", 5353), ("::1", 53), ("::1", 53)]
    assert resolver.lifetime == 3.0
    with pytest.raises(ValueError):
        rdns.make_resolver(["dns.example.com"])
