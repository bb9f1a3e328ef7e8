"""The SPF evaluator (RFC 7208), table-driven against the test DNS server."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest
from dnsserver import DnsServer

from bsm_relay.relay import dns as rdns
from bsm_relay.relay.spf import PermError, _Context, check_host, check_mail_from, expand, parse_record

ZONE: dict[tuple[str, str], list[str]] = {
    ("pass.example", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all"],
    ("ip6.example", "TXT"): ["v=spf1 ip6:2001:db8::/32 -all"],
    ("a.example", "TXT"): ["v=spf1 a -all"],
    ("a.example", "A"): ["192.0.2.10"],
    ("a.example", "AAAA"): ["2001:db8::10"],
    ("acidr.example", "TXT"): ["v=spf1 a:host.acidr.example/24//64 -all"],
    ("host.acidr.example", "A"): ["198.51.100.1"],
    ("host.acidr.example", "AAAA"): ["2001:db8:1::1"],
    ("mx.example", "TXT"): ["v=spf1 mx -all"],
    ("mx.example", "MX"): ["10 mail.mx.example.", "20 other.mx.example."],
    ("mail.mx.example", "A"): ["203.0.113.5"],
    ("other.mx.example", "A"): ["203.0.113.6"],
    ("inc.example", "TXT"): ["v=spf1 include:pass.example ~all"],
    ("incfail.example", "TXT"): ["v=spf1 include:all.example ?all"],
    ("incnone.example", "TXT"): ["v=spf1 include:nothing.example -all"],
    ("redir.example", "TXT"): ["v=spf1 redirect=pass.example"],
    ("redirall.example", "TXT"): ["v=spf1 ?all redirect=pass.example"],
    ("redirnone.example", "TXT"): ["v=spf1 redirect=nothing.example"],
    ("exists.example", "TXT"): ["v=spf1 exists:%{i}._spf.%{d} -all"],
    ("192.0.2.77._spf.exists.example", "A"): ["127.0.0.2"],
    ("macro.example", "TXT"): ["v=spf1 exists:%{l}.%{o2}.%{h}._m.macro.example -all"],
    ("bob.macro.example.helo.example._m.macro.example", "A"): ["127.0.0.2"],
    ("all.example", "TXT"): ["v=spf1 -all"],
    ("soft.example", "TXT"): ["v=spf1 ~all"],
    ("neutral.example", "TXT"): ["v=spf1 ?all"],
    ("noall.example", "TXT"): ["v=spf1 ip4:10.0.0.1"],
    ("two.example", "TXT"): ["v=spf1 -all", "v=spf1 +all"],
    ("syntax.example", "TXT"): ["v=spf1 ip4:192.0.2.1 foo:bar -all"],
    ("badip.example", "TXT"): ["v=spf1 ip4:300.1.1.1 -all"],
    ("badcidr.example", "TXT"): ["v=spf1 ip4:192.0.2.0/33 -all"],
    ("unknownmod.example", "TXT"): ["v=spf1 foo=bar ip4:192.0.2.0/24 -all"],
    ("late-syntax.example", "TXT"): ["v=spf1 ip4:192.0.2.0/24 -all %{z"],
    ("loop.example", "TXT"): ["v=spf1 include:loop.example -all"],
    ("ten.example", "TXT"): ["v=spf1 " + " ".join(["a"] * 10) + " -all"],
    ("eleven.example", "TXT"): ["v=spf1 " + " ".join(["a"] * 11) + " -all"],
    ("ten.example", "A"): ["198.51.100.99"],
    ("eleven.example", "A"): ["198.51.100.99"],
    ("twovoid.example", "TXT"): ["v=spf1 a:n1.twovoid.example a:n2.twovoid.example -all"],
    ("threevoid.example", "TXT"): ["v=spf1 a:n1.x.example a:n2.x.example a:n3.x.example -all"],
    ("tempfail.example", "TXT"): ["v=spf1 -all"],
    ("inctemp.example", "TXT"): ["v=spf1 include:tempfail.example -all"],
    ("txtonly.example", "TXT"): ["hello world"],
    ("helo.example", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
    ("ptr.example", "TXT"): ["v=spf1 ptr -all"],
    ("50.2.0.192.in-addr.arpa", "PTR"): ["host.ptr.example."],
    ("host.ptr.example", "A"): ["192.0.2.50"],
    ("51.2.0.192.in-addr.arpa", "PTR"): ["liar.ptr.example."],  # forward lookup does not confirm
    ("liar.ptr.example", "A"): ["192.0.2.99"],
    ("exp.example", "TXT"): ["v=spf1 -all exp=explain.%{d}"],
    ("upper.example", "TXT"): ["V=SPF1 IP4:192.0.2.1 -ALL"],
    ("split.example", "TXT"): ["v=spf1 " + " ".join(f"ip4:10.0.{i}.1" for i in range(30)) + " ip4:192.0.2.1 -all"],
}

CASES = [
    # (domain, client ip, expected)
    ("pass.example", "192.0.2.1", "pass"),
    ("pass.example", "198.51.100.1", "fail"),
    ("pass.example", "::ffff:192.0.2.5", "pass"),  # IPv4-mapped is IPv4
    ("pass.example", "2001:db8::1", "fail"),
    ("ip6.example", "2001:db8::1", "pass"),
    ("ip6.example", "192.0.2.1", "fail"),
    ("a.example", "192.0.2.10", "pass"),
    ("a.example", "2001:db8::10", "pass"),
    ("a.example", "192.0.2.11", "fail"),
    ("acidr.example", "198.51.100.200", "pass"),
    ("acidr.example", "2001:db8:1::ffff", "pass"),
    ("acidr.example", "198.51.101.1", "fail"),
    ("mx.example", "203.0.113.6", "pass"),
    ("mx.example", "203.0.113.7", "fail"),
    ("inc.example", "192.0.2.1", "pass"),
    ("inc.example", "198.51.100.1", "softfail"),
    ("incfail.example", "192.0.2.1", "neutral"),  # a fail inside include is just "no match"
    ("incnone.example", "192.0.2.1", "permerror"),
    ("redir.example", "192.0.2.1", "pass"),
    ("redir.example", "198.51.100.1", "fail"),
    ("redirall.example", "192.0.2.1", "neutral"),  # redirect is ignored when "all" is there
    ("redirnone.example", "192.0.2.1", "permerror"),
    ("exists.example", "192.0.2.77", "pass"),
    ("exists.example", "192.0.2.78", "fail"),
    ("all.example", "192.0.2.1", "fail"),
    ("soft.example", "192.0.2.1", "softfail"),
    ("neutral.example", "192.0.2.1", "neutral"),
    ("noall.example", "192.0.2.1", "neutral"),
    ("two.example", "192.0.2.1", "permerror"),
    ("syntax.example", "192.0.2.1", "permerror"),
    ("badip.example", "192.0.2.1", "permerror"),
    ("badcidr.example", "192.0.2.1", "permerror"),
    ("unknownmod.example", "192.0.2.1", "pass"),
    ("late-syntax.example", "192.0.2.1", "permerror"),  # syntax errors win even after a match
    ("loop.example", "192.0.2.1", "permerror"),
    ("ten.example", "192.0.2.1", "fail"),
    ("eleven.example", "192.0.2.1", "permerror"),
    ("twovoid.example", "192.0.2.1", "fail"),
    ("threevoid.example", "192.0.2.1", "permerror"),
    ("tempfail.example", "192.0.2.1", "temperror"),
    ("inctemp.example", "192.0.2.1", "temperror"),
    ("txtonly.example", "192.0.2.1", "none"),
    ("nothing.example", "192.0.2.1", "none"),
    ("localhost", "192.0.2.1", "none"),
    ("ptr.example", "192.0.2.50", "pass"),
    ("ptr.example", "192.0.2.51", "fail"),
    ("exp.example", "192.0.2.1", "fail"),
    ("upper.example", "192.0.2.1", "pass"),
    ("split.example", "192.0.2.1", "pass"),  # > 255 bytes: several strings, joined
]


@pytest.fixture
async def resolver():
    async with DnsServer(ZONE, servfail={"tempfail.example"}) as server:
        yield rdns.make_resolver([server.nameserver], timeout=1.0)


@pytest.mark.parametrize(("domain", "ip", "expected"), CASES)
async def test_check_host(resolver, domain: str, ip: str, expected: str) -> None:
    outcome = await check_host(resolver, ip, domain, f"bob@{domain}", "helo.example")
    assert outcome.result == expected, outcome.reason


async def test_macros_for_exists(resolver) -> None:
    outcome = await check_host(resolver, "192.0.2.1", "macro.example", "bob@macro.example", "helo.example")
    assert outcome.result == "pass"
    outcome = await check_host(resolver, "192.0.2.1", "macro.example", "eve@macro.example", "helo.example")
    assert outcome.result == "fail"


async def test_null_sender_uses_helo(resolver) -> None:
    outcome = await check_mail_from(resolver, "192.0.2.1", "HELO.example", "")
    assert (outcome.result, outcome.domain, outcome.scope) == ("pass", "helo.example", "helo")
    outcome = await check_mail_from(resolver, "192.0.2.2", "helo.example", "<>")
    assert outcome.result == "fail"
    outcome = await check_mail_from(resolver, "192.0.2.1", "helo.example", "bob@Pass.Example")
    assert (outcome.result, outcome.domain, outcome.scope) == ("pass", "pass.example", "mailfrom")


# RFC 7208 §7.4, sender strong-bad@email.example.com from 192.0.2.3 / 2001:db8::cb01.
MACROS = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%{h}.%%.%_x", "mx.example.org.%. x"),
    ("%{S}", "strong-bad%40email.example.com"),
]


@pytest.mark.parametrize(("spec", "expected"), MACROS)
def test_macro_expansion(spec: str, expected: str) -> None:
    ctx = _Context(None, ipaddress.ip_address("192.0.2.3"), "strong-bad@email.example.com",  # type: ignore[arg-type]
                   "mx.example.org")
    assert expand(ctx, spec, "email.example.com") == expected


def test_macro_expansion_ipv6() -> None:
    ctx = _Context(None, ipaddress.ip_address("2001:db8::cb01"), "strong-bad@email.example.com",  # type: ignore[arg-type]
                   "mx.example.org")
    assert expand(ctx, "%{ir}.%{v}._spf.%{d2}", "email.example.com") == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")


@pytest.mark.parametrize("record", [
    "v=spf1 include",
    "v=spf1 include:",
    "v=spf1 a:",
    "v=spf1 ip6:192.0.2.1",
    "v=spf1 ip4:192.0.2.1/032",
    "v=spf1 all:foo",
    "v=spf1 redirect=a.example redirect=b.example",
    "v=spf1 exists:%{x}.example.com",
    "v=spf1 exists:%{c}.example.com -all",
    "v=spf1 a:foo",
    "v=spf1 ptr/24",
    "v=spf1 -al",
])
def test_syntax_errors(record: str) -> None:
    with pytest.raises(PermError):
        record_terms = parse_record(record)
        # %{c} parses (it exists for exp) but may not be expanded outside exp.
        ctx = _Context(None, ipaddress.ip_address("192.0.2.3"), "a@b.example", "h")  # type: ignore[arg-type]
        for term in record_terms.terms:
            if term.spec:
                expand(ctx, term.spec, "b.example")


async def test_outcome_cache_keeps_outcomes_for_its_ttl_but_never_a_temporary_error(monkeypatch) -> None:
    # The serving relay's OutcomeCache: a sender's next message within ttl is not evaluated again
    # (no query at all: the resolver here keeps no cache), a temperror always is, and an outcome
    # past its ttl is evaluated afresh.
    from bsm_relay.relay import spf
    clock = [1000.0]
    # Only the cache's clock: the event loop (and the resolver's timeouts) keep the real one.
    monkeypatch.setattr(spf, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    async with DnsServer(ZONE, servfail={"tempfail.example"}) as server:
        resolver = rdns.make_resolver([server.nameserver], timeout=1.0)
        cache = spf.OutcomeCache(ttl=10.0)
        first = await cache.check(resolver, "192.0.2.1", "helo.example", "bob@pass.example")
        asked = len(server.queries)
        assert first.result == "pass" and asked >= 1
        assert await cache.check(resolver, "192.0.2.1", "HELO.example", "bob@pass.example") == first
        assert len(server.queries) == asked
        # Another client address is another question.
        assert (await cache.check(resolver, "198.51.100.1", "helo.example", "bob@pass.example")).result == "fail"
        asked = len(server.queries)
        for _ in range(2):
            outcome = await cache.check(resolver, "192.0.2.1", "helo.example", "bob@tempfail.example")
            assert outcome.result == "temperror"
        assert len(server.queries) > asked + 1          # asked again: never kept
        asked = len(server.queries)
        clock[0] += 10.0
        assert (await cache.check(resolver, "192.0.2.1", "helo.example", "bob@pass.example")).result == "pass"
        assert len(server.queries) > asked               # past its ttl: evaluated afresh
