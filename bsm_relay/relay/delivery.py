"""Delivery: workers take due queue items and hand them to the configured target.

A target answers per recipient: delivered, failed (permanent: 5xx) or deferred
(temporary: 4xx, refused or lost connection, timeout).  The worker records the
outcome per recipient, so only the deferred ones are tried again.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiosmtplib
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..config.settings import Settings, split_host_port
from . import log
from .queue import Claimed, claim, record_attempt


@dataclass
class Result:
    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)      # address -> reply text
    deferred: dict[str, str] = field(default_factory=dict)


class Target(Protocol):
    async def send(self, envelope_from: str, recipients: Sequence[str], body: bytes) -> Result: ...


class MaildirTarget:
    """Local delivery into one Maildir (the embedded default)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)

    async def send(self, envelope_from: str, recipients: Sequence[str], body: bytes) -> Result:
        result = Result()
        for rcpt in recipients:
            try:
                await asyncio.to_thread(self._write, envelope_from, rcpt, body)
            except OSError as exc:
                result.deferred[rcpt] = f"451 4.3.0 Maildir write failed: {exc.strerror}"
            else:
                result.delivered.append(rcpt)
        return result

    def _write(self, envelope_from: str, rcpt: str, body: bytes) -> None:
        name = f"{time.time():.6f}.{os.getpid()}_{secrets.token_hex(6)}.{socket.gethostname()}"
        tmp, new = self.path / "tmp" / name, self.path / "new" / name
        head = f"Return-Path: <{envelope_from}>\r\nDelivered-To: {rcpt}\r\n".encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, head)
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, new)
        dfd = os.open(self.path / "new", os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class SmarthostTarget:
    """Relay through one downstream SMTP server (host:port, STARTTLS, AUTH)."""

    def __init__(self, settings: Settings) -> None:
        d = settings.delivery
        self.host, self.port = split_host_port(d.smarthost, 25)
        self.tls = d.smarthost_tls
        self.user, self.password = d.smarthost_user, d.smarthost_password
        self.timeout = d.timeout
        self.helo = settings.smtp.hostname

    async def send(self, envelope_from: str, recipients: Sequence[str], body: bytes) -> Result:
        result = Result()
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, local_hostname=self.helo,
                                 timeout=self.timeout, start_tls=False, use_tls=False)
        try:
            await client.connect()
            if self.tls != "off":
                await client.ehlo()
                if client.supports_extension("starttls"):
                    await client.starttls(validate_certs=False)
                elif self.tls == "required":
                    raise _Temporary("451 4.7.4 the smarthost does not offer STARTTLS")
            if self.user:
                await client.login(self.user, self.password)
            errors, _ = await client.sendmail(envelope_from, list(recipients), body)
            for rcpt in recipients:
                if rcpt in errors:
                    code, text = errors[rcpt].code, errors[rcpt].message
                    (result.failed if code >= 500 else result.deferred)[rcpt] = f"{code} {text}"
                else:
                    result.delivered.append(rcpt)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            for err in exc.recipients:
                (result.failed if err.code >= 500 else result.deferred)[err.recipient] = f"{err.code} {err.message}"
        except aiosmtplib.SMTPResponseException as exc:
            target = result.failed if 500 <= exc.code < 600 else result.deferred
            for rcpt in recipients:
                target[rcpt] = f"{exc.code} {exc.message}"
        except _Temporary as exc:
            for rcpt in recipients:
                result.deferred[rcpt] = str(exc)
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            for rcpt in recipients:
                result.deferred[rcpt] = f"451 4.4.1 connection to the smarthost failed: {type(exc).__name__}"
        finally:
            if client.is_connected:
                try:
                    await client.quit()
                except (TimeoutError, aiosmtplib.SMTPException, OSError):
                    client.close()
        return result


class _Temporary(Exception):
    pass


def make_target(settings: Settings) -> Target:
    if settings.delivery.mode == "smarthost":
        return SmarthostTarget(settings)
    return MaildirTarget(Path(settings.delivery.maildir))


class Deliverer:
    """Claims due items and delivers them, at most ``workers`` at a time."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], target: Target,
                 wakeup: asyncio.Event) -> None:
        self.settings = settings
        self.sessions = sessions
        self.target = target
        self.wakeup = wakeup
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.log = log.get()
        self._slots = asyncio.Semaphore(settings.delivery.workers)
        self._inflight: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="deliverer")

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping.set()
        self.wakeup.set()
        if self._task:
            await self._task
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=grace)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            free = self.settings.delivery.workers - len(self._inflight)
            items: list[Claimed] = []
            if free > 0:
                try:
                    items = await claim(self.sessions, self.owner, free, self.settings.queue.lease)
                except Exception as exc:  # database trouble: keep the loop alive, try again
                    self.log.error("store.error", stage="claim", error_type=type(exc).__name__)
            for item in items:
                task = asyncio.create_task(self._deliver(item))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            if items and len(items) == free:
                await asyncio.sleep(0)
                continue
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), self.settings.delivery.poll_interval)
            except TimeoutError:
                pass

    async def _deliver(self, item: Claimed) -> None:
        addresses = [address for _, address, _ in item.recipients]
        try:
            result = await self.target.send(item.envelope_from, addresses, item.body)
        except Exception as exc:
            self.log.error("delivery.error", queue_id=item.id, error_type=type(exc).__name__)
            result = Result(deferred={a: "451 4.3.0 local delivery error" for a in addresses})
        by_address = {address: rid for rid, address, _ in item.recipients}
        aliases = {address: alias for _, address, alias in item.recipients}
        retry_at = time.time() + self.settings.queue.min_backoff
        status = await record_attempt(
            self.sessions, item, self.owner,
            delivered=[by_address[a] for a in result.delivered],
            failed={by_address[a]: t for a, t in result.failed.items()},
            deferred={by_address[a]: t for a, t in result.deferred.items()},
            retry_at=retry_at)
        for a in result.delivered:
            self.log.info("delivery.delivered", queue_id=item.id, alias=aliases[a], attempt=item.attempts + 1)
        for a, text in result.failed.items():
            self.log.warning("delivery.failed", queue_id=item.id, alias=aliases[a], reply=text)
        for a, text in result.deferred.items():
            self.log.info("delivery.deferred", queue_id=item.id, alias=aliases[a], reply=text,
                          next_attempt_in=self.settings.queue.min_backoff, status=status)
