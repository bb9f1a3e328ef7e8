"""The serving relay's memory of marketplace facts, never staler than the database.

Every message needs the same few facts (the pair behind an alias, the sender's approval, the
seller's addresses and the pair's orders) and they change rarely; reading them from the
database for every message was most of the relay's CPU time.  This cache keeps what was read
and trusts it only while ``facts_generation`` (a counter that database triggers bump on any
change, migration 0004) is unchanged:

* :meth:`FactsCache.refresh` reads the counter once per message, at RCPT: on SQLite right
  there on the event loop (``Reads.at_once``, a point read that never waits), else in a read
  that concurrent sessions share.  A session never uses a read that *started before it
  arrived*: a change committed before a message's RCPT is always seen by that message.
* :meth:`FactsCache.get` returns a cached fact or loads it; a value loaded while the counter
  moved is returned but not kept, so a load that raced a change cannot outlive it.

Before the first refresh (a command that never sees RCPT) nothing is kept: every get loads.
The whole cache is also dropped every ``max_age`` seconds and when it grows past
``max_entries``, bounds that only matter if the triggers were removed by hand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.dialects import sqlite

from .db import Reads
from .models import FactsGeneration

T = TypeVar("T")

_GENERATION = select(FactsGeneration.__table__.c.value).where(FactsGeneration.__table__.c.id == 1)
# The same read as SQLite text, for ``Reads.at_once`` (on the event loop, no thread hand-off).
_GENERATION_SQL = str(_GENERATION.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))


class FactsCache:
    def __init__(self, reads: Reads, max_age: float = 300.0, max_entries: int = 200_000) -> None:
        self.reads = reads
        self._max_age = max_age
        self._max_entries = max_entries
        self._entries: dict[Hashable, Any] = {}
        self.generation: int | None = None     # as of the last completed read; None before any
        self._epoch = 0                        # changes whenever the entries are dropped
        self._born = 0.0
        self._checked = float("-inf")          # when the last completed read started
        self._task: asyncio.Future[None] | None = None
        self.hits = self.misses = 0

    async def refresh(self) -> None:
        """Make sure every kept fact is as fresh as the database was when this call began."""
        arrived = time.monotonic()
        if self._checked < arrived:
            rows = self.reads.at_once(_GENERATION_SQL)      # SQLite: read here, begun and done now
            if rows is not None:
                self._seen(rows[0][0], arrived)
                return
        while self._checked < arrived:
            if self._task is None:
                self._task = asyncio.ensure_future(self._read())
            await asyncio.shield(self._task)

    async def _read(self) -> None:
        started = time.monotonic()
        try:
            value = (await self.reads.all(_GENERATION))[0][0]
        finally:
            self._task = None
        self._seen(value, started)

    def _seen(self, value: int, started: float) -> None:
        """The counter read ``value`` in a read that began at ``started``."""
        if (value != self.generation or started - self._born > self._max_age
                or len(self._entries) > self._max_entries):
            self._drop(value, started)
        self._checked = max(self._checked, started)

    def _drop(self, generation: int | None, now: float) -> None:
        self._entries = {}
        self._epoch += 1
        self.generation = generation
        self._born = now

    async def get(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        if key in self._entries:
            self.hits += 1
            return self._entries[key]  # type: ignore[no-any-return]
        self.misses += 1
        epoch, generation = self._epoch, self.generation
        value = await load()
        if generation is not None and self._epoch == epoch:
            self._entries[key] = value
        return value

    def forget(self, key: Hashable) -> None:
        """Drop one fact this process just changed itself (the trigger tells the others)."""
        self._entries.pop(key, None)


__all__ = ["FactsCache"]
