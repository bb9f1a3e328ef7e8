"""Queue backpressure: past ``[queue] max_depth`` waiting items, MAIL FROM is refused for a while.

Like Postfix's bounded active queue: when delivery falls behind (the downstream is down or
slower than the senders), acceptance slows down (``452 4.3.1``, the sender's MTA retries
later) instead of the queue, the database and the disk growing without bound.

The depth is the number of queue items not done (queued or on hold) in the database, so every
node of a shared PostgreSQL sees the same figure.  It is counted in the background at most once
every ``REFRESH`` seconds; the hot path reads a number.  Between two counts, every MAIL this
process lets through counts as one more item until a count started ``HOLD`` seconds after it
(by then its row is committed and counted, or the transaction never completed), so a burst on
one connection or many cannot run past the limit before the next count; a burst on another node
can, by what that node accepts in about a second.  The limit is therefore approximate, and
errs on the side of refusing a little early.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from . import log
from .models import QueueItem

REFRESH = 1.0   # seconds between two counts, at most
HOLD = 2.0      # seconds an admitted MAIL counts locally beyond the count that may include it

WAITING = ("queued", "hold")


class QueueDepth:
    """The cached depth of the queue and the admission decision made from it (one per process)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sessions = sessions
        self._clock = clock
        self._count: int | None = None          # None: never counted (or every count failed)
        self._counted_at = -math.inf            # when the count behind _count started
        self._next_count_at = -math.inf
        self._refresh: asyncio.Task[None] | None = None
        self._admitted: deque[float] = deque()  # MAILs let through since (about) that count
        self._full = False
        self._log = log.get()

    @property
    def depth(self) -> int:
        return (self._count or 0) + len(self._admitted)

    async def admit(self, limit: int) -> bool:
        """Whether one more transaction may start; counts it when it may. ``limit`` 0: always."""
        if limit <= 0:
            return True
        now = self._clock()
        if self._refresh is None and now >= self._next_count_at:
            self._next_count_at = now + REFRESH
            self._refresh = asyncio.create_task(self._recount(now), name="queue-depth")
        if self._count is None and self._refresh is not None:
            # The first MAIL of a process waits for the first count (shielded: a session that
            # goes away must not cancel the count every other session shares).
            await asyncio.shield(self._refresh)
        while self._admitted and self._admitted[0] < self._counted_at - HOLD:
            self._admitted.popleft()
        depth = self.depth
        full = depth >= limit
        if full != self._full:
            self._full = full
            (self._log.warning if full else self._log.info)(
                "queue.backpressure", state="on" if full else "off", depth=depth, max_depth=limit)
        if not full:
            self._admitted.append(now)
        return not full

    async def settle(self) -> None:
        """Wait for a count in progress, if any (shutdown, tests)."""
        if self._refresh is not None:
            await asyncio.shield(self._refresh)

    async def _recount(self, started: float) -> None:
        try:
            async with self._sessions() as s:
                count = (await s.execute(select(func.count()).select_from(QueueItem)
                                         .where(QueueItem.status.in_(WAITING)))).scalar_one()
        except (SQLAlchemyError, OSError) as exc:
            # Open, not shut: a database that cannot count cannot commit either, and the
            # transaction then ends in 451 4.3.0 at DATA. Tried again after REFRESH.
            self._log.error("store.error", stage="queue_depth", error_type=type(exc).__name__)
        else:
            self._count = int(count)
            self._counted_at = started
        finally:
            self._refresh = None
