"""History kept for ``[storage] history_days``: what ``trace`` and ``stats`` read, then deleted.

Every accepted message leaves a queue row (its header block once delivered), its recipients, a
log row per decision and an event per delivery attempt.  Kept forever they grow the database
by gigabytes a day at a busy marketplace's volume, and every index with it.  The serving relay
deletes what is older than the window when it starts and every ``SWEEP_INTERVAL`` seconds:
finished queue items (their recipients go with them), log rows and delivery events, a batch at
a time in the group commit (the process's one writer), so that no sweep holds the database for
long.  Items still queued or on hold are never touched, however old; nor are the marketplace's
own tables (sellers, buyers, orders, reply threads).

The same sweep removes this host's spool files that no queue row names once an hour old (a crash
between a file's fsync and its row's commit leaves one; docs/decisions/0011).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Table, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from . import log, spool
from .db import single_host
from .models import MessageEvent, MessageLog, QueueItem
from .queue import undelivered

SWEEP_INTERVAL = 600.0
BATCH = 2000
ORPHAN_AGE = 3600.0        # a spool file no row names is removed once this old
_DAY = 86400.0

_QUEUE = cast(Table, QueueItem.__table__)
_LOG = cast(Table, MessageLog.__table__)
_EVENTS = cast(Table, MessageEvent.__table__)


def _batches(cut: float) -> dict[str, Any]:
    """One DELETE per kind of history row, each of at most ``BATCH`` rows older than ``cut``."""
    q, lg, ev = _QUEUE.c, _LOG.c, _EVENTS.c
    done = select(q.id).where(q.status == "done", q.next_attempt_at < cut).limit(BATCH)
    return {
        "queue_items": delete(_QUEUE).where(q.id.in_(done.scalar_subquery())),
        "log_rows": delete(_LOG).where(lg.id.in_(select(lg.id).where(lg.at < cut).limit(BATCH).scalar_subquery())),
        "events": delete(_EVENTS).where(ev.id.in_(select(ev.id).where(ev.at < cut).limit(BATCH).scalar_subquery())),
    }


async def sweep(relay: Any, now: float | None = None, stopping: asyncio.Event | None = None) -> dict[str, int]:
    """Delete the history older than ``[storage] history_days``; returns the rows deleted by kind.
    ``stopping``: checked between two batches (a first sweep of a long history stops with serve)."""
    days = relay.settings.storage.history_days
    deleted = {"queue_items": 0, "log_rows": 0, "events": 0}
    if days <= 0:
        return deleted
    statements = _batches((time.time() if now is None else now) - days * _DAY)
    for kind, stmt in statements.items():
        while True:
            async def unit(s: AsyncSession, stmt: Any = stmt) -> int:
                return cast(CursorResult[Any], await s.execute(stmt)).rowcount or 0
            count = await relay.enqueuer.run(unit)
            deleted[kind] += count
            if count < BATCH or (stopping is not None and stopping.is_set()):
                break
            await asyncio.sleep(0)      # the sessions' own writes go between two batches
    return deleted


async def sweep_spool(relay: Any, now: float | None = None) -> int:
    """Remove this host's spool files that no undelivered queue row names and that are older than
    ``ORPHAN_AGE``: a crash between a file's fsync and its row's commit leaves one (the sender got
    no 250 and sends again), as does a row deleted behind the relay's back, or a spool segment
    whose writer stopped before its messages were all delivered (``relay/segments.py``).  An
    acceptance in progress holds its file for seconds, never an hour, and a segment is written
    to for seconds.  Returns the files removed."""
    state = Path(relay.settings.state_dir)
    old = await asyncio.to_thread(spool.old_files, state, ORPHAN_AGE, time.time() if now is None else now,
                                  single_host(relay.sessions))
    if not old:
        return 0
    named = await undelivered(relay.sessions, _QUEUE.c.spool_path, old)
    orphans = [relative for relative in old if relative not in named]
    for relative in orphans:
        await asyncio.to_thread(spool.remove_file, state, relative)
    return len(orphans)


async def sweeper(relay: Any, stopping: asyncio.Event, interval: float = SWEEP_INTERVAL) -> None:
    """``serve``'s background task: a sweep at start, then one every ``interval`` seconds, until
    ``stopping`` is set (between two sweeps or batches, never inside a transaction)."""
    logger = log.get()
    while not stopping.is_set():
        try:
            deleted = await sweep(relay, stopping=stopping)
            deleted["spool_files"] = await sweep_spool(relay)
        except Exception as exc:   # database trouble: tried again at the next interval
            logger.error("store.error", stage="history", error_type=type(exc).__name__,
                         error=log.error_line(exc))
        else:
            if any(deleted.values()):
                logger.info("history.purged", days=relay.settings.storage.history_days, **deleted)
        try:
            await asyncio.wait_for(stopping.wait(), interval)
        except TimeoutError:
            pass
