"""Large accepted messages handed to the serving process's delivery (``Deliverer.hand_off``): inserted
already leased, delivered from memory once committed, without a claim or a poll; queued as
usual when no worker is free; a failed commit gives its workers back."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import dbtest
import pytest
from delivery_harness import ALIASES, BUYERS, body, sessions, settings_for  # noqa: F401
from helpers import Sink

from bsm_relay.relay.delivery import HAND_OFF_MIN, Deliverer, SmarthostTarget
from bsm_relay.relay.models import QueueItem, QueueRecipient
from bsm_relay.relay.queue import Accepted, Enqueuer, StorageError, list_items, row


@pytest.fixture
def sink():
    with Sink() as s:
        yield s


def accepted(qid: str, address: str = BUYERS[0], alias: str = ALIASES[0], large: bool = True) -> Accepted:
    now = time.time()
    data = body(qid, address) + (b"x" * 78 + b"\r\n") * (HAND_OFF_MIN // 80 + 1 if large else 0)
    return Accepted(
        items=[row(QueueItem, id=qid, kind="forward", envelope_from="b-x@marketplace.example",
                   origin_sender="seller@acme.example", body=data, size=len(data), created_at=now,
                   next_attempt_at=now, attempts=0, status="queued", session_id="s1")],
        recipients=[row(QueueRecipient, queue_id=qid, address=address, alias=alias, status="pending")])


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
async def running(tmp_path, sink, sessions):  # noqa: F811
    """An enqueuer and one delivery worker that never polls and is never woken: only what is
    handed off can reach the sink."""
    settings = settings_for(tmp_path, sink.port)
    settings = dataclasses.replace(settings, delivery=dataclasses.replace(
        settings.delivery, workers=1, poll_interval=3600.0))
    enqueuer = Enqueuer(sessions)
    enqueuer.start()
    deliverer = Deliverer(settings, sessions, SmarthostTarget(settings), asyncio.Event(), writer=enqueuer)
    deliverer.start()
    await asyncio.sleep(0.1)          # past its first (empty) claim
    yield enqueuer, deliverer
    await deliverer.stop()
    await enqueuer.stop()


async def delivered(sessions, qid: str) -> bool:  # noqa: F811
    rows = {r["id"]: r for r in await list_items(sessions, include_done=True)}
    return qid in rows and rows[qid]["status"] == "done"


async def test_a_handed_off_message_is_delivered_without_a_claim_or_a_poll(running, sink, sessions):  # noqa: F811
    enqueuer, deliverer = running
    acc = accepted("qhand1")
    deliverer.hand_off(acc)
    assert acc.leased and acc.items[0].values["lease_owner"] == deliverer.owner
    await enqueuer.commit(acc)
    await until(lambda: delivered(sessions, "qhand1"))
    assert [m.rcpt_tos for m in sink.messages] == [[BUYERS[0]]]
    assert sink.messages[0].data.endswith(acc.items[0].values["body"][-400:])
    rows = await list_items(sessions, include_done=True)
    assert rows[0]["attempts"] == 1 and rows[0]["recipients"][0]["status"] == "delivered"


async def test_with_every_worker_busy_the_message_is_queued_unleased(running, sessions):  # noqa: F811
    _, deliverer = running
    first, second = accepted("qbusy1"), accepted("qbusy2")
    deliverer.hand_off(first)           # takes the one worker until its commit settles
    deliverer.hand_off(second)
    assert first.leased and not second.leased
    assert "lease_owner" not in second.items[0].values


async def test_a_small_message_is_queued_unleased(running):
    # Below HAND_OFF_MIN, among other messages being taken in, the claim's rewrite of the row is
    # cheap and its batching measured faster.
    _, deliverer = running
    small = accepted("qsmall", large=False)
    deliverer.hand_off(small)
    assert not small.leased and "lease_owner" not in small.items[0].values


async def test_a_small_message_alone_is_handed_off(running, sink, sessions):  # noqa: F811
    # Alone in intake there is no group to delay and no batch to lose: the claim would only be
    # one more transaction (docs/decisions/0022).
    enqueuer, deliverer = running
    small = accepted("qalone", large=False)
    deliverer.hand_off(small, True)
    assert small.leased and small.items[0].values["lease_owner"] == deliverer.owner
    await enqueuer.commit(small)
    await until(lambda: delivered(sessions, "qalone"))      # no poll, no wake-up: the hand-off delivered it
    assert [m.rcpt_tos for m in sink.messages] == [[BUYERS[0]]]


async def test_a_failed_commit_gives_the_worker_back(running, sink, sessions):  # noqa: F811
    enqueuer, deliverer = running
    ok = accepted("qdup")
    deliverer.hand_off(ok)
    await enqueuer.commit(ok)
    await until(lambda: delivered(sessions, "qdup"))
    again = accepted("qdup")             # the same queue id: the INSERT fails
    deliverer.hand_off(again)
    assert again.leased
    with pytest.raises(StorageError):
        await enqueuer.commit(again)
    # Were the failed message's worker still promised, this one would be queued unleased, and
    # nothing here would ever claim it (no poll, no wake-up).
    after = accepted("qafter", BUYERS[1], ALIASES[1])
    deliverer.hand_off(after)
    assert after.leased
    await enqueuer.commit(after)
    await until(lambda: delivered(sessions, "qafter"))
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted([BUYERS[0], BUYERS[1]])


@pytest.mark.skipif(dbtest.on_postgres(), reason="SQLite's statements (PostgreSQL's go through SQLAlchemy's cache)")
async def test_groups_of_outcomes_reuse_their_compiled_statements(running, sink, sessions):  # noqa: F811
    # On SQLite the group's statements are compiled once and kept; a statement built anew per group
    # (the delivery events' INSERT was) missed that cache every time: a compilation per group and
    # one more cache entry per group for as long as the process ran.
    from bsm_relay.relay import queue
    enqueuer, deliverer = running
    for n in range(4):
        acc = accepted(f"qstmt{n}")
        deliverer.hand_off(acc)
        await enqueuer.commit(acc)
        await until(lambda n=n: delivered(sessions, f"qstmt{n}"))
        if n == 0:
            kept = len(queue._SQLITE_STATEMENTS)
    assert len(sink.messages) == 4
    assert len(queue._SQLITE_STATEMENTS) == kept
