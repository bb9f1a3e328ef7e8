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
import contextlib
import functools
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    Connection,
    CursorResult,
    Delete,
    Engine,
    Select,
    Table,
    Update,
    bindparam,
    delete,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from . import log, spool
from .db import Reads, single_host
from .models import MessageEvent, QueueItem, QueueRecipient
from .segments import SegmentLog


def _time_sorted(random_bytes: int) -> str:
    """The time in milliseconds (11 hex digits), then ``random_bytes`` random bytes in hex: ids
    made later sort after, so rows keyed on them go to the right-hand edge of an index rather than
    to a random page of it (a page read and written per row and group commit)."""
    return f"{time.time_ns() // 1_000_000:011x}{secrets.token_hex(random_bytes)}"


def new_queue_id() -> str:
    """``q`` and a time-sorted id with 32 random bits: a message's rows go to the right-hand edge
    of the indexes on queue ids (the queue's own, the recipients', the log's and the events'):
    fewer pages read and written per group commit (about a fifth, measured with strace)."""
    return "q" + _time_sorted(4)


def mint_message_id(domain: str) -> str:
    """The Message-ID a forwarded message gets: a time-sorted id with 96 random bits, so the
    Message-ID map's primary key grows at its right-hand edge (a random id cost a random 4 KB page
    per message through the WAL and again through the checkpoint).  The time is no secret (the
    Date and Received fields show it); the random part keeps the id unguessable."""
    return f"{_time_sorted(12)}@{domain}"


Unit = Callable[[AsyncSession], Awaitable[Any]]


class Row(NamedTuple):
    """One row to INSERT, as its table and values: an ORM object would instrument every
    attribute it is given (a tenth of the intake's own CPU), and the writer only reads them."""

    table: Table
    values: dict[str, Any]


def row(model: Any, **values: Any) -> Row:
    return Row(model.__table__, values)


@dataclass
class Accepted:
    """Everything one accepted message writes, committed together or not at all.  Each row is a
    :class:`Row` or an ORM object (the less frequent writers)."""

    items: list[Any]                                   # queue items
    recipients: list[Any]                              # their recipients
    extra: list[Any] = field(default_factory=list)     # ThreadId, MessageLog rows
    # More row work in the same transaction, after the INSERTs (sync, on the group's connection).
    after: list[Callable[[Connection], Any]] = field(default_factory=list)
    # Called once the group is settled: True when these rows are committed, False when not.
    settled: list[Callable[[bool], None]] = field(default_factory=list)
    leased: bool = False               # the items are inserted leased (see :func:`lease_at_insert`)
    alone: bool = False                # the only message in intake: may be written on the event loop


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
    spool_path: str | None = None                         # the message is this file; body its header block
    spool_span: tuple[int, int] | None = None             # spool_path is a segment: (offset, size) in it



def lease_at_insert(accepted: Accepted, owner: str, until: float) -> Callable[[], list[Claimed]]:
    """Insert ``accepted``'s items already leased to ``owner``, for the serving process to deliver
    them at once: no claim (a second write of each row; at 100 KB the whole row again) and no
    poll.  Their recipients' row ids are read in the same transaction.  Returns, for once the
    rows are committed, the items as :func:`claim` would have returned them.

    A lease taken here is like any other: should the process die before delivering, the items
    are due again when it runs out (or at once, when the relay restarts on this host)."""
    ids: list[str] = []
    values: list[dict[str, Any]] = []
    for item in accepted.items:
        assert isinstance(item, Row)
        item.values["lease_owner"], item.values["lease_until"] = owner, until
        ids.append(item.values["id"])
        values.append(item.values)
    found: list[Any] = []

    def recipients(conn: Connection) -> None:
        found[:] = _pending_recipients(conn, ids)       # [:]: a retried group reads again

    accepted.after.append(recipients)
    accepted.leased = True

    def claimed() -> list[Claimed]:
        by_item: dict[str, list[tuple[int, str, str]]] = {}
        for rid, qid, address, alias in found:
            by_item.setdefault(qid, []).append((rid, address, alias))
        return [Claimed(v["id"], v["kind"], v["envelope_from"], v["origin_sender"], v["body"], v["attempts"],
                        v["created_at"], tuple(by_item.get(v["id"], ())), False, v.get("session_id"),
                        v.get("spool_path")) for v in values]
    return claimed


@dataclass(frozen=True)
class Delivered:
    """An attempt that delivered every pending recipient, the common case: written in bulk
    with the rest of its group (three statements for the whole group, not three per item)."""

    item_id: str
    owner: str
    recipient_ids: tuple[int, ...]
    header_block: bytes               # what the item keeps once done (trace, a late bounce's DSN)
    retry_at: float
    event: dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """A delivery claim: lease up to ``limit`` due items to ``owner`` (see :func:`claim`)."""

    owner: str
    limit: int
    lease: float
    now: float


Entry = Accepted | Delivered | Claim | Unit


def _rowish(entry: Entry) -> bool:
    """Plain row work, done with Core statements alone (no ORM session, no async unit)."""
    return isinstance(entry, (Delivered, Claim, Accepted))


@dataclass
class CommitStats:
    """The group commit's running totals (this process): what an operator needs to tell whether
    the database's write lock is the bottleneck.  Written by the one writer at a time, read by
    the metrics endpoint; plain numbers, no lock."""

    groups: int = 0                   # transactions committed or tried
    entries: int = 0                  # what they held (accepted messages, outcomes, claims, units)
    lock_wait: float = 0.0            # seconds waiting for another process's group (serve --workers)
    transaction: float = 0.0          # seconds inside the transactions, commit (fsync) included

    def add(self, entries: int, started: float, locked: float, done: float) -> None:
        self.groups += 1
        self.entries += entries
        self.lock_wait += locked - started
        self.transaction += done - locked


class Enqueuer:
    """The serving process's one writer: group commit of everything it writes.

    Accepted messages (:meth:`commit`) and the delivery side's claims and outcomes
    (:meth:`run`) share one transaction per group, so a busy relay pays one commit (one
    fsync) for many messages, and its writers never wait on each other's locks: SQLite has
    one writer at a time, and a second writer in the same process would sleep in SQLite's
    busy handler.  Across processes (``serve --workers N`` on one SQLite file) the group
    takes ``write_lock`` first, so the processes hand the database over in turn instead.

    A failed group is retried entry by entry when it held more than one, so one broken
    entry fails alone; storage trouble (locked, read-only, full) fails the whole group.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], max_batch: int = 64,
                 write_lock: Callable[[], AbstractAsyncContextManager[None]] | None = None,
                 sync_engine: Engine | None = None, reads: Reads | None = None,
                 segments: SegmentLog | None = None) -> None:
        self._sessions = sessions
        self.single_host = single_host(sessions)    # SQLite: every spool file is this node's
        self._reads = reads
        self._max_batch = max_batch
        self._write_lock = write_lock or _no_lock
        # SQLite: plain row work (most of it) is committed in one hand-off to a thread per group.
        self._sync_engine = sync_engine
        # The writer's connection, kept from group to group (a pool checkout and the rollback
        # of its return cost as much as a small group's rows); one group at a time uses it.
        self._conn: Connection | None = None
        self._conn_lock = threading.Lock()
        self._pending: asyncio.Queue[tuple[Entry, asyncio.Future[Any]] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False                # once stopped, nothing more is taken (451)
        self._records: set[asyncio.Future[Any]] = set()    # what record() handed over, not yet done
        self.wakeup = asyncio.Event()        # set after each commit: delivery has work
        self.stats = CommitStats()
        # SQLite: large bodies go to spool segments, written before the group takes the lock.
        self.segments = segments if sync_engine is not None else None
        self._upkeep: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="enqueuer")
        if self.segments is not None:
            self._upkeep = asyncio.create_task(self._segment_upkeep(), name="segments")

    def released(self, queue_id: str) -> None:
        """``queue_id``'s outcome is committed and it is done (its spool segment may go)."""
        if self.segments is not None:
            self.segments.release(queue_id)

    async def _segment_upkeep(self, interval: float = 1.0) -> None:
        """Seal an idle segment; ask the database about the messages of sealed segments that
        this process did not see done (delivered by another process, or never committed)."""
        assert self.segments is not None
        while True:
            await asyncio.sleep(interval)
            try:
                self.segments.seal_idle()
                for relative, ids in self.segments.waiting().items():
                    self.segments.settle(relative, await undelivered(self._sessions, _QUEUE.c.id, ids))
            except Exception as exc:   # noqa: BLE001 - database or file trouble: tried again next time
                log.get().error("store.error", stage="segments", error_type=type(exc).__name__,
                                error=log.error_line(exc))

    async def stop(self) -> None:
        """The group in hand, if any, ends first (its sessions get their answer; one stuck on a
        locked database is given up after 2 s); what waits for a later group is answered 451,
        except the rows of :meth:`record`, which nobody waits for: they are committed last."""
        self._stopped = True
        if self._upkeep is not None:
            self._upkeep.cancel()
            await asyncio.gather(self._upkeep, return_exceptions=True)
            self._upkeep = None
        records: list[tuple[Entry, asyncio.Future[Any]]] = []
        while not self._pending.empty():       # never begun: the sessions answer 451 now
            waiting = self._pending.get_nowait()
            if waiting is None:
                continue
            if waiting[1] in self._records:
                records.append(waiting)
                continue
            _fail(waiting[1], StorageError("the relay is stopping"))
            _settle(waiting[0], False)
        if self._task:
            self._pending.put_nowait(None)    # wakes an idle writer
            done, _ = await asyncio.wait({self._task}, timeout=2.0)
            if not done:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
            self._task = None
        if records:
            write = self._write_in_thread if self._sync_engine is not None else self._write
            try:
                await asyncio.wait_for(self._commit(records, write), 2.0)
            except TimeoutError:
                for entry, fut in records:
                    _fail(fut, StorageError("the database stayed locked while the relay stopped"))
                    _settle(entry, False)
        if self._sync_engine is not None:
            await asyncio.to_thread(self._close_connection)
            self._sync_engine.dispose()
        if self.segments is not None:
            self.segments.close()
        if self._reads is not None:
            self._reads.close()

    async def commit(self, accepted: Accepted | Delivered) -> None:
        """Returns once the rows are durably committed; raises if they are not."""
        await self._submit(accepted)

    async def record(self, accepted: Accepted) -> None:
        """Rows that record what happened and promise nothing (a refusal's message-log row, a
        pending sender's attempt): they go into the next group and this session does not wait for
        it to commit, as Postfix does not wait for syslog before it refuses.  A failure is logged
        (``store.error``).  Past ``RECORD_BACKLOG`` entries waiting for the writer the session
        waits like any other: a flood of refusals slows down instead of piling rows up in memory."""
        if self._task is None or self._pending.qsize() >= RECORD_BACKLOG:
            await self.commit(accepted)
            return
        if self._stopped:
            raise StorageError("the relay is stopping")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._records.add(fut)
        fut.add_done_callback(self._records.discard)
        fut.add_done_callback(_log_unrecorded)
        self._pending.put_nowait((accepted, fut))

    async def run(self, unit: Unit) -> Any:
        """Run ``unit(session)`` inside the next group's transaction; its result once committed."""
        if self._task is None:            # not serving (a command, a test harness): on its own
            async with self._sessions.begin() as s:
                return await unit(s)
        return await self._submit(unit)

    async def any_row(self, query: Select[Any], params: dict[str, Any] | None = None) -> bool:
        """Whether a read-only ``query`` finds a row (outside the group: no write, no lock)."""
        if self._reads is not None:
            return bool(await self._reads.all(query, params))
        async with self._sessions() as s:
            return (await s.execute(query, params)).first() is not None

    async def _submit(self, entry: Entry) -> Any:
        if self._stopped:
            raise StorageError("the relay is stopping")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((entry, fut))
        # The future only tells this session the group's outcome: a session cancelled meanwhile
        # cancels it, and the writer, which holds the group, commits the group all the same (all
        # or nothing per group).  Not shielded: a shield costs one more turn of a busy event loop
        # between the commit and the 250.
        return await fut

    async def _run(self) -> None:
        while not self._stopped:
            first = await self._pending.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch and not self._pending.empty() and not self._stopped:
                following = self._pending.get_nowait()
                if following is None:
                    break
                batch.append(following)
            if self._sync_engine is not None:
                rows = [(e, f) for e, f in batch if _rowish(e)]
                rest = [(e, f) for e, f in batch if not _rowish(e)]
                if rows:
                    lone = len(rows) == 1 and self._lone(rows[0][0])
                    await self._commit(rows, self._write_here if lone else self._write_in_thread)
                if rest:
                    await self._commit(rest, self._write)
            else:
                await self._commit(batch, self._write)
            if any(isinstance(entry, Accepted) and entry.items and not entry.leased for entry, _ in batch):
                self.wakeup.set()         # new queue items: delivery has work (leased ones are in hand)

    async def _commit(self, batch: list[tuple[Entry, asyncio.Future[Any]]],
                      write: Callable[[list[Entry]], Awaitable[list[Any]]]) -> None:
        """One group in one transaction; on failure each entry alone, unless the storage failed."""
        try:
            results = await write([entry for entry, _ in batch])
        except Exception as exc:
            if len(batch) == 1 or _storage_trouble(exc):
                for entry, fut in batch:
                    _fail(fut, exc)
                    _settle(entry, False)
                return
            results = []
            for entry, fut in batch:          # one at a time: only the broken entry fails
                try:
                    results.append((await write([entry]))[0])
                except Exception as one:
                    _fail(fut, one)
                    results.append(_FAILED)
        for (entry, fut), result in zip(batch, results, strict=True):
            if not fut.done() and result is not _FAILED:
                fut.set_result(result)
            _settle(entry, result is not _FAILED)

    async def _write_in_thread(self, entries: list[Entry]) -> list[Any]:
        return await asyncio.to_thread(self._write_sync, entries)

    def _lone(self, entry: Entry) -> bool:
        """A group of one small entry: a message alone in intake whose group needs no segment
        write, or a delivery's outcome (docs/decisions/0027)."""
        if isinstance(entry, Delivered):
            return True
        return (isinstance(entry, Accepted) and entry.alone
                and (self.segments is None or not any(self.segments.wanted(v) for v in _queue_rows([entry]))))

    async def _write_here(self, entries: list[Entry]) -> list[Any]:
        """A lone message's group written on the event loop: a thread's round trip costs about as
        much as its transaction, and nobody else waits on the loop meanwhile.  Only if nothing
        would make it wait: the writer's connection and the workers' write lock free at once,
        SQLite not busy (a tool writing to the database); otherwise in the thread as usual."""
        try:
            return self._write_now(entries)
        except _WouldWait:
            return await self._write_in_thread(entries)

    def _write_now(self, entries: list[Entry]) -> list[Any]:
        assert self._sync_engine is not None
        now = getattr(self._write_lock, "now", None)
        if not self._conn_lock.acquire(blocking=False):
            raise _WouldWait
        try:
            try:
                held = now() if now is not None else nullcontext()
                held.__enter__()
            except BlockingIOError:
                raise _WouldWait from None
            started = time.perf_counter()
            counted = True
            try:
                conn = self._conn
                if conn is None or conn.invalidated or conn.closed:
                    conn = self._conn = self._sync_engine.connect()
                raw = conn.connection.dbapi_connection
                assert raw is not None
                waits = raw.execute("PRAGMA busy_timeout").fetchone()[0]
                raw.execute("PRAGMA busy_timeout=0")       # busy: to the thread, never a wait here
                try:
                    with conn.begin():
                        return _apply_rows(conn, entries)
                finally:
                    # Back as it was (the connection returns to the pool, for the thread's use).
                    # One the failure closed says so here: that is not the error to report.
                    with contextlib.suppress(sqlite3.Error):
                        raw.execute(f"PRAGMA busy_timeout={int(waits)}")
            except (OperationalError, sqlite3.OperationalError) as exc:    # rows go to the driver directly
                self._drop_connection()
                if "locked" in str(exc) or "busy" in str(exc):
                    counted = False               # the thread writes (and counts) the group
                    raise _WouldWait from None
                raise
            except BaseException:
                self._drop_connection()
                raise
            finally:
                held.__exit__(None, None, None)
                if counted:
                    self.stats.add(len(entries), started, started, time.perf_counter())
        finally:
            self._conn_lock.release()

    def _write_sync(self, entries: list[Entry]) -> list[Any]:
        assert self._sync_engine is not None
        lock = getattr(self._write_lock, "sync", None)
        # Large bodies first, to this writer's segment (one write and one fdatasync for the
        # group), while the other workers hold the database: only their header blocks go in.
        try:
            instead = self.segments.stage(_queue_rows(entries)) if self.segments is not None else {}
        except OSError as exc:            # the spool's disk is full or gone: as the database's would be
            raise StorageError(f"spool segment: {exc}") from exc
        started = time.perf_counter()
        with self._conn_lock, lock() if lock is not None else nullcontext():
            locked = time.perf_counter()
            try:
                conn = self._conn
                if conn is None or conn.invalidated or conn.closed:
                    conn = self._conn = self._sync_engine.connect()
                with conn.begin():
                    return _apply_rows(conn, entries, instead)
            except BaseException:
                # A failed group may leave the connection in any state (the files in trouble
                # invalidate it): the next group starts on a new one.
                self._drop_connection()
                raise
            finally:
                self.stats.add(len(entries), started, locked, time.perf_counter())

    def _close_connection(self) -> None:
        """At stop, in a thread: after a group still running in its thread, if any; one stuck on
        a locked database keeps its connection (closed with the process) rather than hold up
        the shutdown."""
        if self._conn_lock.acquire(timeout=1.0):
            try:
                self._drop_connection()
            finally:
                self._conn_lock.release()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a broken connection is being thrown away
                pass

    async def _write(self, entries: list[Entry]) -> list[Any]:
        rows = [e for e in entries if not callable(e)]
        results: list[Any] = []
        started = time.perf_counter()
        async with self._write_lock():
            locked = time.perf_counter()
            try:
                async with self._sessions.begin() as s:
                    done = iter(await s.run_sync(lambda sync: _apply_rows(sync.connection(), rows)) if rows else [])
                    for entry in entries:
                        results.append(next(done) if not callable(entry) else await entry(s))
            finally:
                self.stats.add(len(entries), started, locked, time.perf_counter())
        return results


def _queue_rows(entries: list[Entry]) -> Iterator[dict[str, Any]]:
    """The values of the queue items that ``entries`` insert as plain rows."""
    for entry in entries:
        if isinstance(entry, Accepted):
            for item in entry.items:
                if isinstance(item, Row):
                    yield item.values


def _apply_rows(conn: Connection, entries: list[Any], instead: dict[int, dict[str, Any]] | None = None) -> list[Any]:
    """The row work of a group on one connection (sync; the async path runs it through
    ``run_sync``): each Accepted's INSERTs, one ``executemany`` per table and set of columns (the
    ORM's unit of work costs more than the database here; queue items first, recipients refer
    to them) and their ``after`` work, Delivered outcomes in bulk, then each Claim.  One result
    per entry.  ``instead``: by ``id()`` of a row's values, what to insert in their place (a
    body moved to a spool segment)."""
    rows: dict[tuple[Any, frozenset[str]], list[dict[str, Any]]] = {}
    for entry in entries:
        if isinstance(entry, Accepted):
            for obj in (*entry.items, *entry.recipients, *entry.extra):
                table, values = obj if isinstance(obj, Row) else (type(obj).__table__, _values(obj))
                if instead:
                    values = instead.get(id(values), values)
                rows.setdefault((table, frozenset(values)), []).append(values)
    for key in sorted(rows, key=lambda k: k[0] is not _QUEUE):
        execute_rows(conn, insert_of(key[0]), rows[key], key[1])
    for entry in entries:
        if isinstance(entry, Accepted):
            for work in entry.after:
                work(conn)
    done = [e for e in entries if isinstance(e, Delivered)]
    if done:
        execute_rows(conn, _RCPT_DELIVERED, [{"b_id": rid} for d in done for rid in d.recipient_ids])
        execute_rows(conn, _ITEM_DONE, [{"b_id": d.item_id, "b_owner": d.owner, "b_at": d.retry_at,
                                     "b_body": d.header_block} for d in done])
        events: dict[frozenset[str], list[dict[str, Any]]] = {}
        for d in done:
            events.setdefault(frozenset(d.event), []).append(d.event)
        for keys, group in events.items():
            execute_rows(conn, insert_of(_EVENTS), group, keys)
    return [_claim_rows(conn, e) if isinstance(e, Claim) else None for e in entries]


def execute_rows(conn: Connection, stmt: Any, rows: list[dict[str, Any]], keys: frozenset[str] | None = None) -> int:
    """``conn.execute(stmt, rows)`` (an executemany).  On SQLite the statement is compiled once
    and the rows go to the driver as tuples, in the same transaction: SQLAlchemy's per-row work
    (parameters, defaults, type processing) cost several times SQLite's own for these INSERTs and
    UPDATEs, whose values the driver takes as they are (str, bytes, int, float, bool, None).
    ``keys``: an INSERT's columns (rows of one INSERT share them).  The rows it changed."""
    if conn.dialect.name != "sqlite" or not rows:
        return conn.execute(stmt, rows).rowcount if rows else 0
    sql, names, defaults = _sqlite_statement(conn, stmt, keys)
    cursor = conn.connection.dbapi_connection.cursor()     # type: ignore[union-attr]
    try:
        cursor.executemany(sql, [tuple(r[n] if n in r else defaults[n] for n in names) for r in rows])
        return int(cursor.rowcount)
    finally:
        cursor.close()


_SQLITE_STATEMENTS: dict[tuple[Any, frozenset[str] | None], tuple[str, tuple[str, ...], dict[str, Any]]] = {}


def _sqlite_statement(conn: Connection, stmt: Any,
                      keys: frozenset[str] | None) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """The SQL of ``stmt`` for the SQLite driver, its parameters' order, and the scalar defaults
    of the columns an INSERT's rows leave out (what SQLAlchemy would have filled in)."""
    found = _SQLITE_STATEMENTS.get((stmt, keys))
    if found is None:
        compiled = stmt.compile(dialect=conn.dialect, column_keys=sorted(keys) if keys is not None else None)
        names = tuple(compiled.positiontup or ())
        # Values the statement holds itself (``.values(status="delivered")``), then the INSERT
        # columns the rows leave out; a parameter the rows must give (``bindparam("b_id")``) has none.
        defaults = {name: value for name, value in compiled.params.items()
                    if not compiled.binds[name].required}
        table = getattr(stmt, "table", None)
        for name in names:
            if keys is not None and name not in keys and table is not None and name in table.c:
                default = table.c[name].default
                if default is None or not default.is_scalar:
                    raise ValueError(f"no scalar default for {name}")   # a programming error
                defaults[name] = default.arg
        found = _SQLITE_STATEMENTS[(stmt, keys)] = (compiled.string, names, defaults)
    return found


_FAILED = object()
# Core tables: the delivery path's statements skip the ORM (its bulk UPDATE/INSERT machinery
# costs several times the statement itself).
_QUEUE = cast(Table, QueueItem.__table__)
_RCPTS = cast(Table, QueueRecipient.__table__)
_EVENTS = cast(Table, MessageEvent.__table__)
_RCPT_DELIVERED = (_RCPTS.update().where(_RCPTS.c.id == bindparam("b_id"))
                   .values(status="delivered", last_error=None))
_ITEM_DONE = (_QUEUE.update().where(_QUEUE.c.id == bindparam("b_id"), _QUEUE.c.lease_owner == bindparam("b_owner"))
              .values(status="done", attempts=_QUEUE.c.attempts + 1, next_attempt_at=bindparam("b_at"),
                      lease_owner=None, lease_until=None, last_error=None, body=bindparam("b_body")))


@asynccontextmanager
async def _no_lock() -> AsyncIterator[None]:
    yield


_INSERTS: dict[Any, Any] = {}


def insert_of(table: Any) -> Any:
    """The table's INSERT, built once (its cache key is then computed once, not per group)."""
    stmt = _INSERTS.get(table)
    if stmt is None:
        stmt = _INSERTS[table] = table.insert()
    return stmt


def _values(obj: Any) -> dict[str, Any]:
    """An ORM object's set attributes, for a bulk INSERT."""
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _settle(entry: Entry, committed: bool) -> None:
    if isinstance(entry, Accepted):
        for callback in entry.settled:
            callback(committed)


def _storage_trouble(exc: Exception) -> bool:
    """The database itself failed (locked, read-only, full, gone): every entry would fail alike."""
    return isinstance(exc, (OperationalError, OSError, StorageError)) or isinstance(getattr(exc, "orig", None), OSError)


# Entries waiting for the writer past which ``Enqueuer.record`` waits for its commit (a group takes
# up to 64).
RECORD_BACKLOG = 256


def _log_unrecorded(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.get().error("store.error", stage="record", error=log.error_line(exc))


def _fail(fut: asyncio.Future[Any], exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(StorageError(str(exc)))


class _WouldWait(Exception):
    """A lone group cannot be written on the event loop without waiting: it goes to the thread."""


class StorageError(RuntimeError):
    """The queue could not commit; the SMTP answer is 451 4.3.0."""


async def _transact(db: async_sessionmaker[AsyncSession] | Enqueuer, unit: Unit) -> Any:
    """``unit`` in the serving process's group commit, or in a transaction of its own."""
    if isinstance(db, Enqueuer):
        return await db.run(unit)
    async with db.begin() as s:
        return await unit(s)


async def undelivered(sessions: async_sessionmaker[AsyncSession], column: Any, values: Sequence[str]) -> set[str]:
    """Which of ``values`` a queue item that is not done has in ``column`` (500 at a time)."""
    found: set[str] = set()
    for start in range(0, len(values), 500):
        async with sessions() as s:
            found.update(v for (v,) in await s.execute(
                select(column).where(column.in_(values[start:start + 500]), _QUEUE.c.status != "done")))
    return found


def _due(limit: int | None) -> Select[Any]:
    q = _QUEUE.c
    now: Any = bindparam("b_now")
    # A spooled item is this node's only if its file is here (another node's local queue; on
    # SQLite, with one node, the prefix is "%": every file is here).
    stmt = (select(q.id).where(q.status == "queued", q.next_attempt_at <= now,
                               or_(q.lease_until.is_(None), q.lease_until < now),
                               or_(q.spool_path.is_(None),
                                   q.spool_path.like(bindparam("b_prefix"), escape="/")))
            .order_by(q.next_attempt_at))
    return stmt.limit(limit) if limit is not None else stmt.limit(bindparam("b_limit"))


# The delivery path's statements, built once (building and keying a statement costs more than
# SQLite running it): "anything due?", and the claim, which leases and reads in one UPDATE.
_ANY_DUE = _due(1)
_CLAIMED = (_QUEUE.c.id, _QUEUE.c.kind, _QUEUE.c.envelope_from, _QUEUE.c.origin_sender, _QUEUE.c.body,
            _QUEUE.c.attempts, _QUEUE.c.created_at, _QUEUE.c.delay_notified, _QUEUE.c.session_id,
            _QUEUE.c.spool_path, _QUEUE.c.spool_offset, _QUEUE.c.size)
_PENDING_RCPTS = (select(_RCPTS.c.id, _RCPTS.c.queue_id, _RCPTS.c.address, _RCPTS.c.alias)
                  .where(_RCPTS.c.queue_id.in_(bindparam("b_ids", expanding=True)),
                         _RCPTS.c.status == literal_column("'pending'")))


@functools.lru_cache(maxsize=128)
def _pending_sqlite(count: int) -> str:
    """``_PENDING_RCPTS`` for ``count`` ids, as SQLite's driver takes it (``?`` each)."""
    expanded = _PENDING_RCPTS.params(b_ids=[""] * count)
    return str(expanded.compile(dialect=sqlite_dialect(), compile_kwargs={"render_postcompile": True}))


def _pending_recipients(conn: Connection, ids: list[str]) -> list[Any]:
    """(id, queue_id, address, alias) of the items' pending recipients.  On SQLite straight to
    the driver, with the statement compiled once per number of ids: its expanding IN made
    SQLAlchemy build it anew on every call (a tenth of a handed-off message's commit)."""
    if conn.dialect.name != "sqlite":
        return list(conn.execute(_PENDING_RCPTS, {"b_ids": ids}).all())
    cursor = conn.connection.dbapi_connection.cursor()     # type: ignore[union-attr]
    try:
        cursor.execute(_pending_sqlite(len(ids)), ids)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _claim_statement(postgres: bool) -> Any:
    due = _due(None)
    if postgres:
        due = due.with_for_update(skip_locked=True)
    return (_QUEUE.update().where(_QUEUE.c.id.in_(due.scalar_subquery()))
            .values(lease_owner=bindparam("b_owner"), lease_until=bindparam("b_until"))
            .returning(*_CLAIMED))


_CLAIM = {False: _claim_statement(False), True: _claim_statement(True)}


def _due_params(now: float, single_host: bool) -> dict[str, Any]:
    if single_host:
        return {"b_now": now, "b_prefix": "%"}
    prefix = spool.host_prefix()
    for char in "/%_":       # LIKE's wildcards (and the escape) taken literally: a prefix match
        prefix = prefix.replace(char, "/" + char)
    return {"b_now": now, "b_prefix": prefix + "%"}


async def claim(db: async_sessionmaker[AsyncSession] | Enqueuer, owner: str, limit: int,
                lease: float, now: float | None = None) -> list[Claimed]:
    work = Claim(owner, limit, lease, time.time() if now is None else now)
    if isinstance(db, Enqueuer):
        if not await db.any_row(_ANY_DUE, _due_params(work.now, db.single_host)):
            return []        # nothing due: no write transaction (delivery asks after every commit)
        return await db._submit(work)  # type: ignore[no-any-return]
    async with db.begin() as s:
        return await s.run_sync(lambda sync: _claim_rows(sync.connection(), work))  # type: ignore[no-any-return]


def _claim_rows(conn: Connection, work: Claim) -> list[Claimed]:
    stmt = _CLAIM[conn.dialect.name == "postgresql"]
    items = conn.execute(stmt, {**_due_params(work.now, conn.dialect.name == "sqlite"), "b_limit": work.limit,
                                "b_owner": work.owner, "b_until": work.now + work.lease}).all()
    if not items:
        return []
    rcpts = _pending_recipients(conn, [i.id for i in items])
    by_item: dict[str, list[tuple[int, str, str]]] = {}
    for rid, qid, address, alias in rcpts:
        by_item.setdefault(qid, []).append((rid, address, alias))
    items = sorted(items, key=lambda i: i.id)
    return [Claimed(i.id, i.kind, i.envelope_from, i.origin_sender, i.body, i.attempts, i.created_at,
                    tuple(by_item.get(i.id, ())), bool(i.delay_notified), i.session_id, i.spool_path,
                    (i.spool_offset, i.size) if i.spool_offset is not None else None)
            for i in items]


async def release_dead_leases(db: async_sessionmaker[AsyncSession] | Enqueuer, host: str,
                              alive: Callable[[int], bool]) -> int:
    """Take back the leases that relay processes on this host held when they died (kill -9, a
    crash): their items are due again now instead of when the lease would have run out
    (``[queue] lease``, 10 minutes by default).  Owners are ``host:pid:random``; a lease of
    another host, or of a pid that is still running, is left alone.  Returns the items freed."""
    async def unit(s: AsyncSession) -> int:
        q = _QUEUE.c
        owners = (await s.execute(select(q.lease_owner).distinct().where(
            q.lease_owner.like(f"{host}:%"), q.status == "queued"))).scalars().all()
        dead = [o for o in owners if _owner_pid(o, host) is not None and not alive(_owner_pid(o, host) or 0)]
        if not dead:
            return 0
        res = await s.execute(_QUEUE.update().where(q.lease_owner.in_(dead))
                              .values(lease_owner=None, lease_until=None))
        return cast(CursorResult[Any], res).rowcount or 0
    return await _transact(db, unit)  # type: ignore[no-any-return]


def _owner_pid(owner: str, host: str) -> int | None:
    parts = owner[len(host) + 1:].split(":")
    return int(parts[0]) if owner.startswith(host + ":") and parts and parts[0].isdigit() else None


async def record_attempt(db: async_sessionmaker[AsyncSession] | Enqueuer, item: Claimed, owner: str,
                         delivered: Sequence[int], failed: dict[int, str], deferred: dict[int, str],
                         retry_at: float, notices: Sequence[tuple[QueueItem, QueueRecipient]] = (),
                         delay_notified: bool = False) -> str:
    """Store the outcome of one delivery attempt, per recipient, with any notices it caused,
    in one transaction. Returns the item's new status (queued while anything is deferred)."""
    status = "queued" if deferred else "done"
    if isinstance(db, Enqueuer) and not (failed or deferred or notices or delay_notified):
        await db.commit(Delivered(item.id, owner, tuple(delivered), item.body[:_header_end(item.body)], retry_at,
                                  _attempt_event(item, delivered, failed, deferred, status, retry_at)))
        return status

    async def unit(s: AsyncSession) -> None:
        r = _RCPTS.c
        if delivered:
            await s.execute(_RCPTS.update().where(r.id.in_(delivered)).values(status="delivered", last_error=None))
        for rid, error in failed.items():
            await s.execute(_RCPTS.update().where(r.id == rid).values(status="failed", last_error=error))
        for rid, error in deferred.items():
            await s.execute(_RCPTS.update().where(r.id == rid).values(last_error=error))
        last_error = next(iter(deferred.values()), None) or next(iter(failed.values()), None)
        q = _QUEUE.c
        values: dict[str, Any] = dict(status=status, attempts=q.attempts + 1, next_attempt_at=retry_at,
                                      lease_owner=None, lease_until=None, last_error=last_error)
        if delay_notified:
            values["delay_notified"] = True
        if status == "done":
            # Keep only the header block: enough for trace and for a late bounce's DSN.
            values["body"] = item.body[:_header_end(item.body)]
        await s.execute(_QUEUE.update().where(q.id == item.id, q.lease_owner == owner).values(**values))
        for notice, rcpt in notices:
            s.add(notice)
            await s.flush()
            s.add(rcpt)
        # trace's history, in the same transaction (no extra commit on the delivery path).
        events = [_attempt_event(item, delivered, failed, deferred, status, retry_at)]
        events += [_event(item.id, "dsn.queued", notice=notice.id,
                          action="delayed" if b"Action: delayed" in notice.body else "failed")
                   for notice, _ in notices]
        await s.execute(_EVENTS.insert(), events)
    await _transact(db, unit)
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


def _event(queue_id: str, event: str, **detail: Any) -> dict[str, Any]:
    return {"queue_id": queue_id, "at": time.time(), "event": event, "detail": _json(**detail)}


def _attempt_event(item: Claimed, delivered: Sequence[int], failed: dict[int, str], deferred: dict[int, str],
                   status: str, retry_at: float) -> dict[str, Any]:
    shown, scrub = _scrubber(item)
    rcpts = [{"alias": shown.get(rid, "?"), "outcome": "delivered"} for rid in delivered]
    rcpts += [{"alias": shown.get(rid, "?"), "outcome": "failed", "reply": scrub(text)} for rid, text in failed.items()]
    rcpts += [{"alias": shown.get(rid, "?"), "outcome": "deferred", "reply": scrub(text)}
              for rid, text in deferred.items()]
    return _event(item.id, "delivery.attempt", attempt=item.attempts + 1, kind=item.kind, status=status,
                  recipients=rcpts, latency=round(time.time() - item.created_at, 3),
                  next_attempt_at=retry_at if status == "queued" else None)


def _header_end(body: bytes) -> int:
    end = body.find(b"\r\n\r\n")
    return len(body) if end < 0 else end + 2


async def record_error(db: async_sessionmaker[AsyncSession] | Enqueuer, item: Claimed, owner: str, error: str,
                       retry_at: float, max_errors: int) -> str:
    """Processing failed (a bug or a broken row, not a delivery failure): count it, hold at the limit."""
    async def unit(s: AsyncSession) -> str:
        errors = (await s.execute(select(QueueItem.errors).where(QueueItem.id == item.id))).scalar_one() + 1
        status = "hold" if errors >= max_errors else "queued"
        await s.execute(update(QueueItem).where(QueueItem.id == item.id, QueueItem.lease_owner == owner)
                        .values(errors=errors, status=status, next_attempt_at=retry_at, lease_owner=None,
                                lease_until=None, last_error=error))
        s.add(MessageEvent(queue_id=item.id, at=time.time(), event="delivery.error",
                           detail=_json(error=_scrubber(item)[1](error), errors=errors, status=status)))
        return status
    return await _transact(db, unit)  # type: ignore[no-any-return]


async def add_notice(db: async_sessionmaker[AsyncSession] | Enqueuer, notice: QueueItem, rcpt: QueueRecipient,
                     fail_recipients_of: str | None = None, error: str | None = None) -> None:
    """Queue a notice; optionally mark every recipient of another item failed (inbound bounce)."""
    async def unit(s: AsyncSession) -> None:
        if fail_recipients_of:
            await s.execute(update(QueueRecipient).where(QueueRecipient.queue_id == fail_recipients_of)
                            .values(status="failed", last_error=error))
            # trace's history: ``error`` is ours ("bounced later: 5.1.1"), it names nobody.
            s.add(MessageEvent(queue_id=fail_recipients_of, at=time.time(), event="bounce.received",
                               detail=_json(error=error, notice=notice.id)))
        s.add(notice)
        await s.flush()
        s.add(rcpt)
    await _transact(db, unit)


async def get_item(sessions: async_sessionmaker[AsyncSession],
                   queue_id: str) -> tuple[QueueItem, list[QueueRecipient]] | None:
    async with sessions() as s:
        item = await s.get(QueueItem, queue_id)
        if item is None:
            return None
        rcpts = list((await s.execute(select(QueueRecipient).where(QueueRecipient.queue_id == queue_id)
                                      .order_by(QueueRecipient.id))).scalars())
        return item, rcpts


async def admin(sessions: async_sessionmaker[AsyncSession], action: str, queue_id: str | None = None,
                now: float | None = None, state_dir: Path | None = None) -> int:
    """Operator actions: retry (due now), hold, release (back to queued, errors reset), delete,
    flush (everything queued is due now). Returns the number of items changed.  A deleted
    item's spool file (under ``state_dir``) goes with it."""
    now = time.time() if now is None else now
    spooled: str | None = None
    stmt: Update | Delete
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
            spooled = (await s.execute(select(QueueItem.spool_path).where(one))).scalar_one_or_none()
            await s.execute(delete(QueueRecipient).where(QueueRecipient.queue_id == queue_id))
            stmt = delete(QueueItem).where(one)
        else:
            raise ValueError(action)
        changed = cast(CursorResult[Any], await s.execute(stmt)).rowcount or 0
    if spooled and state_dir is not None:
        spool.remove(state_dir, spooled)
    return changed


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


__all__ = ["Accepted", "Claimed", "CommitStats", "Delivered", "release_dead_leases", "Enqueuer", "StorageError",
           "claim", "record_attempt", "record_error", "add_notice", "get_item", "admin", "list_items", "new_queue_id"]
