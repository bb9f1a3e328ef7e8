"""Spool segments (``relay/segments.py``, docs/decisions/0026): a group's large bodies appended
to the writer's segment before the write lock, the rows holding header blocks; read back by the
claim path; a segment removed once its messages are done; segments and spool files no
undelivered row names swept."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dbtest
import dkim
import pytest
from helpers import DEMO_SELLER, Sink, make_relay, seed_pair, until
from sqlalchemy import select, update
from test_commit_stats import serving_writer

from bsm_relay.relay import db, history, segments, spool
from bsm_relay.relay.models import QueueItem, QueueRecipient
from bsm_relay.relay.queue import Accepted, StorageError, claim, list_items, row
from bsm_relay.relay.segments import SegmentLog


def big(qid: str, size: int = 100_000, spool_path: str | None = None) -> dict:
    head = f"From: a@example.com\r\nSubject: {qid}\r\n\r\n".encode()
    line = f".{qid} line with  spaces\r\n".encode()
    body = head + line * ((size - len(head)) // len(line) + 1)
    return {"id": qid, "kind": "forward", "envelope_from": "b-x@marketplace.example", "origin_sender": None,
            "body": body, "size": len(body), "created_at": time.time(), "next_attempt_at": time.time(),
            "attempts": 0, "status": "queued", "session_id": "s1", "spool_path": spool_path}


def seg_files(state: Path) -> list[str]:
    return sorted(p.name for p in state.rglob("*.seg"))


# -- the segment log on its own -----------------------------------------------------------

def test_a_groups_large_bodies_are_appended_and_their_rows_hold_the_header_block(tmp_path):
    log = SegmentLog(tmp_path, minimum=50_000, maximum=1_000_000)
    small = big("qsmall", 10_000)
    own_file = big("qown", 90_000, spool_path="spool/h/qown.eml")
    one, two = big("qone"), big("qtwo", 150_000)
    kept = {k: dict(v) for k, v in (("one", one), ("two", two))}
    instead = log.stage([small, one, own_file, two])
    assert set(instead) == {id(one), id(two)}                    # only large bodies without a file of their own
    assert (one, two) == (kept["one"], kept["two"])              # what delivery sends from memory is untouched
    rows = [instead[id(one)], instead[id(two)]]
    assert [r["spool_offset"] for r in rows] == [0, len(one["body"])]
    for r, values in zip(rows, (one, two), strict=True):
        assert values["body"].startswith(r["body"]) and r["body"].endswith(b"\r\n\r\n")
        assert len(r["body"]) < 100 and r["spool_path"].endswith(".seg") and r["size"] == len(values["body"])
        assert segments.read(tmp_path, r["spool_path"], r["spool_offset"], r["size"]) == values["body"]
    # A second group goes on in the same segment, after the first.
    three = big("qthree")
    again = log.stage([three])[id(three)]
    assert again["spool_path"] == rows[0]["spool_path"]
    assert again["spool_offset"] == len(one["body"]) + len(two["body"])
    assert oct(os.stat(tmp_path / again["spool_path"]).st_mode & 0o777) == "0o600"


def test_a_segment_goes_once_every_message_in_it_is_done(tmp_path):
    log = SegmentLog(tmp_path, minimum=50_000, roll_bytes=150_000)
    a, b = big("qa"), big("qb")
    first = log.stage([a, b])[id(a)]["spool_path"]
    c = big("qc")
    second = log.stage([c])[id(c)]["spool_path"]          # the first was full: sealed, a new one begun
    assert first != second and len(seg_files(tmp_path)) == 2
    log.release("qa")
    assert (tmp_path / first).exists()                    # qb is not done yet
    log.release("qb")
    assert not (tmp_path / first).exists()
    log.release("qc")
    assert (tmp_path / second).exists()                   # still being written to: never removed
    log.seal_idle()
    assert (tmp_path / second).exists()                   # younger than its age limit
    log._roll_age = 0.0
    log.seal_idle()
    assert seg_files(tmp_path) == []


def test_the_databases_answer_settles_what_this_process_did_not_see_done(tmp_path):
    log = SegmentLog(tmp_path, minimum=50_000, roll_age=0.0, check_after=0.0)
    a, b = big("qa"), big("qb")
    path = log.stage([a, b])[id(a)]["spool_path"]
    log.seal_idle()
    assert log.waiting() == {path: ["qa", "qb"]}
    log.settle(path, ["qb"])          # qa was delivered by another process (or never committed)
    assert (tmp_path / path).exists()
    # qb is still queued: not asked about again at once, but later and less and less often.
    assert log.waiting() == {}
    segment = log._sealed[path]
    assert segment.check_every == 2 * segments.CHECK_AFTER
    segment.check_at = 0.0
    assert log.waiting() == {path: ["qb"]}
    log.settle(path, ["qb"])
    assert segment.check_every == 4 * segments.CHECK_AFTER
    segment.check_at = 0.0
    log.settle(path, [])
    assert not (tmp_path / path).exists() and log.waiting() == {}


def test_a_failed_write_fails_the_group_and_the_next_group_starts_a_new_segment(tmp_path, monkeypatch):
    log = SegmentLog(tmp_path, minimum=50_000)
    a = big("qa")
    first = log.stage([a])[id(a)]["spool_path"]

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fdatasync", full)
    with pytest.raises(OSError):
        log.stage([big("qb")])
    monkeypatch.undo()
    c = big("qc")
    second = log.stage([c])[id(c)]
    assert second["spool_path"] != first and second["spool_offset"] == 0
    assert segments.read(tmp_path, second["spool_path"], 0, second["size"]) == c["body"]


def test_a_short_segment_is_an_error_not_a_short_message(tmp_path):
    log = SegmentLog(tmp_path, minimum=50_000)
    a = big("qa")
    r = log.stage([a])[id(a)]
    with pytest.raises(OSError, match="short"):
        segments.read(tmp_path, r["spool_path"], r["spool_offset"] + 10, r["size"])


def test_a_messages_own_removal_never_takes_a_segment(tmp_path):
    """``queue delete``, a failed acceptance and a delivered message remove their own spool
    file; a segment holds other messages and goes only through its writer or the sweep."""
    directory = tmp_path / spool.SPOOL_DIR / spool.host_dir()
    directory.mkdir(parents=True)
    seg, eml = f"{spool.host_prefix()}1-a.seg", f"{spool.host_prefix()}q1-b.eml"
    for relative in (seg, eml):
        (tmp_path / relative).write_bytes(b"x")
    spool.remove(tmp_path, seg)
    spool.remove(tmp_path, eml)
    assert (tmp_path / seg).exists() and not (tmp_path / eml).exists()
    spool.remove_file(tmp_path, seg)
    assert not (tmp_path / seg).exists()


# -- the serving writer -------------------------------------------------------------------

async def test_the_writer_stages_large_bodies_and_the_claim_reads_them_back(tmp_path):
    state = tmp_path / "state"
    log = SegmentLog(state, maximum=1_000_000)
    async with serving_writer(tmp_path, segments=log) as (enqueuer, sessions, database):
        values = big("qbig1")
        message = values["body"]
        await enqueuer.commit(_accepted(values))
        assert values["body"] == message
        async with sessions() as s:
            stored = (await s.execute(select(QueueItem.body, QueueItem.spool_path, QueueItem.spool_offset,
                                             QueueItem.size).where(QueueItem.id == "qbig1"))).one()
        [got] = await claim(enqueuer, "test-owner", 10, 60.0)
    if database.is_postgres:
        # PostgreSQL keeps bodies in rows: any node may deliver them.
        assert stored.body == message and stored.spool_path is None and got.spool_span is None
        assert seg_files(tmp_path) == []
        return
    assert stored.size == len(message) and len(stored.body) < 100 and message.startswith(stored.body)
    assert stored.spool_path.endswith(".seg") and stored.spool_offset == 0
    assert got.spool_path == stored.spool_path and got.spool_span == (0, len(message))
    assert segments.read(state, got.spool_path, *got.spool_span) == message
    # At stop the segment is sealed but stays: its message is not delivered.
    assert seg_files(state) == [Path(stored.spool_path).name]


async def test_the_writer_asks_the_database_about_messages_another_process_delivered(tmp_path):
    """The writer's upkeep: a sealed segment whose messages this process never saw done goes
    once the database has them all done (another worker delivered them), not before."""
    if dbtest.on_postgres():
        pytest.skip("PostgreSQL keeps bodies in rows: no segment")
    state = tmp_path / "state"
    log = SegmentLog(state, roll_age=0.0, check_after=0.0)
    async with serving_writer(tmp_path, segments=log) as (enqueuer, sessions, _):
        await asyncio.gather(*(enqueuer.commit(_accepted(big(f"qother{n}"))) for n in range(2)))
        [name] = seg_files(state)
        await asyncio.sleep(2.5)              # sealed and asked about: both still queued
        assert seg_files(state) == [name]
        async with sessions.begin() as s:     # another process delivers one, then the other
            await s.execute(update(QueueItem).where(QueueItem.id == "qother0").values(status="done"))
        log._sealed[f"{spool.host_prefix()}{name}"].check_at = 0.0
        await asyncio.sleep(1.5)
        assert seg_files(state) == [name]
        async with sessions.begin() as s:
            await s.execute(update(QueueItem).where(QueueItem.id == "qother1").values(status="done"))
        log._sealed[f"{spool.host_prefix()}{name}"].check_at = 0.0
        await until_async(lambda: seg_files(state) == [], "the segment to go")


async def until_async(condition, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_a_spool_disk_that_fails_fails_the_group_as_storage_trouble(tmp_path, monkeypatch):
    """The segment cannot be written (disk full): the sessions get StorageError (451 4.3.0, as for
    a full database, catalogue D3) and nothing is committed; the next group goes through."""
    if dbtest.on_postgres():
        pytest.skip("PostgreSQL keeps bodies in rows: no segment to fail")
    state = tmp_path / "state"
    async with serving_writer(tmp_path, segments=SegmentLog(state)) as (enqueuer, sessions, _):
        real = os.fdatasync

        def full(fd: int) -> None:
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(os, "fdatasync", full)
        results = await asyncio.gather(*(enqueuer.commit(_accepted(big(f"qfull{n}"))) for n in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, StorageError) and "No space left" in str(r) for r in results), results
        monkeypatch.setattr(os, "fdatasync", real)
        await enqueuer.commit(_accepted(big("qafter")))
        assert [i["id"] for i in await list_items(sessions)] == ["qafter"]


async def test_the_segment_write_is_not_counted_as_waiting_for_the_write_lock(tmp_path, monkeypatch):
    """``bsm_relay_queue_write_lock_wait_seconds`` tells an operator that the workers queue for
    the database: the segment's write, before the lock is asked for, is not part of it."""
    if dbtest.on_postgres():
        pytest.skip("PostgreSQL keeps bodies in rows: no segment")
    async with serving_writer(tmp_path, segments=SegmentLog(tmp_path / "state")) as (enqueuer, _, _):
        real = os.fdatasync

        def slow(fd: int) -> None:
            time.sleep(0.3)
            real(fd)
        monkeypatch.setattr(os, "fdatasync", slow)
        await enqueuer.commit(_accepted(big("qslow")))
        assert enqueuer.stats.groups == 1 and enqueuer.stats.lock_wait < 0.2


def _accepted(values: dict) -> Accepted:
    return Accepted(items=[row(QueueItem, **values)],
                    recipients=[row(QueueRecipient, queue_id=values["id"], address="buyer@example.org",
                                    alias="b-1@marketplace.example", status="pending")])


# -- the sweep ----------------------------------------------------------------------------

async def test_the_sweep_removes_old_files_no_undelivered_row_names(tmp_path):
    """``history.sweep_spool``: old spool files and segments go unless a row that is not done
    names them; young ones stay (an acceptance or a writer may be at work on them)."""
    state = tmp_path / "state"
    directory = state / spool.SPOOL_DIR / spool.host_dir()
    directory.mkdir(parents=True)
    names = {n: f"{spool.host_prefix()}{n}" for n in ("queued.seg", "done.seg", "orphan.seg", "young.seg",
                                                       "queued.eml", "orphan.eml")}
    # Written under another host name: this relay's own on SQLite (a renamed host), another
    # node's on PostgreSQL (left alone).
    (state / spool.SPOOL_DIR / "old-name").mkdir(parents=True)
    names["renamed.seg"] = f"{spool.SPOOL_DIR}/old-name/renamed.seg"
    for relative in names.values():
        (state / relative).write_bytes(b"x")
    hour_ago = time.time() - 2 * history.ORPHAN_AGE
    for n, relative in names.items():
        if n != "young.seg":
            os.utime(state / relative, (hour_ago, hour_ago))
    database = dbtest.fresh(tmp_path)
    engine = database.engine()
    await db.migrate(engine)
    sessions = db.sessionmaker(engine)
    try:
        async with sessions.begin() as s:
            for qid, relative, status in (("q1", names["queued.seg"], "queued"), ("q2", names["done.seg"], "done"),
                                          ("q3", names["queued.eml"], "hold")):
                values = big(qid, 100)
                values.update(spool_path=relative, status=status)
                s.add(QueueItem(**values))
        relay = types.SimpleNamespace(settings=types.SimpleNamespace(state_dir=state), sessions=sessions)
        assert await history.sweep_spool(relay) == (3 if database.is_postgres else 4)
    finally:
        await engine.dispose()
        await database.adrop()
    left = sorted(p.name for p in directory.iterdir())
    assert left == ["queued.eml", "queued.seg", "young.seg"]
    assert (state / names["renamed.seg"]).exists() == database.is_postgres


# -- over SMTP ----------------------------------------------------------------------------

def _queue_spool(relay) -> list[tuple]:  # type: ignore[no-untyped-def]
    return relay.database.query("SELECT spool_path, spool_offset, status, attempts FROM queue ORDER BY created_at")


def _arrived_whole(got: list, sent: list[bytes]) -> None:
    """Every message arrived once, its body byte for byte (headers are the relay's rewrite)."""
    bodies = sorted(m.data.split(b"\r\n\r\n", 1)[1] for m in got)
    assert bodies == sorted(m.split(b"\r\n\r\n", 1)[1] for m in sent)


def _segment_messages(alias: str, count: int) -> list[bytes]:
    from test_e2e_speed import _spooled_message
    return [_spooled_message(alias).replace(b"Subject: Spooled", b"Subject: Segment %d," % n) for n in range(count)]


def test_large_messages_go_through_a_segment_arrive_whole_and_the_segment_goes(tmp_path):
    with Sink() as sink:
        relay = make_relay(tmp_path, sink_port=sink.port)
        record = json.loads(relay.cli("init", "--json").stdout)["dkim_txt_record"]
        alias = seed_pair(relay)["buyer_alias"]
        sent = _segment_messages(alias, 12)
        relay.start()
        try:
            def send(batch: list[bytes]) -> None:
                with relay.smtp() as c:
                    for m in batch:
                        c.sendmail(DEMO_SELLER, [alias], m)
            with ThreadPoolExecutor(3) as pool:          # three sessions at once: groups of several
                list(pool.map(send, [sent[0::3], sent[1::3], sent[2::3]]))
            got = sink.wait_for(12)
            _arrived_whole(got, sent)
            assert all(dkim.verify(m.data, dnsfunc=lambda name, timeout=5: record["value"].encode()) for m in got)
            rows = _queue_spool(relay)
            assert len(rows) == 12
            if relay.database.is_postgres:
                assert all(p is None and o is None for p, o, _, _ in rows)
            else:
                assert all(p.endswith(".seg") and o is not None for p, o, _, _ in rows)
                until(lambda: seg_files(tmp_path / "state") == [] or None, "the delivered segments to go", 15)
        finally:
            assert relay.stop() == 0


def test_a_deferred_segment_message_is_claimed_from_its_segment(tmp_path):
    """Not delivered while in memory (the sink is down): the claim path reads it from the
    segment, and once it is done the segment goes."""
    sink = Sink()                                        # down for now
    relay = make_relay(tmp_path, sink_port=sink.port)
    alias = seed_pair(relay)["buyer_alias"]
    sent = _segment_messages(alias, 3)
    relay.start()
    try:
        with relay.smtp() as c:
            for m in sent:
                c.sendmail(DEMO_SELLER, [alias], m)
        until(lambda: all(a >= 1 for *_, a in _queue_spool(relay)) or None, "a failed first attempt each")
        if not relay.database.is_postgres:
            assert len(seg_files(tmp_path / "state")) >= 1
        with sink:
            relay.cli("queue", "flush")
            _arrived_whole(sink.wait_for(3, timeout=30), sent)
            until(lambda: all(s == "done" for _, _, s, _ in _queue_spool(relay)) or None, "the items done")
            until(lambda: seg_files(tmp_path / "state") == [] or None, "the segment to go", 15)
    finally:
        assert relay.stop() == 0


def test_segment_messages_survive_kill_9_after_their_250(tmp_path):
    sink = Sink()                                        # down: nothing is delivered before the crash
    relay = make_relay(tmp_path, sink_port=sink.port)
    alias = seed_pair(relay)["buyer_alias"]
    sent = _segment_messages(alias, 3)
    relay.start()
    with relay.smtp() as c:
        for m in sent:
            c.sendmail(DEMO_SELLER, [alias], m)
    relay.stop(signal.SIGKILL)
    if not relay.database.is_postgres:
        assert len(seg_files(tmp_path / "state")) >= 1
        assert all(p.endswith(".seg") for p, *_ in _queue_spool(relay))
    with sink:
        relay.start()
        try:
            _arrived_whole(sink.wait_for(3, timeout=60), sent)
        finally:
            assert relay.stop() == 0
