"""The volume cap's day count while serving (``Store._proactive_today``): read from the database
at most every ``_COUNT_FRESH`` seconds far from the cap, new rows only between two whole-day
counts, one read per seller at a time; on SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import dbtest
import pytest

from bsm_relay.relay import db, store
from bsm_relay.relay.factcache import FactsCache
from bsm_relay.relay.models import MessageLog
from bsm_relay.relay.store import Store

DAY = 1_800_000_000.0        # the UTC midnight the counts start from


class CountingReads(db.Reads):
    """The serving relay's reads, counting what the day count reads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.counts: list[str] = []

    async def all(self, stmt, params=None):  # type: ignore[no-untyped-def]
        text = str(stmt)
        if "message_log" in text:
            self.counts.append("new rows" if "message_log.id >" in text else "whole day")
        return await super().all(stmt, params)


@pytest.fixture
async def serving(tmp_path):
    async with dbtest.serving_reads(tmp_path, CountingReads) as (reads, sessions):
        yield Store(sessions, FactsCache(reads)), sessions, reads


async def add_rows(sessions, n: int, *, seller: int = 1, at: float = DAY + 60, proactive: bool = True,
                   decision: str = "accepted") -> None:
    async with sessions.begin() as s:
        s.add_all([MessageLog(at=at, session_id="s", seller_id=seller, decision=decision, proactive=proactive)
                   for _ in range(n)])


async def test_far_from_the_cap_only_new_rows_are_read_between_whole_day_counts(serving, monkeypatch):
    st, sessions, reads = serving
    clock = [1000.0]
    monkeypatch.setattr(store, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    await add_rows(sessions, 30)
    await add_rows(sessions, 5, proactive=False)               # replies: not counted
    await add_rows(sessions, 4, decision="refused")            # refused: not counted
    await add_rows(sessions, 3, at=DAY - 10)                   # yesterday
    await add_rows(sessions, 6, seller=2)                      # another seller
    assert await st._proactive_today(1, DAY, 1000) == 30
    assert reads.counts == ["whole day"]
    # Within _COUNT_FRESH: no read; this process's own acceptances are added as they commit.
    await add_rows(sessions, 1)
    st.note_proactive(1, DAY + 61)
    assert await st._proactive_today(1, DAY, 1000) == 31 and reads.counts == ["whole day"]
    # Another process accepted 7 more: the next read takes only the rows after the last one seen
    # (and the one this process noted is now read back, not counted twice).
    await add_rows(sessions, 7)
    clock[0] += store._COUNT_FRESH
    assert await st._proactive_today(1, DAY, 1000) == 38
    assert reads.counts == ["whole day", "new rows"]
    # Past _FULL_RECOUNT the whole day is counted again.
    clock[0] += store._FULL_RECOUNT
    assert await st._proactive_today(1, DAY, 1000) == 38
    assert reads.counts == ["whole day", "new rows", "whole day"]
    # A new day starts from a whole count of that day.
    clock[0] += store._COUNT_FRESH
    await add_rows(sessions, 2, at=DAY + 86_400 + 5)
    assert await st._proactive_today(1, DAY + 86_400, 1000) == 2
    assert reads.counts[-1] == "whole day"


async def test_near_the_cap_every_message_reads_and_the_count_stops_past_the_cap(serving, monkeypatch):
    st, sessions, reads = serving
    monkeypatch.setattr(store, "time", SimpleNamespace(monotonic=lambda: 1000.0, time=time.time))  # still
    await add_rows(sessions, 12)
    assert await st._proactive_today(1, DAY, 20) == 12
    await add_rows(sessions, 1)
    assert await st._proactive_today(1, DAY, 20) == 13        # within the margin: read again
    assert len(reads.counts) == 2
    await add_rows(sessions, 30)
    assert await st._proactive_today(1, DAY, 20) > 20        # over the cap, whatever the figure


async def test_messages_asking_at_once_share_one_read(serving):
    st, sessions, reads = serving
    await add_rows(sessions, 9)
    counts = await asyncio.gather(*(st._proactive_today(1, DAY, 1000) for _ in range(20)))
    assert counts == [9] * 20
    assert reads.counts == ["whole day"]
