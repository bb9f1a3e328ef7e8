"""Queue backpressure end to end: past ``[queue] max_depth`` waiting items MAIL FROM gets a
temporary refusal, and once delivery catches up mail is accepted again.

The relay runs as in production (``bsm-relay serve``); its downstream is a recording SMTP
server that is down at first (nothing listens on its port) and comes back later.
"""

from __future__ import annotations

import asyncio
import json
import time

from delivery_harness import ALIASES, BUYERS, enqueue, sessions  # noqa: F401 - sessions is a fixture
from helpers import RelayProcess, Sink, make_relay, message
from sqlalchemy import update

from bsm_relay.config.settings import load
from bsm_relay.relay.backpressure import HOLD, REFRESH, QueueDepth
from bsm_relay.relay.models import QueueItem
from bsm_relay.relay.server import Running, open_relay

SELLER = "seller@acme.example"
BUYER = "buyer@example.org"
ORDER = "111-2223334-4445556"


def setup_pair(relay: RelayProcess) -> str:
    """Seller S1 and buyer B1 with one order; returns the seller alias the buyer writes to."""
    relay.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    relay.cli("buyer", "add", "B1", "--email", BUYER)
    relay.cli("order", "add", ORDER, "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    return json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)["seller_alias"]


def set_queue(relay: RelayProcess, line: str) -> None:
    """Add a key to the ``[queue]`` table of the relay's configuration (read at ``serve``)."""
    relay.config.write_text(relay.config.read_text().replace("[queue]\n", f"[queue]\n{line}\n", 1))


def reply_from_buyer(alias: str, n: int) -> bytes:
    return message(BUYER, alias, subject=f"Re: Your order {ORDER} ({n})", body=f"Reply number {n}.\r\n")


def test_full_queue_refuses_mail_from_until_delivery_catches_up(tmp_path):
    sink = Sink()                 # not started yet: the downstream is down
    relay = make_relay(tmp_path, sink_port=sink.port)
    set_queue(relay, "max_depth = 5")
    alias = setup_pair(relay)
    relay.start()
    try:
        with relay.smtp() as client:
            for n in range(5):
                client.sendmail(BUYER, [alias], reply_from_buyer(alias, n))
            # The sixth: the queue holds five items that cannot be delivered.
            code, text = client.mail(BUYER)
            assert (code, text.decode()[:5]) == (452, "4.3.1"), (code, text)
            assert b"try again later" in text
            # No transaction was started: RCPT needs a MAIL first, nothing can be queued.
            assert client.rcpt(alias)[0] == 503
            client.rset()
        waiting = json.loads(relay.cli("queue", "list", "--json").stdout)
        assert len(waiting) == 5, waiting

        with sink:                # the downstream comes back
            sink.wait_for(5, timeout=60)
            # The depth is recounted about once a second: acceptance resumes shortly after.
            deadline = time.monotonic() + 30
            with relay.smtp() as client:
                while True:
                    code, text = client.mail(BUYER)
                    if code == 250:
                        break
                    assert (code, text.decode()[:5]) == (452, "4.3.1"), (code, text)
                    assert time.monotonic() < deadline, "mail still refused after the queue drained"
                    time.sleep(0.2)
                assert client.rcpt(alias)[0] == 250
                assert client.data(reply_from_buyer(alias, 5))[0] == 250
            delivered = sink.wait_for(6, timeout=30)
        subjects = sorted(m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in delivered)
        assert subjects == sorted(f"Re: Your order {ORDER} ({n})".encode() for n in range(6))
    finally:
        relay.stop()
    log = [json.loads(line) for line in relay.log().splitlines() if line.startswith("{")]
    refusals = [e for e in log if e.get("event") == "smtp.rejected" and e.get("reason") == "queue.full"]
    assert refusals and all(e["stage"] == "mail" for e in refusals)
    states = [e["state"] for e in log if e.get("event") == "queue.backpressure"]
    assert states[:2] == ["on", "off"], states
    assert "Traceback" not in relay.log()
    # The buyer's real address never reaches the log.
    assert BUYER not in relay.log()


# -- the depth gauge itself, on the test database (SQLite or PostgreSQL), with a fake clock --------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_gauge_admits_up_to_the_limit_counting_its_own_admissions(sessions):
    for n in range(3):
        await enqueue(sessions, f"qbp{n}", [(BUYERS[0], ALIASES[0])])
    clock = Clock()
    gauge = QueueDepth(sessions, clock=clock)
    # Three rows waiting, limit 5: two more transactions may start before the next count.
    assert [await gauge.admit(5) for _ in range(4)] == [True, True, False, False]
    assert gauge.depth == 5
    # Rows delivered meanwhile: the next count (a second later) sees fewer, but admissions since
    # (about) that count still count, so a burst cannot run past the limit between two counts.
    async with sessions.begin() as s:
        await s.execute(update(QueueItem).where(QueueItem.id.in_(["qbp0", "qbp1"])).values(status="done"))
    clock.now += REFRESH
    assert not await gauge.admit(5)          # starts the count, answers from the cached figure
    await gauge.settle()
    assert gauge.depth == 1 + 2              # one row left, two admissions not yet old enough
    assert await gauge.admit(5) and await gauge.admit(5) and not await gauge.admit(5)
    # Long after: only the rows count (held items too: they wait on the disk as well).
    async with sessions.begin() as s:
        await s.execute(update(QueueItem).where(QueueItem.id == "qbp2").values(status="hold"))
    clock.now += REFRESH + HOLD + 1
    await gauge.admit(5)
    await gauge.settle()
    clock.now += REFRESH
    await gauge.admit(5)
    await gauge.settle()
    assert gauge.depth == 1 + 1              # the held row and the last admission


async def test_gauge_limit_zero_never_refuses(sessions):
    for n in range(3):
        await enqueue(sessions, f"qz{n}", [(BUYERS[0], ALIASES[0])])
    gauge = QueueDepth(sessions)
    assert all([await gauge.admit(0) for _ in range(1000)])
    assert await gauge.admit(4) and not await gauge.admit(4)


async def test_drain_waits_for_a_queue_count_a_session_left_behind(tmp_path):
    # The count a MAIL starts is shared and outlives its session; a stop that did not wait for it
    # would cut its connection's rollback off at exit ("Exception during reset" in the log).
    relay = await open_relay(load(str(make_relay(tmp_path).config)))
    try:
        running = Running(relay, None)
        gauge = running.handler.queue_depth
        first_mail = asyncio.create_task(gauge.admit(5))
        await asyncio.sleep(0)
        assert gauge._refresh is not None and not gauge._refresh.done()   # the count is running
        await running.drain(5.0)
        assert gauge._refresh is None           # drain returned after the count ended
        assert await first_mail                 # and the MAIL waiting on it had its answer
    finally:
        await relay.engine.dispose()
