"""The durable queue: the one owner of what "accepted" means.

* ``Enqueuer`` commits accepted messages in groups: every session that finished
  DATA hands its rows over and waits; one transaction commits the whole group
  (one fsync for many messages) and only then is each session told to answer 250.
  A failed commit fails every message of the group, and each session answers 451.
* ``claim`` takes due items atomically with a lease: a single UPDATE ... RETURNING
  (with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so two workers or two processes
  never attempt the same item at the same time, and a dead worker's lease expires.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .models import MessageEvent, QueueItem, QueueRecipient


def new_queue_id() -> str:
    return "q" + secrets.token_hex(6)


@dataclass
class Accepted:
    """Everything one accepted message writes, committed together or not at all."""

    items: list[QueueItem]
    recipients: list[QueueRecipient]
    extra: list[Any] = field(default_factory=list)     # ThreadId, MessageLog rows


@dataclass(frozen=True)
class Claimed:
    id: str
    kind: str
    envelope_from: str
    origin_sender: str | None
    body: bytes
    attempts: int
    created_at: float
    recipients: tuple[tuple[int, str, str], ...]          # (row id, real address, alias)
    delay_notified: bool = False
    session_id: str | None = None                         # the SMTP session that brought it (for the log)


class Enqueuer:
    """Group commit of accepted messages."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], max_batch: int = 64) -> None:
        self._sessions = sessions
        self._max_batch = max_batch
        self._pending: asyncio.Queue[tuple[Accepted, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.wakeup = asyncio.Event()        # set after each commit: delivery has work

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="enqueuer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def commit(self, accepted: Accepted) -> None:
        """Returns once the rows are durably committed; raises if they are not."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._pending.put((accepted, fut))
        # Shielded: a session that is cancelled meanwhile must not cancel the commit
        # that other sessions' messages share (all-or-nothing per group).
        await asyncio.shield(fut)

    async def _run(self) -> None:
        while True:
            batch = [await self._pending.get()]
            while len(batch) < self._max_batch and not self._pending.empty():
                batch.append(self._pending.get_nowait())
            try:
                async with self._sessions.begin() as s:
                    for accepted, _ in batch:
                        s.add_all(accepted.items)
                        await s.flush()
                        s.add_all(accepted.recipients)
                        s.add_all(accepted.extra)
            except Exception as exc:  # the database refused: every message of the group fails
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(StorageError(str(exc)))
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            self.wakeup.set()


class StorageError(RuntimeError):
    """The queue could not commit; the SMTP answer is 451 4.3.0."""


async def claim(sessions: async_sessionmaker[AsyncSession], owner: str, limit: int,
                lease: float, now: float | None = None) -> list[Claimed]:
    now = time.time() if now is None else now
    async with sessions.begin() as s:
        due = (select(QueueItem.id)
               .where(QueueItem.status == "queued", QueueItem.next_attempt_at <= now,
                      or_(QueueItem.lease_until.is_(None), QueueItem.lease_until < now))
               .order_by(QueueItem.next_attempt_at).limit(limit))
        if s.bind.dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        ids = list((await s.execute(
            update(QueueItem).where(QueueItem.id.in_(due.scalar_subquery()))
            .values(lease_owner=owner, lease_until=now + lease)
            .returning(QueueItem.id))).scalars())
        if not ids:
            return []
        items = (await s.execute(select(QueueItem).where(QueueItem.id.in_(ids)))).scalars().all()
        rcpts = (await s.execute(select(QueueRecipient).where(
            QueueRecipient.queue_id.in_(ids), QueueRecipient.status == "pending"))).scalars().all()
    by_item: dict[str, list[tuple[int, str, str]]] = {}
    for r in rcpts:
        by_item.setdefault(r.queue_id, []).append((r.id, r.address, r.alias))
    return [Claimed(i.id, i.kind, i.envelope_from, i.origin_sender, i.body, i.attempts, i.created_at,
                    tuple(by_item.get(i.id, ())), i.delay_notified, i.session_id) for i in items]


async def record_attempt(sessions: async_sessionmaker[AsyncSession], item: Claimed, owner: str,
                         delivered: Sequence[int], failed: dict[int, str], deferred: dict[int, str],
                         retry_at: float, notices: Sequence[tuple[QueueItem, QueueRecipient]] = (),
                         delay_notified: bool = False) -> str:
    """Store the outcome of one delivery attempt, per recipient, with any notices it caused,
    in one transaction. Returns the item's new status (queued while anything is deferred)."""
    async with sessions.begin() as s:
        if delivered:
            await s.execute(update(QueueRecipient).where(QueueRecipient.id.in_(delivered))
                            .values(status="delivered", last_error=None))
        for rid, error in failed.items():
            await s.execute(update(QueueRecipient).where(QueueRecipient.id == rid)
                            .values(status="failed", last_error=error))
        for rid, error in deferred.items():
            await s.execute(update(QueueRecipient).where(QueueRecipient.id == rid)
                            .values(last_error=error))
        status = "queued" if deferred else "done"
        last_error = next(iter(deferred.values()), None) or next(iter(failed.values()), None)
        values: dict[str, Any] = dict(status=status, attempts=QueueItem.attempts + 1, next_attempt_at=retry_at,
                                      lease_owner=None, lease_until=None, last_error=last_error)
        if delay_notified:
            values["delay_notified"] = True
        if status == "done":
            # Keep only the header block: enough for trace and for a late bounce's DSN.
            values["body"] = item.body[:_header_end(item.body)]
        await s.execute(update(QueueItem).where(QueueItem.id == item.id, QueueItem.lease_owner == owner)
                        .values(**values))
        for notice, rcpt in notices:
            s.add(notice)
            await s.flush()
            s.add(rcpt)
        # trace's history, in the same transaction (no extra commit on the delivery path).
        s.add(_attempt_event(item, delivered, failed, deferred, status, retry_at))
        s.add_all(MessageEvent(queue_id=item.id, at=time.time(), event="dsn.queued", detail=_json(
            notice=notice.id, action="delayed" if b"Action: delayed" in notice.body else "failed"))
            for notice, _ in notices)
    return status


_ADDRESS = re.compile(r"[^\s<>\"'(),;:@]+@[A-Za-z0-9.-]+\.?", re.ASCII)


def _json(**fields: Any) -> str:
    return json.dumps(fields, separators=(",", ":"), sort_keys=True)


def _scrubber(item: Claimed) -> tuple[dict[int, str], Callable[[str], str]]:
    """Each recipient's name in the history (its alias; a notice's recipient, the original
    sender, is no alias and is named so), and a scrub for reply texts: real recipient
    addresses become their alias, any other address outside the alias domain ``[address]``."""
    shown: dict[int, str] = {}
    swap: dict[str, str] = {}
    keep: set[str] = set()
    for rid, address, alias in item.recipients:
        is_alias = alias.lower() != address.lower()
        shown[rid] = alias if is_alias else "(the sender)"
        swap[address.lower()] = shown[rid]
        if is_alias and "@" in alias:
            keep.add(alias.rpartition("@")[2].lower().rstrip("."))

    def scrub(text: str) -> str:
        def one(m: re.Match[str]) -> str:
            found = m.group(0)
            if found.lower() in swap:
                return swap[found.lower()]
            return found if found.rpartition("@")[2].lower().rstrip(".") in keep else "[address]"
        return _ADDRESS.sub(one, text) if "@" in text else text
    return shown, scrub


def _attempt_event(item: Claimed, delivered: Sequence[int], failed: dict[int, str], deferred: dict[int, str],
                   status: str, retry_at: float) -> MessageEvent:
    shown, scrub = _scrubber(item)
    rcpts = [{"alias": shown.get(rid, "?"), "outcome": "delivered"} for rid in delivered]
    rcpts += [{"alias": shown.get(rid, "?"), "outcome": "failed", "reply": scrub(text)} for rid, text in failed.items()]
    rcpts += [{"alias": shown.get(rid, "?"), "outcome": "deferred", "reply": scrub(text)}
              for rid, text in deferred.items()]
    now = time.time()
    return MessageEvent(queue_id=item.id, at=now, event="delivery.attempt", detail=_json(
        attempt=item.attempts + 1, kind=item.kind, status=status, recipients=rcpts,
        latency=round(now - item.created_at, 3), next_attempt_at=retry_at if status == "queued" else None))


def _header_end(body: bytes) -> int:
    end = body.find(b"\r\n\r\n")
    return len(body) if end < 0 else end + 2


async def record_error(sessions: async_sessionmaker[AsyncSession], item: Claimed, owner: str, error: str,
                       retry_at: float, max_errors: int) -> str:
    """Processing failed (a bug or a broken row, not a delivery failure): count it, hold at the limit."""
    async with sessions.begin() as s:
        errors = (await s.execute(select(QueueItem.errors).where(QueueItem.id == item.id))).scalar_one() + 1
        status = "hold" if errors >= max_errors else "queued"
        await s.execute(update(QueueItem).where(QueueItem.id == item.id, QueueItem.lease_owner == owner)
                        .values(errors=errors, status=status, next_attempt_at=retry_at, lease_owner=None,
                                lease_until=None, last_error=error))
        s.add(MessageEvent(queue_id=item.id, at=time.time(), event="delivery.error",
                           detail=_json(error=_scrubber(item)[1](error), errors=errors, status=status)))
    return status


async def add_notice(sessions: async_sessionmaker[AsyncSession], notice: QueueItem, rcpt: QueueRecipient,
                     fail_recipients_of: str | None = None, error: str | None = None) -> None:
    """Queue a notice; optionally mark every recipient of another item failed (inbound bounce)."""
    async with sessions.begin() as s:
        if fail_recipients_of:
            await s.execute(update(QueueRecipient).where(QueueRecipient.queue_id == fail_recipients_of)
                            .values(status="failed", last_error=error))
            # trace's history: ``error`` is ours ("bounced later: 5.1.1"), it names nobody.
            s.add(MessageEvent(queue_id=fail_recipients_of, at=time.time(), event="bounce.received",
                               detail=_json(error=error, notice=notice.id)))
        s.add(notice)
        await s.flush()
        s.add(rcpt)


async def get_item(sessions: async_sessionmaker[AsyncSession], queue_id: str) -> tuple[QueueItem, list[QueueRecipient]] | None:
    async with sessions() as s:
        item = await s.get(QueueItem, queue_id)
        if item is None:
            return None
        rcpts = list((await s.execute(select(QueueRecipient).where(QueueRecipient.queue_id == queue_id)
                                      .order_by(QueueRecipient.id))).scalars())
        return item, rcpts


async def admin(sessions: async_sessionmaker[AsyncSession], action: str, queue_id: str | None = None,
                now: float | None = None) -> int:
    """Operator actions: retry (due now), hold, release (back to queued, errors reset), delete,
    flush (everything queued is due now). Returns the number of items changed."""
    now = time.time() if now is None else now
    async with sessions.begin() as s:
        one = QueueItem.id == queue_id
        if action == "retry":
            stmt = update(QueueItem).where(one, QueueItem.status == "queued").values(next_attempt_at=now)
        elif action == "flush":
            stmt = update(QueueItem).where(QueueItem.status == "queued").values(next_attempt_at=now)
        elif action == "hold":
            stmt = update(QueueItem).where(one, QueueItem.status == "queued").values(status="hold")
        elif action == "release":
            stmt = update(QueueItem).where(one, QueueItem.status == "hold").values(
                status="queued", errors=0, next_attempt_at=now, lease_owner=None, lease_until=None)
        elif action == "delete":
            await s.execute(delete(QueueRecipient).where(QueueRecipient.queue_id == queue_id))
            stmt = delete(QueueItem).where(one)
        else:
            raise ValueError(action)
        res = await s.execute(stmt)
        return res.rowcount or 0


async def list_items(sessions: async_sessionmaker[AsyncSession], include_done: bool = False) -> list[dict[str, Any]]:
    async with sessions() as s:
        stmt = select(QueueItem.id, QueueItem.kind, QueueItem.status, QueueItem.attempts, QueueItem.errors,
                      QueueItem.next_attempt_at, QueueItem.created_at, QueueItem.last_error, QueueItem.size)
        if not include_done:
            stmt = stmt.where(QueueItem.status != "done")
        rows = (await s.execute(stmt.order_by(QueueItem.created_at))).all()
        rcpts = (await s.execute(select(QueueRecipient.queue_id, QueueRecipient.alias,
                                        QueueRecipient.status))).all()
    by_item: dict[str, list[dict[str, str]]] = {}
    for qid, alias, status in rcpts:
        by_item.setdefault(qid, []).append({"alias": alias, "status": status})
    return [{"id": r.id, "kind": r.kind, "status": r.status, "attempts": r.attempts, "errors": r.errors,
             "next_attempt_at": r.next_attempt_at, "created_at": r.created_at, "size": r.size,
             "last_error": r.last_error, "recipients": by_item.get(r.id, [])} for r in rows]


async def purge_done(sessions: async_sessionmaker[AsyncSession], older_than: float) -> int:
    async with sessions.begin() as s:
        res = await s.execute(delete(QueueItem).where(and_(QueueItem.status == "done",
                                                           QueueItem.next_attempt_at < older_than)))
        return res.rowcount or 0


__all__ = ["Accepted", "Claimed", "Enqueuer", "StorageError", "claim", "record_attempt", "record_error",
           "add_notice", "get_item", "admin", "list_items", "new_queue_id", "purge_done"]
