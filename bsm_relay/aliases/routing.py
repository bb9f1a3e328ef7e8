"""Which kind of recipient is this?  The RCPT-time routing decision, pure.

Only the exact form ``token@alias-domain`` (case-insensitive, trailing dot
tolerated) reaches the alias codec.  Everything else -- percent hack, bang path,
quoted local part, source route, ``a@b@domain``, foreign domains -- is refused
before anything is looked up, so the relay is never an open relay and never an
oracle that tells a valid token from an invalid one by its answer.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# RFC 5321 local part restricted to what tokens and bounce addresses use.
_PLAIN = re.compile(r"([a-z0-9][a-z0-9._+-]{0,63})@([a-z0-9](?:[a-z0-9.-]{0,253}[a-z0-9])?)\.?", re.ASCII)


class Kind(enum.Enum):
    ALIAS = "alias"
    POSTMASTER = "postmaster"
    BOUNCE = "bounce"
    FOREIGN = "foreign"      # not ours: relaying denied
    INVALID = "invalid"      # ours, but not a plain token: generic "no such alias"


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    local: str = ""
    address: str = ""        # normalised: lower case, no trailing dot


BOUNCE_PREFIX = "b-"


def route(address: str, alias_domain: str, local_domains: frozenset[str] = frozenset()) -> Route:
    text = address.strip().lower()
    ours = {alias_domain.lower()} | {d.lower() for d in local_domains}
    if text == "postmaster":
        return Route(Kind.POSTMASTER, "postmaster", "postmaster")
    m = _PLAIN.fullmatch(text)
    if m is None:
        domain = text.rpartition("@")[2].rstrip(".")
        return Route(Kind.INVALID if domain in ours else Kind.FOREIGN, address=text)
    local, domain = m.group(1), m.group(2)
    if domain not in ours:
        return Route(Kind.FOREIGN, local, f"{local}@{domain}")
    normalised = f"{local}@{domain}"
    if local == "postmaster":
        return Route(Kind.POSTMASTER, local, normalised)
    if domain != alias_domain.lower():
        return Route(Kind.INVALID, local, normalised)
    if local.startswith(BOUNCE_PREFIX):
        return Route(Kind.BOUNCE, local, normalised)
    if not local.isalnum():
        return Route(Kind.INVALID, local, normalised)
    return Route(Kind.ALIAS, local, normalised)
