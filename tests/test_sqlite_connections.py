"""The relay's SQLite connections: ``Reads.at_once`` reads the facts counter right on the event
loop (no thread hand-off) and never waits for a lock, the facts cache falls back to the shared
read otherwise; every connection's pragmas (durability, freed pages not zeroed)."""

from __future__ import annotations

import sqlite3
import threading

import dbtest
import pytest
from sqlalchemy import create_engine, update

from bsm_relay.relay import db
from bsm_relay.relay.factcache import _GENERATION_SQL, FactsCache
from bsm_relay.relay.models import FactsGeneration


@pytest.fixture
async def reads(tmp_path):
    async with dbtest.serving_reads(tmp_path) as (r, sessions):
        yield r, sessions


async def bump(sessions) -> None:  # type: ignore[no-untyped-def]
    async with sessions.begin() as s:
        await s.execute(update(FactsGeneration).values(value=FactsGeneration.value + 1))


async def test_the_counter_is_read_here_on_sqlite_and_follows_every_commit(reads):
    r, sessions = reads
    if dbtest.on_postgres():               # PostgreSQL: nothing is read on the loop
        assert r.at_once(_GENERATION_SQL) is None
        return
    first = r.at_once(_GENERATION_SQL)
    assert first is not None
    await bump(sessions)
    assert r.at_once(_GENERATION_SQL) == [(first[0][0] + 1,)]


def test_a_locked_database_is_not_waited_for(tmp_path):
    path = tmp_path / "locked.db"
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE facts_generation (id INTEGER PRIMARY KEY, value INTEGER)")
    setup.execute("INSERT INTO facts_generation VALUES (1, 1)")
    setup.commit()
    setup.close()
    # Another connection takes the database for itself (exclusive locking mode holds the WAL
    # index too) and lets go a second later: had the read waited (a busy timeout), it would have
    # returned the row after that second instead of giving up at once.
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE facts_generation SET value = 2")
    holder.execute("COMMIT")
    reads = db.Reads(None, create_engine(f"sqlite:///{path}"))  # type: ignore[arg-type]
    release = threading.Timer(1.0, holder.close)
    release.start()
    try:
        assert reads.at_once(_GENERATION_SQL) is None
    finally:
        release.join()
    assert reads.at_once(_GENERATION_SQL) == [(2,)]      # free again: read here once more
    reads.close()


async def test_the_cache_uses_the_shared_read_when_the_loop_read_gives_up(reads, monkeypatch):
    r, sessions = reads
    monkeypatch.setattr(r, "at_once", lambda sql: None)
    cache = FactsCache(r)
    await cache.refresh()
    before = cache.generation
    await bump(sessions)
    await cache.refresh()
    assert cache.generation == before + 1


async def test_every_relay_connection_is_durable_and_does_not_zero_freed_pages(tmp_path):
    # WAL + synchronous=FULL: a committed row is on disk before the 250.  secure_delete=FAST
    # (decision 0017): a delivered body cut to its header block frees its overflow pages without
    # writing them again as zeros (Debian's SQLite zeroes them by default: 1).
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    engine = db.make_engine(url)
    sync = db.make_sync_writer_engine(url)
    assert sync is not None
    try:
        await db.migrate(engine)
        async with engine.connect() as conn:
            seen = [(await conn.exec_driver_sql(f"PRAGMA {p}")).scalar() for p in
                    ("journal_mode", "synchronous", "secure_delete")]
        with sync.connect() as conn:
            seen_sync = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in
                         ("journal_mode", "synchronous", "secure_delete")]
    finally:
        await engine.dispose()
        sync.dispose()
    assert seen == seen_sync == ["wal", 2, 2]        # FULL is 2; FAST is 2
