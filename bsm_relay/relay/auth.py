"""Is this mail really from the domain in its From header?  SPF, DKIM and DMARC-style alignment.

The relay asks :func:`check_sender` once per message, after DATA, and gets an
:class:`AuthResult`: the SPF result for the envelope sender, the DKIM result of each
signature, and the two facts policy acts on —

- ``aligned``: SPF passed for an envelope domain, or a DKIM signature verified for
  a ``d=``, with the same organizational domain as the From domain (DMARC relaxed
  alignment, RFC 7489 §3.1, the Public Suffix List from ``publicsuffixlist``);
- ``temperror``: nothing passed aligned, and a lookup that could have made it pass
  hit SERVFAIL or a timeout.  That must end in a 451, never in a 5xx or a 250.

SPF is :mod:`bsm_relay.relay.spf` on the asyncio resolver.  DKIM is dkimpy, which
is synchronous and calls its DNS function synchronously: so the ``s=``/``d=`` of
each signature are read here, their key records fetched asynchronously first, and
dkimpy then runs in a worker thread answering from what was fetched.  Nothing here
blocks the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import dkim  # type: ignore[import-untyped]
import dkim.util  # type: ignore[import-untyped]
import dns.asyncresolver
from publicsuffixlist import PublicSuffixList

from . import dns as rdns
from .spf import OutcomeCache, SpfOutcome, SpfResult, check_mail_from

__all__ = ["AuthResult", "DkimResult", "check_sender", "org_domain"]

DkimResult = Literal["pass", "fail", "neutral", "temperror", "permerror"]

# Signatures looked at per message: enough for a forwarder's plus the author's,
# few enough that a message stuffed with signatures costs little.
MAX_SIGNATURES = 5
_TOKEN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")


@functools.lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    # Loading the list takes a few tens of ms: once per process, on first use.
    return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """The organizational domain (registrable domain) of ``domain``, lower case.

    A public suffix itself (``com``, ``co.uk``) or something the list cannot place is
    its own organizational domain.  Kept for the last 4,096 domains: the list's walk, with
    its IDNA encoding of each label, costs about 6 µs, and a message asks two or three times.
    """
    domain = domain.strip().rstrip(".").lower()
    if not domain:
        return ""
    return _psl().privatesuffix(domain) or domain


def _aligned(domain: str, from_domain: str) -> bool:
    return bool(domain and from_domain) and org_domain(domain) == org_domain(from_domain)


@dataclass(frozen=True, slots=True)
class AuthResult:
    spf: SpfResult
    spf_domain: str
    dkim: tuple[tuple[str, DkimResult], ...]
    from_domain: str
    aligned: bool
    temperror: bool
    spf_scope: Literal["mailfrom", "helo"] = "mailfrom"

    @property
    def dmarc(self) -> Literal["pass", "fail", "temperror"]:
        if self.aligned:
            return "pass"
        return "temperror" if self.temperror else "fail"

    @property
    def reason(self) -> str | None:
        """The reason code (``policy.reasons``) for refusing the message, or None to pass it."""
        if self.aligned:
            return None
        return "auth.temperror" if self.temperror else "auth.failed"

    def authentication_results(self, authserv_id: str) -> str:
        """An RFC 8601 ``Authentication-Results`` value; it names domains only, never a mailbox."""
        spf = f"spf={self.spf}"
        if _TOKEN.match(self.spf_domain):
            spf += f" smtp.{self.spf_scope}={self.spf_domain}"
        parts = [authserv_id, spf]
        for domain, result in self.dkim or (("", "none"),):
            parts.append(f"dkim={result}" + (f" header.d={domain}" if _TOKEN.match(domain) else ""))
        dmarc = f"dmarc={self.dmarc}"
        if _TOKEN.match(self.from_domain):
            dmarc += f" header.from={self.from_domain}"
        parts.append(dmarc)
        return "; ".join(parts)


# -- DKIM ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Signature:
    index: int
    domain: str
    key_name: str  # "<selector>._domainkey.<domain>", lower case, no final dot; "" if unparsable


def _header_block(message: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = message.find(sep)
        if end >= 0:
            return message[: end + len(sep)]
    return message + b"\r\n\r\n"


def _signatures(message: bytes) -> list[_Signature]:
    """The DKIM-Signature headers, in order (only the header block is parsed, on the loop)."""
    block = _header_block(message)
    if b"dkim-signature" not in block.lower():      # most mail to the relay is unsigned: no parse
        return []
    try:
        headers, _ = dkim.rfc822_parse(block)
    except dkim.DKIMException:
        return []
    found: list[_Signature] = []
    values = [value for name, value in headers if name.lower() == b"dkim-signature"]
    for index, value in enumerate(values[:MAX_SIGNATURES]):
        try:
            tags = dkim.util.parse_tag_value(value)
            domain = tags[b"d"].decode("ascii").strip().lower().rstrip(".")
            selector = tags[b"s"].decode("ascii").strip().lower()
        except (dkim.util.InvalidTagValueList, KeyError, UnicodeDecodeError):
            found.append(_Signature(index, "", ""))
            continue
        found.append(_Signature(index, domain, f"{selector}._domainkey.{domain}"))
    return found


async def _fetch_keys(
    resolver: dns.asyncresolver.Resolver, names: set[str], time_limit: float,
) -> dict[str, bytes | None | rdns.DnsTempError]:
    """Key record per name: its text, None when there is none, or the DNS trouble met."""

    async def one(name: str) -> bytes | None | rdns.DnsTempError:
        try:
            records = await asyncio.wait_for(rdns.txt_bytes(resolver, name), time_limit)
        except rdns.DnsTempError as exc:
            return exc
        except TimeoutError:
            return rdns.DnsTempError(name, "TXT", "time limit")
        return records[0] if records else None

    ordered = sorted(names)
    return dict(zip(ordered, await asyncio.gather(*(one(n) for n in ordered)), strict=True))


def _verify_all(message: bytes, signatures: list[_Signature], keys: Mapping[str, bytes | None]) -> list[DkimResult]:
    """dkimpy over every signature; runs in a worker thread, DNS answered from ``keys``."""

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        return keys.get(text.lower().rstrip("."))

    verifier = dkim.DKIM(message)
    results: list[DkimResult] = []
    for signature in signatures:
        try:
            results.append("pass" if verifier.verify(idx=signature.index, dnsfunc=dnsfunc) else "fail")
        except dkim.ValidationError:
            results.append("fail")  # body hash mismatch, expired, bad tags: it does not verify
        except dkim.DKIMException:
            results.append("permerror")  # a key or message dkimpy cannot use
    return results


async def _check_dkim(
    resolver: dns.asyncresolver.Resolver, message: bytes, signatures: list[_Signature], time_limit: float,
) -> list[tuple[str, DkimResult]]:
    if not signatures:
        return []
    fetched = await _fetch_keys(resolver, {s.key_name for s in signatures if s.key_name}, time_limit)
    results: dict[int, DkimResult] = {}
    to_verify: list[_Signature] = []
    for signature in signatures:
        key = fetched.get(signature.key_name)
        if not signature.key_name:
            results[signature.index] = "permerror"
        elif isinstance(key, rdns.DnsTempError):
            results[signature.index] = "temperror"
        elif key is None:
            results[signature.index] = "permerror"  # no key published (RFC 6376 §6.1.2)
        else:
            to_verify.append(signature)
    if to_verify:
        keys = {name: key for name, key in fetched.items() if isinstance(key, bytes)}
        verified = await asyncio.to_thread(_verify_all, message, to_verify, keys)
        results.update(zip((s.index for s in to_verify), verified, strict=True))
    return [(s.domain, results[s.index]) for s in signatures]


# -- the check ------------------------------------------------------------------------


def _envelope_domain(mail_from: str, helo: str) -> tuple[str, Literal["mailfrom", "helo"]]:
    address = mail_from.strip().strip("<>")
    if not address:
        return helo.strip().rstrip(".").lower(), "helo"
    return address.rpartition("@")[2].rstrip(".").lower(), "mailfrom"


async def check_sender(
    *,
    resolver: dns.asyncresolver.Resolver,
    client_ip: str,
    helo: str,
    mail_from: str,
    from_domain: str,
    message: bytes,
    time_limit: float = 20.0,
    spf_outcomes: OutcomeCache | None = None,
) -> AuthResult:
    """SPF for the envelope sender and DKIM for the message, aligned against ``from_domain``.

    SPF and the DKIM key lookups run concurrently; each is bounded by ``time_limit``
    seconds overall (and every single lookup by the resolver's own timeout), and
    running out of time counts as DNS trouble.  ``spf_outcomes``: the serving relay's
    short-lived SPF outcomes (:class:`spf.OutcomeCache`).
    """
    from_domain = from_domain.strip().rstrip(".").lower()
    spf_domain, scope = _envelope_domain(mail_from, helo)

    async def spf() -> SpfOutcome:
        try:
            async with asyncio.timeout(time_limit):       # no task of its own, unlike wait_for
                if spf_outcomes is not None:
                    return await spf_outcomes.check(resolver, client_ip, helo, mail_from)
                return await check_mail_from(resolver, client_ip, helo, mail_from)
        except TimeoutError:
            return SpfOutcome("temperror", spf_domain, scope, "time limit")

    signatures = _signatures(message)
    if signatures:
        spf_outcome, dkim_results = await asyncio.gather(spf(), _check_dkim(resolver, message, signatures,
                                                                             time_limit))
    else:   # nothing to verify: SPF alone, without the tasks gather() would make for the two
        spf_outcome, dkim_results = await spf(), []
    spf_aligned = _aligned(spf_outcome.domain, from_domain)
    aligned = (spf_outcome.result == "pass" and spf_aligned) or any(
        result == "pass" and _aligned(domain, from_domain) for domain, result in dkim_results)
    # Only trouble on a path that could have made the message pass keeps it undecided.
    temperror = not aligned and (
        (spf_outcome.result == "temperror" and spf_aligned)
        or any(result == "temperror" and _aligned(domain, from_domain) for domain, result in dkim_results))
    return AuthResult(
        spf=spf_outcome.result,
        spf_domain=spf_outcome.domain,
        dkim=tuple(dkim_results),
        from_domain=from_domain,
        aligned=aligned,
        temperror=temperror,
        spf_scope=spf_outcome.scope,
    )
