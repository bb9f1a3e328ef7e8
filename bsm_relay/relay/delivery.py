"""Delivery: workers take due queue items and hand them to the configured target.

A target answers per recipient: delivered, failed (permanent: 5xx, null MX,
NXDOMAIN) or deferred (temporary: 4xx, refused or lost connection, timeout,
SERVFAIL).  The worker records the outcome per recipient, so only the deferred
ones are tried again, on the Postfix-like schedule of ``retry``; failures and
expiry turn into a DSN to the approved sender (``notify``) in the same
transaction.  Every message leaves DKIM-signed for the alias domain.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiosmtplib
import dns.asyncresolver
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..config.settings import Settings, split_host_port
from ..policy.reasons import reply
from . import log, mx, pipelining, scan, segments, spool
from .dkim import DkimSigner, body_hash_relaxed
from .headers import DOT_ATOM, split_message
from .notify import Failure, may_notify, notice_rows
from .queue import (
    Accepted,
    Claimed,
    Enqueuer,
    claim,
    lease_at_insert,
    record_attempt,
    record_error,
    release_dead_leases,
)
from .retry import backoff, delay_notice_due, enhanced_status, expired
from .spool import Spooled


@dataclass
class Result:
    delivered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)      # address -> reply text
    deferred: dict[str, str] = field(default_factory=dict)

    def merge(self, other: Result) -> None:
        self.delivered += other.delivered
        self.failed.update(other.failed)
        self.deferred.update(other.deferred)


class Target(Protocol):
    async def send(self, envelope_from: str, recipients: Sequence[str], body: bytes | Spooled) -> Result: ...


class MaildirTarget:
    """Local delivery into one Maildir (the embedded default)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)

    async def send(self, envelope_from: str, recipients: Sequence[str], body: bytes | Spooled) -> Result:
        result = Result()
        for rcpt in recipients:
            try:
                await asyncio.to_thread(self._write, envelope_from, rcpt, body)
            except OSError as exc:
                result.deferred[rcpt] = f"451 4.3.0 Maildir write failed: {exc.strerror}"
            else:
                result.delivered.append(rcpt)
        return result

    def _write(self, envelope_from: str, rcpt: str, body: bytes | Spooled) -> None:
        name = f"{time.time():.6f}.{os.getpid()}_{secrets.token_hex(6)}.{socket.gethostname()}"
        tmp, new = self.path / "tmp" / name, self.path / "new" / name
        head = f"Return-Path: <{envelope_from}>\r\nDelivered-To: {rcpt}\r\n".encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, head)
            pieces = [body] if isinstance(body, bytes) else [body.prefix, *body.body_pieces()]
            for piece in pieces:
                view = memoryview(piece)
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


class _Temporary(Exception):
    pass


async def _send_stuffed(client: aiosmtplib.SMTP, envelope_from: str, recipients: Sequence[str],
                        body: bytes | Spooled) -> dict[str, aiosmtplib.SMTPResponse]:
    """``client.sendmail`` for a body that is CRLF throughout (intake refuses anything else):
    dot-stuffed here with one ``replace`` instead of aiosmtplib's regex passes over the whole
    body (line-ending normalisation and stuffing, once more for SIZE), then written as is."""
    spooled = body if isinstance(body, Spooled) else None
    data = b""
    if spooled is None:
        assert isinstance(body, bytes)
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        data = _stuff(body)
    try:
        if client.is_ehlo_or_helo_needed:
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()
        options = [f"SIZE={len(body)}"] if client.supports_extension("size") else []
        ascii_only = body.isascii() if spooled is None else await asyncio.to_thread(body.isascii)
        if not ascii_only:
            # Never raw 8-bit to a server that did not offer 8BITMIME (RFC 6152): the message is
            # DKIM-signed as it is, so it is not converted; it fails with 5.6.3 (catalogue C5,
            # docs/decisions/0009).
            if not client.supports_extension("8bitmime"):
                code, _, text = reply("delivery.needs_8bitmime").partition(" ")
                raise aiosmtplib.SMTPResponseException(int(code), text)
            options.append("BODY=8BITMIME")
        try:
            errors = await _envelope(client, envelope_from, recipients, options)
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _GoneBeforeData(str(exc)) from exc     # nothing was accepted: safe to send again
        assert client.protocol is not None
        if spooled is None:
            client.protocol.write(data + b".\r\n")     # one write (a system call) with the final dot
        else:
            await _write_spooled(client.protocol, spooled)
            client.protocol.write(b".\r\n")
        end = await client.protocol.read_response(timeout=client.timeout)
        if end.code != 250:
            raise aiosmtplib.SMTPDataError(end.code, end.message)
        return errors
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        try:                                   # leave the connection clean for the next message
            await client.rset()
        except (ConnectionError, aiosmtplib.SMTPException):
            pass
        raise


def _stuff(lines: bytes) -> bytes:
    """Dot-stuffing of whole lines (RFC 5321 4.5.2)."""
    data = lines.replace(b"\r\n.", b"\r\n..") if scan.contains(lines, b"\r\n.") else lines
    return b"." + data if data.startswith(b".") else data


async def _write_spooled(proto: Any, message: Spooled) -> None:
    """DATA from a spool file, a piece at a time, waiting for the socket to take each (memory
    stays at about one piece whatever the message's size).  Pieces are whole lines."""
    proto.write(_stuff(message.prefix))
    pieces = message.body_pieces()
    last = b"\r\n"
    while True:
        piece = await asyncio.to_thread(next, pieces, None)
        if piece is None:
            break
        proto.write(_stuff(piece))
        last = piece[-2:]
        await proto._drain_helper()      # aiosmtplib's flow control (asyncio's FlowControlMixin)
    if last != b"\r\n":
        proto.write(b"\r\n")


# A plain ASCII dot-atom address: written into MAIL and RCPT as <address> directly.  aiosmtplib's
# mail() and rcpt() read every address with the email package's parser first (a tenth of a 2 KB
# message's delivery); anything else still goes through them.
_PLAIN_ADDRESS = re.compile(rf"{DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*", re.ASCII)


async def _mail(client: aiosmtplib.SMTP, sender: str, options: list[str]) -> None:
    if not _PLAIN_ADDRESS.fullmatch(sender):
        await client.mail(sender, options=options)
        return
    response = await client.execute_command(b"MAIL", b"FROM:<" + sender.encode("ascii") + b">",
                                            *(o.encode("ascii") for o in options))
    if response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)


async def _rcpt(client: aiosmtplib.SMTP, recipient: str) -> None:
    if not _PLAIN_ADDRESS.fullmatch(recipient):
        await client.rcpt(recipient)
        return
    response = await client.execute_command(b"RCPT", b"TO:<" + recipient.encode("ascii") + b">")
    if response.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)


async def _envelope(client: aiosmtplib.SMTP, envelope_from: str, recipients: Sequence[str],
                    options: list[str]) -> dict[str, aiosmtplib.SMTPResponse]:
    """MAIL, the RCPTs and DATA (at once where the server offers PIPELINING, else one at a
    time): the recipients the server refused."""
    if client.supports_extension("pipelining") and all(
            _PLAIN_ADDRESS.fullmatch(a) for a in (*recipients, envelope_from) if a):
        return await _envelope_pipelined(client, envelope_from, recipients, options)
    await _mail(client, envelope_from, options)
    errors: dict[str, aiosmtplib.SMTPResponse] = {}
    for rcpt in recipients:
        try:
            await _rcpt(client, rcpt)
        except aiosmtplib.SMTPRecipientRefused as exc:
            errors[rcpt] = aiosmtplib.SMTPResponse(exc.code, exc.message)
    if len(errors) == len(recipients):
        raise aiosmtplib.SMTPRecipientsRefused(
            [aiosmtplib.SMTPRecipientRefused(r.code, r.message, rcpt) for rcpt, r in errors.items()])
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    return errors


async def _envelope_pipelined(client: aiosmtplib.SMTP, envelope_from: str, recipients: Sequence[str],
                              options: list[str]) -> dict[str, aiosmtplib.SMTPResponse]:
    """MAIL, the RCPTs and DATA in one write (RFC 2920), every reply checked."""
    group = [b"MAIL FROM:<" + envelope_from.encode("ascii") + b">"
             + b"".join(b" " + o.encode("ascii") for o in options) + b"\r\n"]
    group += [b"RCPT TO:<" + r.encode("ascii") + b">\r\n" for r in recipients]
    group.append(b"DATA\r\n")
    replies = await pipelining.exchange(client, b"".join(group), len(group))
    mail, start = replies[0], replies[-1]
    errors = {r: resp for r, resp in zip(recipients, replies[1:-1], strict=True) if resp.code not in (250, 251)}
    refused = mail.code != 250 or len(errors) == len(recipients)
    if refused and start.code == 354:
        # A server that opened DATA without a valid recipient (RFC 2920 3.1 says it must not):
        # the empty message is ended so that the RSET after the refusal is read as a command.
        assert client.protocol is not None
        client.protocol.write(b".\r\n")
        await client.protocol.read_response(timeout=client.timeout)
    if mail.code != 250:
        raise aiosmtplib.SMTPSenderRefused(mail.code, mail.message, envelope_from)
    if len(errors) == len(recipients):
        raise aiosmtplib.SMTPRecipientsRefused(
            [aiosmtplib.SMTPRecipientRefused(r.code, r.message, rcpt) for rcpt, r in errors.items()])
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    return errors


async def smtp_send(client: aiosmtplib.SMTP, envelope_from: str, recipients: Sequence[str],
                    body: bytes | Spooled) -> Result:
    """One transaction on a connected client, translated into per-recipient outcomes."""
    result = Result()
    if envelope_from == "<>":   # the null sender as aiosmtpd records it (postmaster mail from <>)
        envelope_from = ""
    try:
        # Queued bodies are CRLF lines without NUL (``headers.crlf_only``, checked where their
        # bytes are made): sent as they are, dot-stuffed, without a second pass to check them.
        errors = await _send_stuffed(client, envelope_from, recipients, body)
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
    return result


class _GoneBeforeData(aiosmtplib.SMTPServerDisconnected):
    """The connection dropped before the server accepted any data of this message."""


# A pooled connection used again within this many seconds is not checked with RSET first (one
# round trip per message saved); should the server have dropped it meanwhile, the message goes
# out again on a new connection (it was never sent).
_FRESH = 2.0


class SmarthostTarget:
    """Relay through one downstream SMTP server (host:port, STARTTLS, AUTH), reusing connections."""

    def __init__(self, settings: Settings) -> None:
        d = settings.delivery
        self.host, self.port = split_host_port(d.smarthost, 25)
        self.tls = d.smarthost_tls
        self.user, self.password = d.smarthost_user, d.smarthost_password
        self.timeout = d.timeout
        self.helo = settings.smtp.hostname
        self._idle: list[tuple[float, aiosmtplib.SMTP]] = []     # (when it was put back, client)
        self._max_idle = max(1, d.workers)

    async def _connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, local_hostname=self.helo,
                                 timeout=self.timeout, start_tls=False, use_tls=False)
        await client.connect()
        if self.tls != "off":
            await client.ehlo()
            if client.supports_extension("starttls"):
                await client.starttls(validate_certs=False)
            elif self.tls == "required":
                client.close()
                raise _Temporary("451 4.7.4 the smarthost does not offer STARTTLS")
        if self.user:
            await client.login(self.user, self.password)
        return client

    async def send(self, envelope_from: str, recipients: Sequence[str], body: bytes | Spooled) -> Result:
        client: aiosmtplib.SMTP | None = None
        try:
            unchecked = False
            while self._idle and client is None:
                returned, candidate = self._idle.pop()
                if time.monotonic() - returned < _FRESH and candidate.is_connected:
                    client, unchecked = candidate, True
                    break
                try:
                    await candidate.rset()          # still alive and in a clean state?
                    client = candidate
                except (TimeoutError, aiosmtplib.SMTPException, OSError):
                    candidate.close()
            if client is None:
                client = await self._connect()
            try:
                result = await smtp_send(client, envelope_from, recipients, body)
            except _GoneBeforeData:
                if not unchecked:
                    raise
                client = await self._connect()
                result = await smtp_send(client, envelope_from, recipients, body)
        except _Temporary as exc:
            return Result(deferred={r: str(exc) for r in recipients})
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            if client is not None:
                client.close()
            return Result(deferred={r: f"451 4.4.1 connection to the smarthost failed: {type(exc).__name__}"
                                    for r in recipients})
        if client.is_connected and len(self._idle) < self._max_idle:
            self._idle.append((time.monotonic(), client))
        elif client.is_connected:
            client.close()
        return result

    async def close(self) -> None:
        while self._idle:
            _, client = self._idle.pop()
            try:
                await client.quit()
            except (TimeoutError, aiosmtplib.SMTPException, OSError):
                client.close()


class MxTarget:
    """Direct delivery: MX lookup per recipient domain, opportunistic STARTTLS."""

    def __init__(self, settings: Settings, resolver: dns.asyncresolver.Resolver) -> None:
        self.resolver = resolver
        self.port = settings.delivery.mx_port
        self.timeout = settings.delivery.timeout
        self.helo = settings.smtp.hostname

    async def send(self, envelope_from: str, recipients: Sequence[str], body: bytes | Spooled) -> Result:
        by_domain: dict[str, list[str]] = defaultdict(list)
        for rcpt in recipients:
            by_domain[rcpt.rpartition("@")[2].lower()].append(rcpt)
        result = Result()
        for domain, rcpts in by_domain.items():
            result.merge(await self._send_domain(domain, envelope_from, rcpts, body))
        return result

    async def _send_domain(self, domain: str, envelope_from: str, rcpts: list[str], body: bytes | Spooled) -> Result:
        try:
            hosts = await mx.resolve_targets(self.resolver, domain)
        except mx.PermanentDnsFailure as exc:
            text = "550 5.1.10 the recipient domain accepts no mail (null MX)" if exc.status == "5.1.10" \
                else f"550 {exc.status} the recipient domain does not exist"
            return Result(failed={r: text for r in rcpts})
        except mx.TemporaryDnsFailure as exc:
            return Result(deferred={r: f"451 {exc.status} DNS lookup for the recipient domain failed"
                                    for r in rcpts})
        last = "451 4.4.1 no mail server of the recipient domain answered"
        for host, _pref in hosts:
            try:
                addresses = await mx.addresses(self.resolver, host)
            except mx.DnsFailure:
                continue
            for address in addresses:
                client = aiosmtplib.SMTP(hostname=address, port=self.port, local_hostname=self.helo,
                                         timeout=self.timeout, start_tls=False, use_tls=False)
                try:
                    await client.connect()
                    await client.ehlo()
                    if client.supports_extension("starttls"):
                        try:
                            await client.starttls(validate_certs=False)
                        except (aiosmtplib.SMTPException, OSError):
                            client.close()
                            continue
                    result = await smtp_send(client, envelope_from, rcpts, body)
                    try:
                        await client.quit()
                    except (TimeoutError, aiosmtplib.SMTPException, OSError):
                        client.close()
                    return result
                except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                    client.close()
                    last = f"451 4.4.1 connection to a mail server of the recipient domain failed: {type(exc).__name__}"
        return Result(deferred={r: last for r in rcpts})


def make_target(settings: Settings, resolver: dns.asyncresolver.Resolver | None = None) -> Target:
    if settings.delivery.mode == "smarthost":
        return SmarthostTarget(settings)
    if settings.delivery.mode == "mx":
        if resolver is None:
            raise ValueError("direct (mx) delivery needs a DNS resolver")
        return MxTarget(settings, resolver)
    return MaildirTarget(Path(settings.delivery.maildir))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's process: alive
        return True
    return True


# Accepted rows at least this large are handed to delivery at once (``Deliverer.hand_off``).
HAND_OFF_MIN = 64 * 1024


class Deliverer:
    """Claims due items and delivers them, at most ``workers`` at a time."""

    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], target: Target,
                 wakeup: asyncio.Event, signer: DkimSigner | None = None, writer: Enqueuer | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        # Claims and outcomes go through the serving process's writer (one group commit with
        # the accepted messages) when there is one, else each in a transaction of its own.
        self.db: async_sessionmaker[AsyncSession] | Enqueuer = writer if writer is not None else sessions
        self.target = target
        self.wakeup = wakeup
        self.signer = signer
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.log = log.get()
        self._inflight: set[asyncio.Task[None]] = set()
        self._reserved = 0                  # slots promised to messages being committed (hand_off)
        self._backlog = False
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
        close = getattr(self.target, "close", None)
        if close is not None:
            await close()

    async def _run(self) -> None:
        try:
            freed = await release_dead_leases(self.db, socket.gethostname(), _pid_alive)
            if freed:
                self.log.info("queue.leases_released", items=freed)
        except Exception as exc:  # never keeps delivery from starting; the leases run out anyway
            self.log.error("store.error", stage="release_leases", error_type=type(exc).__name__,
                           error=log.error_line(exc))
        while not self._stopping.is_set():
            free = self.settings.delivery.workers - len(self._inflight) - self._reserved
            items: list[Claimed] = []
            if free > 0:
                try:
                    items = await claim(self.db, self.owner, free, self.settings.queue.lease)
                except Exception as exc:  # database trouble: keep the loop alive, try again
                    self.log.error("store.error", stage="claim", error_type=type(exc).__name__,
                                   error=log.error_line(exc))
            # Every slot taken: more may be due, so a finished delivery asks again at once.
            self._backlog = free <= 0 or len(items) == free
            for item in items:
                self._start(item)
            if items and len(items) == free:
                await asyncio.sleep(0)
                continue
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), self.settings.delivery.poll_interval)
            except TimeoutError:
                pass

    def hand_off(self, accepted: Accepted, alone: bool = False) -> None:
        """Deliver ``accepted``'s items as soon as they are committed, from memory, if a worker is
        free for each: they are inserted leased to this process (``queue.lease_at_insert``), so
        no claim reads and rewrites them and no poll waits for them.  Otherwise (every worker
        busy, stopping) they are queued as usual and claimed when a worker frees up.

        Rows of at least ``HAND_OFF_MIN`` bytes (docs/decisions/0016): the claim rewrites a row
        whole, which costs more than the hand-off saves only for large ones; smaller messages went
        slower handed off at 20 connections (their deliveries then start in the middle of the
        group's replies, and lose the claim's batching).  A smaller message only when it is
        ``alone`` (the only one in intake: docs/decisions/0022), where there is no group to
        delay and no batch to lose, and the claim's transaction would be one more commit."""
        count = len(accepted.items)
        if (not count or self._stopping.is_set()
                or (not alone and any(len(item.values["body"]) < HAND_OFF_MIN for item in accepted.items))
                or len(self._inflight) + self._reserved + count > self.settings.delivery.workers):
            return
        self._reserved += count
        claimed = lease_at_insert(accepted, self.owner, time.time() + self.settings.queue.lease)

        def settled(committed: bool) -> None:
            self._reserved -= count
            if committed:
                for item in claimed():
                    self._start(item)
        accepted.settled.append(settled)

    def _start(self, item: Claimed) -> None:
        task = asyncio.create_task(self._deliver(item))
        self._inflight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._backlog:
            self.wakeup.set()

    async def _spooled(self, item: Claimed) -> Spooled:
        """The message of a spooled item: signed over its file, hashed in a thread, in pieces."""
        assert item.spool_path is not None
        path = spool.path_of(self.settings.state_dir, item.spool_path)
        head = item.body                           # the header block and its blank line
        if self.signer is None:
            return Spooled(head, path, len(head))
        unsigned = Spooled(head, path, len(head))
        body_hash = await asyncio.to_thread(lambda: body_hash_relaxed(unsigned.body_pieces()))
        return Spooled(self.signer.sign_hashed(head[:-2], body_hash) + head, path, len(head))

    def sign(self, body: bytes) -> bytes:
        if self.signer is None:
            return body
        header_block, rest = split_message(body)
        return self.signer.sign(header_block, rest) + body

    async def _deliver(self, item: Claimed) -> None:
        q = self.settings.queue
        try:
            addresses = [address for _, address, _ in item.recipients]
            if not addresses:
                raise ValueError("queue item without pending recipients")
            body: bytes | Spooled
            if item.spool_span is not None:      # in a spool segment: under the spool threshold, read whole
                assert item.spool_path is not None    # (in a thread: a file read never waits on the loop)
                body = self.sign(await asyncio.to_thread(segments.read, self.settings.state_dir, item.spool_path,
                                                         *item.spool_span))
            else:
                body = await self._spooled(item) if item.spool_path else self.sign(item.body)
        except Exception as exc:
            await self._poison(item, exc)
            return
        try:
            result = await self.target.send(item.envelope_from, addresses, body)
        except Exception as exc:
            self.log.error("delivery.error", queue_id=item.id, session=item.session_id,
                           error_type=type(exc).__name__)
            result = Result(deferred={a: "451 4.3.0 local delivery error" for a in addresses})
        now = time.time()
        by_address = {address: rid for rid, address, _ in item.recipients}
        aliases = {address: alias for _, address, alias in item.recipients}
        statuses = {a: enhanced_status(t, permanent=True) for a, t in result.failed.items()}
        if result.deferred and expired(item.created_at, now, q):
            for a, text in result.deferred.items():
                result.failed[a] = f"{text} (gave up after {q.max_lifetime} seconds in the queue)"
                statuses[a] = "4.4.7"     # RFC 3463: delivery time expired
            result.deferred = {}
        notify = may_notify(item.kind, item.envelope_from, item.origin_sender)
        notices = []
        if notify and result.failed:
            failures = [Failure(a, aliases[a], statuses[a], t) for a, t in result.failed.items()]
            notices.append(self._notice(item, failures, now))
        delay_notice = notify and bool(result.deferred) and delay_notice_due(
            item.created_at, now, item.delay_notified, q)
        if delay_notice:
            failures = [Failure(a, aliases[a], enhanced_status(t, False), t, "delayed")
                        for a, t in result.deferred.items()]
            notices.append(self._notice(item, failures, now, retry_until=item.created_at + q.max_lifetime))
        retry_at = now + backoff(item.attempts + 1, q)
        try:
            status = await record_attempt(
                self.db, item, self.owner,
                delivered=[by_address[a] for a in result.delivered],
                failed={by_address[a]: t for a, t in result.failed.items()},
                deferred={by_address[a]: t for a, t in result.deferred.items()},
                retry_at=retry_at, notices=notices, delay_notified=delay_notice)
        except Exception as exc:
            # The outcome could not be stored: the lease expires and the item is tried again
            # (a duplicate is possible; a loss is not).
            self.log.error("store.error", stage="record", queue_id=item.id, session=item.session_id,
                           error_type=type(exc).__name__, error=log.error_line(exc))
            return
        if status == "done":
            spool.remove(self.settings.state_dir, item.spool_path)     # its own file (a segment stays)
            if isinstance(self.db, Enqueuer):
                self.db.released(item.id)
        if notices:
            self.wakeup.set()
        # ``to`` is the real recipient: a keyed digest in the log unless [logging] redact = false.
        # ``latency``: seconds from acceptance to this delivery (the metrics' histogram).
        for a in result.delivered:
            self.log.info("delivery.delivered", queue_id=item.id, session=item.session_id, kind=item.kind,
                          alias=aliases[a], to=a, attempt=item.attempts + 1, latency=round(now - item.created_at, 3))
        for a, text in result.failed.items():
            self.log.warning("delivery.failed", queue_id=item.id, session=item.session_id, kind=item.kind,
                             alias=aliases[a], to=a, reply=text, bounced=notify)
        for a, text in result.deferred.items():
            self.log.info("delivery.deferred", queue_id=item.id, session=item.session_id, kind=item.kind,
                          alias=aliases[a], to=a, reply=text, attempt=item.attempts + 1,
                          next_attempt_in=round(retry_at - now), status=status, delay_notice=delay_notice)

    def _notice(self, item: Claimed, failures: list[Failure], now: float, retry_until: float | None = None):  # type: ignore[no-untyped-def]
        assert item.origin_sender is not None
        return notice_rows(hostname=self.settings.smtp.hostname, alias_domain=self.settings.aliases.domain,
                           origin_sender=item.origin_sender, original=item.body, created_at=item.created_at,
                           now=now, failures=failures, retry_until=retry_until,
                           real_to_alias={address: alias for _, address, alias in item.recipients})

    async def _poison(self, item: Claimed, exc: Exception) -> None:
        q = self.settings.queue
        retry_at = time.time() + backoff(1, q)
        try:
            status = await record_error(self.db, item, self.owner, f"processing error: {type(exc).__name__}",
                                        retry_at, q.max_errors)
        except Exception as store_exc:
            self.log.error("store.error", stage="record", queue_id=item.id, session=item.session_id,
                           error_type=type(store_exc).__name__, error=log.error_line(store_exc))
            return
        event = "queue.held" if status == "hold" else "delivery.error"
        self.log.error(event, queue_id=item.id, session=item.session_id, error_type=type(exc).__name__,
                       status=status)

