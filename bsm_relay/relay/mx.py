"""Where a message for a domain goes in ``mode = "mx"``: the MX hosts, in order.

RFC 5321 §5.1 and RFC 7505, with DNS trouble kept apart from DNS answers:

- MX records -> their hosts by preference (equal preferences in random order, to
  spread the load as §5.1 asks);
- no MX records -> the domain itself (the implicit MX), if it has an address;
- a null MX (``0 .``) -> :class:`PermanentDnsFailure` ``5.1.10``;
- NXDOMAIN, or neither MX nor address -> :class:`PermanentDnsFailure` ``5.1.2``;
- SERVFAIL, a timeout -> :class:`TemporaryDnsFailure` ``4.4.3`` (delivery retries).

The exception texts name the domain, never a mailbox: they end up in logs and, via
the bounce builder, in DSNs.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random

import dns.asyncresolver

from . import dns as rdns

__all__ = ["DnsFailure", "PermanentDnsFailure", "TemporaryDnsFailure", "addresses", "resolve_targets"]


class DnsFailure(Exception):
    """A domain's mail could not be routed; ``status`` is the RFC 3463 enhanced status code."""

    status = "4.4.3"

    def __init__(self, domain: str, reason: str, status: str | None = None) -> None:
        super().__init__(f"{domain}: {reason}")
        self.domain = domain
        self.reason = reason
        if status is not None:
            self.status = status


class PermanentDnsFailure(DnsFailure):
    status = "5.1.2"


class TemporaryDnsFailure(DnsFailure):
    status = "4.4.3"


def _literal(domain: str) -> str | None:
    """The address in a domain literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


async def resolve_targets(resolver: dns.asyncresolver.Resolver, domain: str) -> list[tuple[str, int]]:
    """(host, preference) pairs to try in order for mail to ``domain``."""
    domain = domain.strip().rstrip(".").lower()
    literal = _literal(domain)
    if literal is not None:
        return [(literal, 0)]
    if not domain:
        raise PermanentDnsFailure(domain, "empty domain")
    try:
        answer = await rdns.lookup(resolver, domain, "MX")
    except rdns.DnsTempError as exc:
        raise TemporaryDnsFailure(domain, f"MX lookup failed: {exc.reason}") from exc
    if answer.nxdomain:
        raise PermanentDnsFailure(domain, "domain does not exist", "5.1.2")
    records = [(r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in answer.records]
    hosts = [(host, pref) for pref, host in records if host not in ("", "@", ".")]
    if records and not hosts:
        raise PermanentDnsFailure(domain, "domain does not accept mail (null MX)", "5.1.10")
    if hosts:
        random.shuffle(hosts)  # load spreading among equal preferences, not a secret
        hosts.sort(key=lambda item: item[1])
        return hosts
    # No MX: the domain is its own MX, provided it has an address at all.
    if not await addresses(resolver, domain):
        raise PermanentDnsFailure(domain, "domain has no MX and no address", "5.1.2")
    return [(domain, 0)]


async def addresses(resolver: dns.asyncresolver.Resolver, host: str) -> list[str]:
    """The IPv4 then the IPv6 addresses of ``host``; empty when it has none.

    One family failing temporarily is tolerated when the other answers; both
    failing (or one failing and the other empty) is :class:`TemporaryDnsFailure`.
    """
    literal = _literal(host)
    if literal is not None:
        return [literal]
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    found: list[str] = []
    errors: list[rdns.DnsTempError] = []
    results = await asyncio.gather(rdns.a(resolver, host), rdns.aaaa(resolver, host), return_exceptions=True)
    for result in results:
        if isinstance(result, rdns.DnsTempError):
            errors.append(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            found.extend(result)
    if errors and not found:
        raise TemporaryDnsFailure(host.rstrip("."), f"address lookup failed: {errors[0].reason}")
    return found
