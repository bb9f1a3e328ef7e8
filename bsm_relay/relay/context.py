"""What every stage of a running relay shares: settings, store, codec, queue, resolver."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import dns.asyncresolver
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from ..aliases.codec import AliasCodec, Direction
from ..aliases.keys import KeyRing
from ..config.settings import Settings
from .log import Redactor
from .queue import Accepted, Enqueuer
from .spf import OutcomeCache
from .store import Store
from .verp import BounceAddressCodec


@dataclass
class Relay:
    settings: Settings
    keys: KeyRing
    codec: AliasCodec
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    store: Store
    enqueuer: Enqueuer
    redactor: Redactor
    bounces: BounceAddressCodec
    # One async resolver for every lookup (SPF, DKIM keys), on [dns] nameservers and timeout.
    resolver: dns.asyncresolver.Resolver
    # The serving process's delivery, handed each accepted message to send at once from memory
    # (``Deliverer.hand_off``); None where nothing delivers (commands, tests of intake alone).
    hand_off: Callable[[Accepted, bool], None] | None = None
    # Messages inside ``intake.process`` right now: a message alone there finds the process idle.
    in_intake: int = 0

    def bounce_address(self, queue_id: str) -> str:
        """The signed envelope sender a forwarded message leaves with (VERP style)."""
        return self.bounces.encode(queue_id)

    def alias(self, direction: Direction, seller_id: int, buyer_id: int) -> str:
        return f"{self.codec.encode(direction, seller_id, buyer_id)}@{self.settings.aliases.domain}"

    @cached_property
    def spf_outcomes(self) -> OutcomeCache:
        """SPF outcomes of the last seconds: a sender's next messages are not evaluated again."""
        return OutcomeCache()

    @cached_property
    def loop_marker(self) -> str:
        """The value of our loop header (intake.LOOP_HEADER): a keyed digest of our host name."""
        key = self.keys.derive("loop-marker")
        return hmac.new(key, self.settings.smtp.hostname.lower().encode(), hashlib.sha256).hexdigest()[:32]

    @property
    def local_domains(self) -> frozenset[str]:
        return frozenset({self.settings.smtp.hostname.lower()})
