"""SPF (RFC 7208) on the asyncio resolver: is this client allowed to send for this domain?

Written here because no maintained library evaluates SPF asynchronously (pyspf is
synchronous and unmaintained); it follows RFC 7208 closely:

- mechanisms ``all ip4 ip6 a mx ptr include exists``, modifiers ``redirect`` (and
  ``exp``, parsed and ignored: we never show an explanation to anyone);
- macros ``%{s l o d i p h v}`` with digit/``r``/delimiter transformers, ``%%``
  ``%_`` ``%-``; ``p`` expands to ``unknown`` (allowed by §7.3, and saves lookups);
- a syntax error anywhere in a record -> ``permerror`` before anything is evaluated;
- at most 10 DNS-querying terms per check (§4.6.4), at most 10 MX/PTR names per
  term, at most 2 void lookups -> ``permerror`` beyond;
- DNS trouble (SERVFAIL, timeout) -> ``temperror``.

The result is a value (:class:`SpfOutcome`) and the evaluator keeps no state
between checks.
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

import dns.asyncresolver

from . import dns as rdns

__all__ = ["SpfOutcome", "SpfResult", "check_host", "check_mail_from"]

SpfResult = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]

_QUALIFIERS: dict[str, SpfResult] = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = {"all", "ip4", "ip6", "a", "mx", "ptr", "include", "exists"}
_LOOKUP_LIMIT = 10
_VOID_LIMIT = 2
_NAMES_LIMIT = 10  # MX or PTR names looked at per term

_IP4_CIDR = re.compile(r"^(?:0|[1-9][0-9]?)$")
_IP6_CIDR = re.compile(r"^(?:0|[1-9][0-9]{0,2})$")
_TOPLABEL = re.compile(r"^(?:[a-z0-9]*[a-z][a-z0-9]*|[a-z0-9]+-[a-z0-9-]*[a-z0-9])$", re.I)
_MACRO = re.compile(r"%(?:\{([a-zA-Z])([0-9]*)(r?)([.\-+,/_=]*)\}|(.)|$)")
_MECHANISM = re.compile(r"^([a-zA-Z0-9]+)([:/].*)?$")
_MODIFIER = re.compile(r"^([a-zA-Z][a-zA-Z0-9_.\-]*)=(.*)$")


class PermError(Exception):
    """The published policy is broken (§2.6.7)."""


class TempError(Exception):
    """DNS trouble kept us from deciding (§2.6.6)."""


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    """``result`` for ``domain`` (the MAIL FROM domain, or the HELO name for a null sender)."""

    result: SpfResult
    domain: str
    scope: Literal["mailfrom", "helo"] = "mailfrom"
    reason: str = ""  # for the log: which term matched or what went wrong


@dataclass(slots=True)
class _Context:
    """What one check_host() tree shares: the request and the lookup budgets."""

    resolver: dns.asyncresolver.Resolver
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str
    helo: str
    lookups: int = 0
    voids: int = 0
    matched: str = field(default="")

    def count_lookup(self) -> None:
        self.lookups += 1
        if self.lookups > _LOOKUP_LIMIT:
            raise PermError("more than 10 DNS lookups")

    def count_void(self, empty: bool) -> None:
        if empty:
            self.voids += 1
            if self.voids > _VOID_LIMIT:
                raise PermError("more than 2 void lookups")


@dataclass(frozen=True, slots=True)
class _Term:
    qualifier: SpfResult
    name: str  # mechanism name, lower case
    spec: str | None  # domain-spec or address, before macro expansion
    cidr4: int | None = None
    cidr6: int | None = None

    def text(self) -> str:
        return self.name + (f":{self.spec}" if self.spec else "")


@dataclass(frozen=True, slots=True)
class _Record:
    terms: tuple[_Term, ...]
    redirect: str | None


# -- parsing ---------------------------------------------------------------------


def _split_cidr(value: str, allow_ip4: bool = True) -> tuple[str, int | None, int | None]:
    """``"example.com/24//64"`` -> ("example.com", 24, 64)."""
    cidr4 = cidr6 = None
    if "//" in value:
        value, _, text6 = value.rpartition("//")
        if not _IP6_CIDR.match(text6) or int(text6) > 128:
            raise PermError(f"bad ip6 cidr length {text6!r}")
        cidr6 = int(text6)
    if allow_ip4 and "/" in value:
        value, _, text4 = value.rpartition("/")
        if not _IP4_CIDR.match(text4) or int(text4) > 32:
            raise PermError(f"bad ip4 cidr length {text4!r}")
        cidr4 = int(text4)
    return value, cidr4, cidr6


def _check_domain_spec(spec: str) -> None:
    _expand_syntax(spec)
    if not spec:
        raise PermError("empty domain-spec")
    if spec.endswith("}") or re.search(r"%[%_-]$", spec):
        return  # ends in a macro: anything may come of it
    labels = spec.rstrip(".").split(".")
    if len(labels) < 2 or not _TOPLABEL.match(labels[-1]):
        raise PermError(f"bad domain-spec {spec!r}")


def parse_record(text: str) -> _Record:
    """Parse a ``v=spf1`` record; any syntax error is a :class:`PermError`."""
    words = text.split(" ")
    if words[0].lower() != "v=spf1":
        raise PermError("not an SPF record")
    terms: list[_Term] = []
    redirect: str | None = None
    seen_exp = False
    for word in words[1:]:
        if not word:
            continue
        modifier = _MODIFIER.match(word)
        if modifier and modifier.group(1).lower() not in _MECHANISMS:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name == "redirect":
                if redirect is not None:
                    raise PermError("redirect given twice")
                _check_domain_spec(value)
                redirect = value
            elif name == "exp":
                if seen_exp:
                    raise PermError("exp given twice")
                seen_exp = True
                _check_domain_spec(value)
            else:
                _expand_syntax(value)  # unknown modifiers are ignored, but must parse
            continue
        qualifier: SpfResult = "pass"
        if word[0] in _QUALIFIERS:
            qualifier, word = _QUALIFIERS[word[0]], word[1:]
        mechanism = _MECHANISM.match(word)
        if mechanism is None or mechanism.group(1).lower() not in _MECHANISMS:
            raise PermError(f"unknown mechanism in {word!r}")
        name, rest = mechanism.group(1).lower(), mechanism.group(2) or ""
        sep = rest[:1]
        arg = rest[1:] if sep == ":" else rest  # "a/24" keeps its "/24"
        terms.append(_parse_mechanism(qualifier, name, sep, arg))
    return _Record(tuple(terms), redirect)


def _parse_mechanism(qualifier: SpfResult, name: str, sep: str, arg: str) -> _Term:
    if name == "all":
        if sep:
            raise PermError("all takes no argument")
        return _Term(qualifier, name, None)
    if name in ("ip4", "ip6"):
        if sep != ":":
            raise PermError(f"{name} needs an address")
        address, _, length = arg.partition("/")
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError as exc:
            raise PermError(f"bad {name} address {address!r}") from exc
        wanted_version = 4 if name == "ip4" else 6
        pattern, limit = (_IP4_CIDR, 32) if name == "ip4" else (_IP6_CIDR, 128)
        if parsed.version != wanted_version or (length and (not pattern.match(length) or int(length) > limit)):
            raise PermError(f"bad {name} term {arg!r}")
        bits = int(length) if length else limit
        return _Term(qualifier, name, address, bits if name == "ip4" else None, bits if name == "ip6" else None)
    if name in ("a", "mx"):
        spec, cidr4, cidr6 = _split_cidr(arg)
        if sep == ":" and not spec:
            raise PermError(f"{name}: with an empty domain")
        if spec:
            _check_domain_spec(spec)
        return _Term(qualifier, name, spec or None, cidr4, cidr6)
    if name == "ptr":
        if sep == "/":
            raise PermError("ptr takes no cidr")
        if sep == ":":
            _check_domain_spec(arg)
        return _Term(qualifier, name, arg or None)
    # include, exists: a domain-spec is required
    if sep != ":" or not arg:
        raise PermError(f"{name} needs a domain")
    _check_domain_spec(arg)
    return _Term(qualifier, name, arg)


# -- macros (§7) ----------------------------------------------------------------


def _expand_syntax(spec: str) -> None:
    for match in _MACRO.finditer(spec):
        letter, other = match.group(1), match.group(5)
        if letter is None and other not in ("%", "_", "-"):
            raise PermError(f"bad macro in {spec!r}")
        if letter is not None and letter.lower() not in "slodiphcrtv":
            raise PermError(f"unknown macro letter {letter!r}")


def _macro_value(ctx: _Context, letter: str, domain: str) -> str:
    local, _, sender_domain = ctx.sender.rpartition("@")
    ip = ctx.ip
    if letter == "s":
        return ctx.sender
    if letter == "l":
        return local or "postmaster"
    if letter == "o":
        return sender_domain
    if letter == "d":
        return domain
    if letter == "i":
        if ip.version == 4:
            return str(ip)
        return ".".join(ip.exploded.replace(":", ""))
    if letter == "p":
        return "unknown"
    if letter == "v":
        return "in-addr" if ip.version == 4 else "ip6"
    if letter == "h":
        return ctx.helo
    raise PermError(f"macro %{{{letter}}} is only allowed in exp")


def expand(ctx: _Context, spec: str, domain: str) -> str:
    def one(match: re.Match[str]) -> str:
        letter, digits, reverse, delimiters, other = match.groups()
        if letter is None:
            if other == "%":
                return "%"
            if other == "_":
                return " "
            if other == "-":
                return "%20"
            raise PermError(f"bad macro in {spec!r}")
        value = _macro_value(ctx, letter.lower(), domain)
        parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            keep = int(digits)
            if keep == 0:
                raise PermError("macro keeps zero labels")
            parts = parts[-keep:]
        value = ".".join(parts)
        if letter.isupper():
            value = urllib.parse.quote(value, safe="")
        return value

    expanded = _MACRO.sub(one, spec)
    # §7.3: trim from the left until the name fits in 253 characters.
    expanded = expanded.rstrip(".")
    while len(expanded) > 253 and "." in expanded:
        expanded = expanded.split(".", 1)[1]
    return expanded


# -- evaluation (§4, §5) -----------------------------------------------------------


def _valid_domain(domain: str) -> bool:
    labels = domain.rstrip(".").split(".")
    return len(labels) >= 2 and all(0 < len(label) <= 63 for label in labels) and len(domain) <= 253


async def _fetch_record(ctx: _Context, domain: str) -> _Record | None:
    try:
        records = await rdns.txt(ctx.resolver, domain)
    except rdns.DnsTempError as exc:
        raise TempError(str(exc)) from exc
    spf = [r for r in records if r.lower() == "v=spf1" or r.lower().startswith("v=spf1 ")]
    if not spf:
        return None
    if len(spf) > 1:
        raise PermError(f"{domain} publishes more than one SPF record")
    return parse_record(spf[0])


def _in_network(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, address: str, bits: int) -> bool:
    network = ipaddress.ip_network(f"{address}/{bits}", strict=False)
    return ip.version == network.version and ip in network


async def _addresses(ctx: _Context, name: str) -> list[str]:
    family = rdns.a if ctx.ip.version == 4 else rdns.aaaa
    try:
        return await family(ctx.resolver, name)
    except rdns.DnsTempError as exc:
        raise TempError(str(exc)) from exc


def _matches_any(ctx: _Context, addresses: list[str], term: _Term) -> bool:
    if ctx.ip.version == 4:
        bits = 32 if term.cidr4 is None else term.cidr4
    else:
        bits = 128 if term.cidr6 is None else term.cidr6
    return any(_in_network(ctx.ip, address, bits) for address in addresses)


async def _ptr_names(ctx: _Context) -> list[str]:
    """Validated host names of the client (§5.5); DNS errors just mean no names."""
    try:
        names = (await rdns.ptr(ctx.resolver, str(ctx.ip)))[:_NAMES_LIMIT]
    except rdns.DnsTempError:
        return []
    validated = []
    for name in names:
        try:
            if str(ctx.ip) in [str(ipaddress.ip_address(a)) for a in await _addresses(ctx, name)]:
                validated.append(name)
        except TempError:
            continue
    return validated


async def _matches(ctx: _Context, term: _Term, domain: str) -> bool:
    name = term.name
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        bits = term.cidr4 if name == "ip4" else term.cidr6
        assert term.spec is not None and bits is not None
        return _in_network(ctx.ip, term.spec, bits)
    # Every other mechanism costs DNS lookups.
    ctx.count_lookup()
    target = expand(ctx, term.spec, domain) if term.spec else domain
    if name == "include":
        outcome = await _check(ctx, target)
        if outcome == "pass":
            return True
        if outcome in ("fail", "softfail", "neutral"):
            return False
        if outcome == "temperror":
            raise TempError(f"include:{target}")
        raise PermError(f"include:{target} gave {outcome}")
    if name == "a":
        found = await _addresses(ctx, target)
        ctx.count_void(not found)
        return _matches_any(ctx, found, term)
    if name == "mx":
        try:
            exchanges = await rdns.mx(ctx.resolver, target)
        except rdns.DnsTempError as exc:
            raise TempError(str(exc)) from exc
        ctx.count_void(not exchanges)
        hosts = [host for _, host in exchanges if host != "."]
        if len(hosts) > _NAMES_LIMIT:
            raise PermError(f"mx:{target} has more than 10 MX names")
        for host in hosts:
            if _matches_any(ctx, await _addresses(ctx, host), term):
                return True
        return False
    if name == "exists":
        try:
            found = await rdns.a(ctx.resolver, target)  # always A, whatever the client's family
        except rdns.DnsTempError as exc:
            raise TempError(str(exc)) from exc
        ctx.count_void(not found)
        return bool(found)
    if name == "ptr":
        target = target.lower().rstrip(".")
        return any(n == target or n.endswith("." + target) for n in await _ptr_names(ctx))
    raise AssertionError(name)


async def _check(ctx: _Context, domain: str) -> SpfResult:
    """check_host() of §4 for ``domain``; errors raise, results return."""
    if not _valid_domain(domain):
        return "none"
    record = await _fetch_record(ctx, domain)
    if record is None:
        return "none"
    for term in record.terms:
        if await _matches(ctx, term, domain):
            ctx.matched = f"{domain}: {term.text()}"
            return term.qualifier
    if record.redirect is not None:
        ctx.count_lookup()
        target = expand(ctx, record.redirect, domain)
        result = await _check(ctx, target)
        if result == "none":
            raise PermError(f"redirect={target} has no SPF record")
        return result
    ctx.matched = f"{domain}: no term matched"
    return "neutral"


async def check_host(
    resolver: dns.asyncresolver.Resolver, ip: str, domain: str, sender: str, helo: str = "",
) -> SpfOutcome:
    """The SPF result of ``ip`` sending as ``sender`` (``local@domain``) for ``domain``."""
    domain = domain.strip().rstrip(".").lower()
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return SpfOutcome("none", domain, reason="no client IP address")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # §5: an IPv4-mapped client is an IPv4 client
    ctx = _Context(resolver, address, sender, helo)
    try:
        result = await _check(ctx, domain)
    except TempError as exc:
        return SpfOutcome("temperror", domain, reason=str(exc))
    except PermError as exc:
        return SpfOutcome("permerror", domain, reason=str(exc))
    return SpfOutcome(result, domain, reason=ctx.matched)


class OutcomeCache:
    """SPF outcomes by (client IP, HELO, MAIL FROM), kept ``ttl`` seconds: a sender's every
    message would otherwise evaluate the same record again (the DNS answers are cached, the
    evaluation and the resolver's machinery are not).  A temporary error is never kept; a record
    changed in DNS is seen at most ``ttl`` seconds later than the DNS cache alone would show it."""

    def __init__(self, ttl: float = 10.0, size: int = 20_000) -> None:
        self.ttl = ttl
        self.size = size
        self._kept: dict[tuple[str, str, str], tuple[float, SpfOutcome]] = {}

    async def check(self, resolver: dns.asyncresolver.Resolver, ip: str, helo: str, mail_from: str) -> SpfOutcome:
        key = (ip, helo.lower(), mail_from)
        now = time.monotonic()
        kept = self._kept.get(key)
        if kept is not None and kept[0] > now:
            return kept[1]
        outcome = await check_mail_from(resolver, ip, helo, mail_from)
        if outcome.result != "temperror":
            if len(self._kept) >= self.size:
                self._kept.clear()
            self._kept[key] = (now + self.ttl, outcome)
        return outcome


async def check_mail_from(resolver: dns.asyncresolver.Resolver, ip: str, helo: str, mail_from: str) -> SpfOutcome:
    """SPF for the MAIL FROM identity; a null sender is checked as ``postmaster@<helo>`` (§2.4)."""
    helo = helo.strip().rstrip(".").lower()
    mail_from = mail_from.strip().strip("<>")
    if not mail_from:
        outcome = await check_host(resolver, ip, helo, f"postmaster@{helo}", helo)
        return SpfOutcome(outcome.result, outcome.domain, "helo", outcome.reason)
    local, at, domain = mail_from.rpartition("@")
    if not at:
        domain, local = mail_from, ""
    sender = f"{local or 'postmaster'}@{domain}"
    return await check_host(resolver, ip, domain, sender, helo)
