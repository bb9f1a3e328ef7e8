"""The relay's one way into DNS: an async resolver and a few small lookups.

Everything that needs DNS (SPF, DKIM keys, MX delivery) goes through these
helpers so that the outcomes are the same everywhere:

- an answer -> its records;
- NXDOMAIN or "no records of that type" -> an empty result (an :class:`Answer`
  tells the two apart for the callers that care, such as MX delivery);
- SERVFAIL, REFUSED, a timeout, no usable nameserver -> :class:`DnsTempError`,
  because such trouble says nothing about the name and must never decide a
  message's fate (it ends in a 451 or a deferral, never a 5xx).

All of it is async on dnspython's asyncio resolver: nothing here blocks the event
loop, and the ``timeout`` of :func:`make_resolver` bounds each lookup as a whole.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import dns.reversename

__all__ = [
    "Answer",
    "DnsTempError",
    "a",
    "aaaa",
    "lookup",
    "make_resolver",
    "mx",
    "ptr",
    "txt",
    "txt_bytes",
]

# Big enough for a 2048-bit DKIM key or a long SPF record in one UDP answer, small
# enough not to fragment (the DNS Flag Day 2020 figure).
_EDNS_PAYLOAD = 1232

# Answers the serving relay keeps (each at most its TTL): sender domains' SPF, DKIM keys, MX hosts.
_CACHE_ENTRIES = 20_000


class DnsTempError(Exception):
    """A lookup could not be answered now (SERVFAIL, timeout, no nameserver)."""

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        super().__init__(f"{rdtype} {name}: {reason}")
        self.name = name
        self.rdtype = rdtype
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Answer:
    """The records for one (name, type), or none; ``nxdomain`` says whether the name exists."""

    name: str
    rdtype: str
    records: tuple[Any, ...] = ()
    nxdomain: bool = False

    def __bool__(self) -> bool:
        return bool(self.records)


def _parse_nameserver(entry: str) -> tuple[str, int]:
    """``"1.2.3.4"``, ``"1.2.3.4:5353"``, ``"::1"``, ``"[::1]:5353"`` -> (address, port)."""
    entry = entry.strip()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
        port = int(port_text)
    else:
        host, port = entry, 53
    ipaddress.ip_address(host)  # a nameserver must be an address, not a name to resolve
    if not 0 < port < 65536:
        raise ValueError(f"bad nameserver port in {entry!r}")
    return host, port


def make_resolver(nameservers: list[str], timeout: float = 5.0, cache: bool = False) -> dns.asyncresolver.Resolver:
    """A resolver on the given ``host[:port]`` nameservers, or the system's when the list is empty.

    ``timeout`` bounds one lookup including its retries; a single try waits at most
    2 s (or ``timeout`` when smaller) before the next one.  ``cache`` keeps answers (and
    NXDOMAIN) for their TTL in an LRU cache, as every MTA does: the serving relay asks for
    the same sender domain's SPF record with every message.  ``bsm-relay check`` asks
    without one, so it always sees what is published now.
    """
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port) for host, port in map(_parse_nameserver, nameservers)
        ]
    else:
        resolver = dns.asyncresolver.Resolver()
    resolver.lifetime = timeout
    resolver.timeout = min(2.0, timeout)
    resolver.use_edns(0, 0, _EDNS_PAYLOAD)
    if cache:
        resolver.cache = dns.resolver.LRUCache(_CACHE_ENTRIES)
    return resolver


async def lookup(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> Answer:
    """The records of ``rdtype`` at ``name`` (absolute; no search list is applied)."""
    qname = name if name.endswith(".") else name + "."
    try:
        answer = await resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return Answer(name, rdtype, nxdomain=True)
    except dns.resolver.NoAnswer:  # raise_on_no_answer=False makes this rare, not impossible
        return Answer(name, rdtype)
    except dns.resolver.NoNameservers as exc:  # every server answered SERVFAIL/REFUSED or failed
        raise DnsTempError(name, rdtype, "no nameserver could answer") from exc
    except dns.exception.Timeout as exc:
        raise DnsTempError(name, rdtype, "timed out") from exc
    except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong, dns.name.BadEscape):
        # A name that cannot exist in the DNS (from a broken record or address) has no records.
        return Answer(name, rdtype, nxdomain=True)
    except dns.exception.DNSException as exc:
        raise DnsTempError(name, rdtype, type(exc).__name__) from exc
    rrset = answer.rrset
    return Answer(name, rdtype, tuple(rrset) if rrset is not None else ())


async def txt_bytes(resolver: dns.asyncresolver.Resolver, name: str) -> list[bytes]:
    """Each TXT record at ``name``, its character-strings joined (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
    return [b"".join(r.strings) for r in (await lookup(resolver, name, "TXT")).records]


async def txt(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    # Records are ASCII by every standard we read; anything else must not make us crash.
    return [r.decode("utf-8", "replace") for r in await txt_bytes(resolver, name)]


async def a(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    return [r.address for r in (await lookup(resolver, name, "A")).records]


async def aaaa(resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
    return [r.address for r in (await lookup(resolver, name, "AAAA")).records]


def _host(name: dns.name.Name) -> str:
    """A host name as text without the final dot; the root (null MX) becomes ``"."``."""
    return "." if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


async def mx(resolver: dns.asyncresolver.Resolver, name: str) -> list[tuple[int, str]]:
    """(preference, exchange) pairs as published, unsorted; a null MX exchange is ``"."``."""
    return [(r.preference, _host(r.exchange)) for r in (await lookup(resolver, name, "MX")).records]


async def ptr(resolver: dns.asyncresolver.Resolver, address: str) -> list[str]:
    reverse = dns.reversename.from_address(address).to_text()
    return [_host(r.target) for r in (await lookup(resolver, reverse, "PTR")).records]
