"""A lone group written on the event loop (``Enqueuer._write_here``, docs/decisions/0027): a
message alone in intake, or a delivery's outcome, when it is the whole group, skips the thread's
round trip; anything that would make it wait (another worker's write lock, SQLite busy, a
segment to write) sends it to the thread as before, and the event loop never waits."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
import time

import dbtest
import pytest
from test_commit_stats import serving_writer
from test_segments import _accepted, big

from bsm_relay.relay import queue
from bsm_relay.relay.models import QueueItem, QueueRecipient
from bsm_relay.relay.queue import Accepted, Delivered, list_items, row
from bsm_relay.relay.segments import SegmentLog


@pytest.fixture
async def writer(tmp_path, monkeypatch):
    """The serving writer on SQLite, and the threads each group's rows were written in."""
    if dbtest.on_postgres():
        pytest.skip("the lone group is SQLite's writer (PostgreSQL's groups go through asyncpg)")
    threads: list[int] = []
    real = queue._apply_rows

    def recorded(conn, entries, instead=None):  # type: ignore[no-untyped-def]
        threads.append(threading.get_ident())
        return real(conn, entries, instead)
    monkeypatch.setattr(queue, "_apply_rows", recorded)
    async with serving_writer(tmp_path, segments=SegmentLog(tmp_path / "state")) as (enqueuer, sessions, database):
        yield enqueuer, sessions, database, threads


def small(qid: str, alone: bool) -> Accepted:
    now = time.time()
    data = b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    return Accepted(
        items=[row(QueueItem, id=qid, kind="forward", envelope_from="b-x@marketplace.example",
                   origin_sender="seller@acme.example", body=data, size=len(data), created_at=now,
                   next_attempt_at=now, attempts=0, status="queued", session_id="s1", lease_owner="me",
                   lease_until=now + 60)],
        recipients=[row(QueueRecipient, queue_id=qid, address="buyer@example.org",
                        alias="b-1@marketplace.example", status="pending")],
        alone=alone)


async def held_up(enqueuer, qid: str) -> tuple[asyncio.Future, asyncio.Future]:  # type: ignore[no-untyped-def]
    """A lone message committed while something holds the database: after 0.3 s it still waits,
    and the event loop does not (a ticker every 10 ms kept running).  Its commit, and the ticker."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1
    beat = asyncio.ensure_future(ticker())
    pending = asyncio.ensure_future(enqueuer.commit(small(qid, alone=True)))
    await asyncio.sleep(0.3)
    assert not pending.done() and ticks >= 3
    return pending, beat


async def test_a_message_alone_and_its_outcome_are_written_on_the_event_loop(writer):
    enqueuer, sessions, _, threads = writer
    loop_thread = threading.get_ident()
    await enqueuer.commit(small("qlone", alone=True))
    await enqueuer.commit(small("qcrowd", alone=False))     # others in intake: the thread, as before
    assert threads == [loop_thread, threads[1]] and threads[1] != loop_thread
    async with sessions() as s:
        rid = (await s.execute(QueueRecipient.__table__.select()
                               .where(QueueRecipient.queue_id == "qlone"))).first().id
    await enqueuer.commit(Delivered("qlone", "me", (rid,), b"From: a@example.com\r\n", time.time(),
                                    queue._event("qlone", "delivered")))
    assert threads[2] == loop_thread
    items = {i["id"]: i["status"] for i in await list_items(sessions, include_done=True)}
    assert items == {"qlone": "done", "qcrowd": "queued"}


async def test_a_lone_message_with_a_segment_body_goes_to_the_thread(writer):
    enqueuer, _, _, threads = writer
    values = big("qbiglone")
    accepted = _accepted(values)
    accepted.alone = True
    await enqueuer.commit(accepted)
    assert threads and threads[0] != threading.get_ident()      # its fdatasync never on the loop


async def test_a_lone_message_waits_in_the_thread_while_another_worker_holds_the_lock(writer):
    enqueuer, sessions, database, threads = writer
    fd = os.open(f"{database.sqlite_path}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)                 # another serve process's group
        pending, beat = await held_up(enqueuer, "qheld")
        fcntl.flock(fd, fcntl.LOCK_UN)
        await pending
        beat.cancel()
    finally:
        os.close(fd)
    assert threads == [threads[0]] and threads[0] != threading.get_ident()
    assert [i["id"] for i in await list_items(sessions)] == ["qheld"]


async def test_a_lone_message_waits_in_the_thread_while_sqlite_is_busy(writer):
    """A tool writing to the database (not a relay process: no lock file) holds SQLite's write
    lock: the attempt on the loop gives up at once, the thread waits it out."""
    enqueuer, sessions, database, threads = writer
    other = sqlite3.connect(database.sqlite_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        pending, beat = await held_up(enqueuer, "qbusy")
        other.execute("COMMIT")
        await pending
        beat.cancel()
    finally:
        other.close()
    # Tried on the loop (and rolled back), then written in the thread: one group, counted once.
    assert len(threads) == 2 and threads[0] == threading.get_ident() != threads[1]
    assert enqueuer.stats.groups == 1
    assert [i["id"] for i in await list_items(sessions)] == ["qbusy"]
    await enqueuer.commit(small("qafter", alone=True))     # the loop's connection works again
    assert threads[2] == threading.get_ident()
