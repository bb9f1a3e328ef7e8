"""The group commit's running totals (``queue.CommitStats``), as the serving writer keeps them:
commits, the entries they held, seconds in transactions and seconds waiting for another serve
process's write lock.  The metrics endpoint exports them (test_e2e_observability)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time

import dbtest
import pytest

from bsm_relay.relay import db
from bsm_relay.relay.models import QueueItem, QueueRecipient
from bsm_relay.relay.queue import Accepted, Enqueuer, list_items, row


def accepted(qid: str) -> Accepted:
    now = time.time()
    data = b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    return Accepted(
        items=[row(QueueItem, id=qid, kind="forward", envelope_from="b-x@marketplace.example",
                   origin_sender="seller@acme.example", body=data, size=len(data), created_at=now,
                   next_attempt_at=now, attempts=0, status="queued", session_id="s1")],
        recipients=[row(QueueRecipient, queue_id=qid, address="buyer@example.org",
                        alias="b-1@marketplace.example", status="pending")])


@contextlib.asynccontextmanager
async def serving_writer(tmp_path, **kwargs):  # type: ignore[no-untyped-def]
    """The serving process's writer as ``open_relay`` builds it, on a fresh database, started
    (``kwargs``: more of ``Enqueuer``'s arguments); stopped and dropped on the way out."""
    database = dbtest.fresh(tmp_path)
    engine = database.engine()
    await db.migrate(engine)
    sessions = db.sessionmaker(engine)
    enqueuer = Enqueuer(sessions, write_lock=db.write_lock(database.engine_url),
                        sync_engine=db.make_sync_writer_engine(database.engine_url), **kwargs)
    enqueuer.start()
    try:
        yield enqueuer, sessions, database
    finally:
        await enqueuer.stop()
        await engine.dispose()
        await database.adrop()


@pytest.fixture
async def writer(tmp_path):
    async with serving_writer(tmp_path) as started:
        yield started


async def test_each_group_is_counted_with_its_entries_and_time(writer):
    enqueuer, sessions, _ = writer
    assert (enqueuer.stats.groups, enqueuer.stats.entries) == (0, 0)
    await enqueuer.commit(accepted("qstat1"))
    # Three at once: they wait for the same writer and are committed together or in turn.
    await asyncio.gather(*(enqueuer.commit(accepted(f"qstat{n}")) for n in (2, 3, 4)))
    stats = enqueuer.stats
    assert stats.entries == 4
    assert 2 <= stats.groups <= 4
    assert stats.transaction > 0
    assert len(await list_items(sessions)) == 4


async def test_waiting_for_another_process_lock_is_counted_apart(writer):
    enqueuer, _, database = writer
    if database.is_postgres:
        pytest.skip("PostgreSQL has no write lock between serve processes (SKIP LOCKED claims)")
    # Another serve process holds the SQLite write lock (an flock beside the database) for 0.4 s.
    fd = os.open(f"{database.sqlite_path}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        commit = asyncio.ensure_future(enqueuer.commit(accepted("qlock1")))
        await asyncio.sleep(0.4)
        assert not commit.done()
        fcntl.flock(fd, fcntl.LOCK_UN)
        await commit
    finally:
        os.close(fd)
    stats = enqueuer.stats
    assert stats.groups == 1 and stats.entries == 1
    assert stats.lock_wait >= 0.35
    assert stats.transaction < stats.lock_wait
