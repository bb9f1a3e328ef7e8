"""Shared harness for the delivery tests: a migrated throwaway database, rows queued the way
intake queues them, and real ``Deliverer`` workers run until a condition holds."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from pathlib import Path

import dbtest
import pytest

from bsm_relay.config.settings import DeliverySettings, QueueSettings, Settings, SmtpSettings, StorageSettings
from bsm_relay.relay import db
from bsm_relay.relay.delivery import Deliverer, SmarthostTarget
from bsm_relay.relay.models import QueueItem, QueueRecipient
from bsm_relay.relay.queue import list_items

SELLER = "seller@acme.example"
BUYERS = ["bea@buyers.example", "bob@buyers.example", "cat@buyers.example"]
ALIASES = ["tok1@marketplace.example", "tok2@marketplace.example", "tok3@marketplace.example"]


def settings_for(tmp_path: Path, sink_port: int, **queue: float) -> Settings:
    q = dict(min_backoff=1, max_backoff=1, max_lifetime=3600, delay_warning=0, lease=60, max_errors=3)
    q.update(queue)
    return Settings(
        smtp=SmtpSettings(hostname="mx.relay.test"),
        storage=StorageSettings(state_dir=str(tmp_path)),
        delivery=DeliverySettings(mode="smarthost", smarthost=f"127.0.0.1:{sink_port}", smarthost_tls="off",
                                  poll_interval=0.05, workers=8),
        queue=QueueSettings(**q))


@pytest.fixture
async def sessions(tmp_path):  # noqa: PT004 - imported by the delivery test modules
    database = dbtest.fresh(tmp_path)   # SQLite in tmp_path, or a fresh PostgreSQL schema
    engine = database.engine()
    await db.migrate(engine)
    yield db.sessionmaker(engine)
    await engine.dispose()
    await database.adrop()


def body(tag: str, to: str = BUYERS[0]) -> bytes:
    return (f"From: \"Acme via Marketplace\" <{ALIASES[0]}>\r\nTo: {to}\r\nSubject: test {tag}\r\n"
            f"Message-ID: <{tag}@marketplace.example>\r\nX-Test: {tag}\r\n\r\nbody {tag}\r\n").encode()


async def enqueue(sessions, qid: str, recipients: list[tuple[str, str]], *, kind: str = "forward",
                  envelope_from: str = "b-x@marketplace.example", origin: str | None = SELLER,
                  created_at: float | None = None, data: bytes | None = None) -> None:
    now = time.time()
    async with sessions.begin() as s:
        s.add(QueueItem(id=qid, kind=kind, envelope_from=envelope_from, origin_sender=origin,
                        body=data if data is not None else body(qid, recipients[0][0] if recipients else ""),
                        size=100, created_at=created_at or now, next_attempt_at=now, attempts=0, status="queued"))
        await s.flush()
        for address, alias in recipients:
            s.add(QueueRecipient(queue_id=qid, address=address, alias=alias, status="pending"))


async def run_until(settings, sessions, condition, *, workers: int = 1, signer=None, timeout: float = 20.0,
                    target=None):
    """Run delivery workers until ``condition()`` (an async predicate) holds."""
    wakeup = asyncio.Event()
    deliverers = [Deliverer(settings, sessions, target or SmarthostTarget(settings), wakeup, signer)
                  for _ in range(workers)]
    for d in deliverers:
        d.start()
    try:
        deadline = time.monotonic() + timeout
        while not await condition():
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.05)
    finally:
        for d in deliverers:
            await d.stop()
    return deliverers


async def item(sessions, qid: str) -> dict:
    rows = {r["id"]: r for r in await list_items(sessions, include_done=True)}
    return rows[qid]


def dsns(sink):
    return [m for m in sink.messages if m.mail_from in ("", "<>")]


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)




class SmarthostAuth:
    """An aiosmtpd authenticator for a smarthost that wants AUTH: one login, "relay" / "s3cret"."""

    def __init__(self) -> None:
        self.logins: list[str] = []

    def __call__(self, server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        from aiosmtpd.smtp import AuthResult, LoginPassword
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"relay", b"s3cret")
        if ok:
            self.logins.append(auth_data.login.decode())
        return AuthResult(success=ok)
