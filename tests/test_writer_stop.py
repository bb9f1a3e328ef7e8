"""The serving writer (``queue.Enqueuer``) at stop and when a session goes away: every session
that handed something over gets an answer, and a group is committed whole or not at all."""

from __future__ import annotations

import asyncio
import fcntl
import os

import dbtest
import pytest
from test_commit_stats import accepted, serving_writer, writer  # noqa: F401

from bsm_relay.relay import queue
from bsm_relay.relay.queue import StorageError, list_items


@pytest.fixture
async def one_per_group(tmp_path):
    """The serving writer on a fresh SQLite file, one entry per group."""
    if dbtest.on_postgres():
        pytest.skip("a group is held up from outside by taking SQLite's write lock (an flock)")
    async with serving_writer(tmp_path, max_batch=1) as started:
        yield started


async def test_stop_answers_waiting_sessions_and_the_group_in_hand_ends(one_per_group):
    enqueuer, sessions, database = one_per_group
    # Another serve process holds the write lock: the writer takes the first message and waits.
    fd = os.open(f"{database.sqlite_path}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        first = asyncio.ensure_future(enqueuer.commit(accepted("qstop1")))
        await asyncio.sleep(0.2)
        second = asyncio.ensure_future(enqueuer.commit(accepted("qstop2")))
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(enqueuer.stop())
        await asyncio.sleep(0.2)
        # Never begun: its session answers 451 now instead of waiting for a writer that stops.
        assert second.done() and isinstance(second.exception(), StorageError)
        assert not first.done()
        fcntl.flock(fd, fcntl.LOCK_UN)
        await first                   # the group in hand was committed, and its session told so
        await stopping
    finally:
        os.close(fd)
    assert [i["id"] for i in await list_items(sessions)] == ["qstop1"]
    with pytest.raises(StorageError):
        await enqueuer._submit(accepted("qstop3"))    # a writer that stopped takes nothing more


async def test_a_session_cancelled_while_waiting_leaves_its_group_whole(writer):  # noqa: F811
    enqueuer, sessions, database = writer
    # Two sessions' messages in one group, held up (SQLite: by another process's write lock;
    # PostgreSQL: by nothing, the group may be done before the cancel, which is as good).
    fd = None if database.is_postgres else os.open(f"{database.sqlite_path}.writelock",
                                                   os.O_RDWR | os.O_CREAT, 0o600)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)
    gone = asyncio.ensure_future(enqueuer.commit(accepted("qcancel1")))
    kept = asyncio.ensure_future(enqueuer.commit(accepted("qcancel2")))
    await asyncio.sleep(0.1)
    gone.cancel()                     # its client hung up while the group was being written
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    await kept
    assert gone.cancelled() or gone.exception() is None
    assert sorted(i["id"] for i in await list_items(sessions)) == ["qcancel1", "qcancel2"]


async def test_records_do_not_wait_for_their_commit_until_the_writer_falls_behind(one_per_group, monkeypatch):
    """``record`` (a refusal's log rows) returns before its group is committed; once the writer
    is ``RECORD_BACKLOG`` entries behind, the session waits for its commit like any other."""
    enqueuer, sessions, database = one_per_group
    monkeypatch.setattr(queue, "RECORD_BACKLOG", 3)
    fd = os.open(f"{database.sqlite_path}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)               # another serve process holds the write lock
        for n in range(4):                           # one in the writer's hand, three waiting
            await asyncio.wait_for(enqueuer.record(accepted(f"qrec{n}")), 1)
            await asyncio.sleep(0.05)
        behind = asyncio.ensure_future(enqueuer.record(accepted("qrec4")))
        await asyncio.sleep(0.3)
        assert not behind.done()                     # the writer is behind: this one waits
        assert await list_items(sessions) == []
        fcntl.flock(fd, fcntl.LOCK_UN)
        await asyncio.wait_for(behind, 10)
    finally:
        os.close(fd)
    assert sorted(i["id"] for i in await list_items(sessions)) == [f"qrec{n}" for n in range(5)]


async def test_records_still_waiting_at_stop_are_committed_not_dropped(one_per_group):
    """A short-lived process (``bsm-relay send``) stops right after a refusal: the refusal's
    rows, which no session waits for, are committed before the writer closes."""
    enqueuer, sessions, database = one_per_group
    fd = os.open(f"{database.sqlite_path}.writelock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        await enqueuer.record(accepted("qlast1"))        # taken by the writer, held up by the lock
        await asyncio.sleep(0.1)
        await enqueuer.record(accepted("qlast2"))        # waiting for the next group
        stopping = asyncio.ensure_future(enqueuer.stop())
        await asyncio.sleep(0.2)
        fcntl.flock(fd, fcntl.LOCK_UN)
        await asyncio.wait_for(stopping, 10)
    finally:
        os.close(fd)
    assert sorted(i["id"] for i in await list_items(sessions)) == ["qlast1", "qlast2"]
