"""SMTP in: the aiosmtpd protocol and handler, and nothing else.

Recipients are routed and resolved at RCPT (refusals before DATA cost nothing);
the message is judged after DATA by ``intake``.  Every reply comes from the
catalogue in ``policy.reasons``; an unexpected failure answers ``451 4.3.0`` with
no internals, never aiosmtpd's default ``500 Error: (SomeException)``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import os
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, AnyStr

from aiosmtpd.proxy_protocol import AF, ProxyData
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax
from sqlalchemy.exc import OperationalError

from ..aliases.routing import Kind, route
from ..policy.reasons import reply, reply_for
from . import bounce_in, dataread, intake, log
from .backpressure import QueueDepth
from .context import Relay
from .headers import DOT_ATOM
from .queue import StorageError

_RCPT_ARG = re.compile(r"TO:\s*<([^<>]*)>\s*(.*)", re.IGNORECASE | re.ASCII)
_RCPT_BARE = re.compile(r"TO:\s*(\S+)\s*(.*)", re.IGNORECASE | re.ASCII)
# MAIL FROM's usual shape, <dot-atom@dot-atom> and its parameters, read without the email
# package's header parser (about a tenth of a refusal's CPU); anything else goes to aiosmtpd's.
_PLAIN_PATH = re.compile(rf'[ \t]*<({DOT_ATOM}@{DOT_ATOM})>[ \t]*([^ \t()\\"][^()\\"]*)?', re.ASCII)

# Seconds a trusted proxy has to send its PROXY header after connecting.
PROXY_TIMEOUT = 10.0

# Answers that mean "that command was malformed or out of sequence": they count towards
# [smtp] max_invalid_commands (recipients refused by policy have their own cap).
_INVALID = ("500", "501", "502", "503", "504")

# Commands that keep a session busy without mailing: [smtp] junk_command_limit per session
# (Postfix's smtpd_junk_command_limit; aiosmtpd's own call limit would answer in its own words).
_JUNK = frozenset({"NOOP", "VRFY", "EXPN", "HELP", "ETRN"})

# [storage] min_free_bytes: the free space is looked up (off the loop) at most this often.
_DISK_CHECK_INTERVAL = 5.0


# aiosmtpd builds its command, hook and AUTH tables from dir()/inspect.getmembers() of the protocol
# and the handler at every connection (about 0.5 ms, a fifth of the CPU at 2 KB).  It only looks
# at these prefixes, so both classes list just those names, computed once per class.
_AIOSMTPD_PREFIXES = ("smtp_", "auth_", "handle_")
_DIR_CACHE: dict[type, list[str]] = {}


def _aiosmtpd_dir(self: object) -> list[str]:
    names = _DIR_CACHE.get(type(self))
    if names is None:
        names = _DIR_CACHE[type(self)] = sorted(n for n in object.__dir__(self) if n.startswith(_AIOSMTPD_PREFIXES))
    return names


class Gate:
    """Admission for one serve process: concurrent sessions (in all and per client IP) and the drain.

    Limits are read from ``relay.settings`` at each connection, so a SIGHUP reload applies to the
    next one.  ``draining`` turns every new session away with ``421 4.3.2``.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.draining = False
        self.open: dict[RelaySMTP, str | None] = {}
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.empty = asyncio.Event()
        self.empty.set()

    def admit(self, conn: RelaySMTP, ip: str, count_ip: bool) -> str | None:
        """None when ``conn`` may go on (it is then counted), else the refusal's reason code."""
        limits = self.relay.settings.smtp
        if self.draining:
            return "local.shutting_down"
        if len(self.open) >= limits.max_sessions:
            return "conn.too_many_sessions"
        if count_ip and self.per_ip[ip] >= limits.max_sessions_per_ip:
            return "conn.too_many_from_ip"
        self.open[conn] = ip if count_ip else None
        if count_ip:
            self.per_ip[ip] += 1
        self.empty.clear()
        return None

    def release(self, conn: RelaySMTP) -> None:
        if conn not in self.open:
            return
        ip = self.open.pop(conn)
        if ip is not None:
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
        if not self.open:
            self.empty.set()

    def drain(self) -> None:
        """Refuse new sessions; end the open ones that are between transactions (RFC 5321 §3.8)."""
        self.draining = True
        for conn in list(self.open):
            conn.drain()

    def cut_off(self) -> None:
        """The grace time is over: close what is left (a message without its 250 is the client's to retry)."""
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.close()


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with a strict, cheap RCPT parser and per-session limits."""

    __dir__ = _aiosmtpd_dir   # the command table per class, not per connection (see above)

    def __init__(self, relay: Relay, handler: Handler, gate: Gate | None = None, tls_label: str = "",
                 **kwargs: Any) -> None:
        settings = relay.settings.smtp
        if settings.proxy_protocol:
            # aiosmtpd then reads a PROXY v1/v2 header before the greeting and asks handle_PROXY.
            kwargs.setdefault("proxy_protocol_timeout", PROXY_TIMEOUT)
        super().__init__(handler, hostname=settings.hostname, data_size_limit=settings.max_message_size,
                         timeout=settings.timeout, ident="bsm-relay", **kwargs)
        self.relay = relay
        self.bad_recipients = 0
        self.gate = gate if gate is not None else Gate(relay)
        self.tls_label = tls_label          # "implicit" on the SMTPS listener
        self.invalid_commands = 0
        self.junk_commands = 0              # NOOP and friends, see [smtp] junk_command_limit
        self._refusal: str | None = None    # reason code when the session is turned away at connect
        self._busy = False                  # a command is being handled
        self._in_data = False               # after our 354: replies are about the message, not the command
        self._deadline = 0.0                # the session's timeout (loop time), see _reset_timeout
        # Every command goes through _guarded (drain, DATA timeout), whatever class defines it.
        self._smtp_methods = {name: self._guarded(name, method) for name, method in self._smtp_methods.items()}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None  # not the TLS layer of a STARTTLS
        super().connection_made(transport)
        assert self.session is not None
        if first:
            self.event_handler.log.info("smtp.connected", session=getattr(self.session, "id", None),
                                        peer=_peer_ip(self.session), pid=os.getpid(),
                                        tls=self.tls_label or None)
        if first and self.relay.settings.smtp.proxy_protocol \
                and not self.event_handler.trusted_proxy(self.session.peer):
            # Only a configured proxy may connect when PROXY is expected: anyone else is cut off
            # before a byte is read (handle_PROXY checks again, should this ever be skipped).
            self.event_handler.proxy_refused(self.session)
            transport.close()
        elif first:
            self._admit()

    # -- limits, timeouts and drain (issue 6) --------------------------------------------
    def _admit(self) -> None:
        assert self.session is not None
        ip = _peer_ip(self.session)
        # A trusted proxy carries many clients: its connections are not counted per IP.
        self._refusal = self.gate.admit(self, ip, count_ip=not self.event_handler.trusted_proxy(self.session.peer))
        if self._refusal is not None:
            self.event_handler.log.warning("smtp.rejected", stage="connect", reason=self._refusal,
                                           session=getattr(self.session, "id", None), peer=ip, pid=os.getpid())

    async def _handle_client(self) -> None:
        if self._refusal is not None:
            self._say_and_close(self._refusal)
            return
        await super()._handle_client()

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session here and asks the transport to stay half open.  When the
        # client went away before its session coroutine ever ran (connect and close at once),
        # nothing closes that transport afterwards: with uvloop it then never reports the loss,
        # and the session would hold its place under max_sessions / max_sessions_per_ip for
        # ever (a connect-and-close flood would lock everyone out).  The client can send
        # nothing more: close.
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        self.gate.release(self)
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd cancels its timer and schedules a new one for every command line; here the
        new deadline is only noted while the armed timer fires no later (it re-arms itself for
        the rest), so a session's commands schedule a timer only when the deadline moves earlier."""
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= deadline:
            return
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
        else:
            self._timeout_cb()

    def _timeout_cb(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.event_handler.log.info("smtp.timeout", session=getattr(self.session, "id", None),
                                        stage="data" if self._in_data else "command", reason="conn.timeout")
            self._writer.write((reply("conn.timeout") + "\r\n").encode())
        super()._timeout_cb()

    def _say_and_close(self, reason: str) -> None:
        """Send one catalogue reply and close (the write is flushed before the socket closes)."""
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write((reply(reason) + "\r\n").encode())
            self.transport.close()

    def _in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def drain(self) -> None:
        """SIGTERM: a session idle between transactions gets 421 4.3.2 now; a busy one after its reply."""
        if not self._busy and not self._in_transaction():
            self._say_and_close("local.shutting_down")

    def _guarded(self, name: str, method: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def run(arg: Any) -> None:
            if self.gate.draining and name != "QUIT" and not self._in_transaction():
                self._say_and_close("local.shutting_down")
                return
            if name in _JUNK:
                self.junk_commands += 1
                if self.junk_commands > self.relay.settings.smtp.junk_command_limit:
                    self.event_handler.log.warning("smtp.rejected", stage="command", reason="conn.too_many_junk",
                                                   session=getattr(self.session, "id", None))
                    self._say_and_close("conn.too_many_junk")
                    return
            self._busy = True
            if name == "DATA":   # the whole DATA phase, from here to our final reply
                self._reset_timeout(self.relay.settings.smtp.data_timeout)
            try:
                await method(arg)
            finally:
                self._busy = self._in_data = False
            if self.transport is None or self.transport.is_closing():
                return
            if name == "DATA":
                self._reset_timeout()
            if self.gate.draining and name != "QUIT" and not self._in_transaction():
                # The transaction this session had open when the drain began is complete.
                self._say_and_close("local.shutting_down")
        return run

    async def push(self, status: AnyStr) -> None:
        head = status[:3] if isinstance(status, str) else status[:3].decode("ascii", "replace")
        if head == "354":
            self._in_data = True
        elif head in _INVALID and not self._in_data:
            self.invalid_commands += 1
            if self.invalid_commands > self.relay.settings.smtp.max_invalid_commands:
                self.event_handler.log.warning("smtp.rejected", stage="command", reason="conn.too_many_invalid",
                                               session=getattr(self.session, "id", None))
                self._say_and_close("conn.too_many_invalid")
                return
        await super().push(status)

    def _create_session(self) -> Session:
        session = super()._create_session()
        # STARTTLS starts a new aiosmtpd session; the log keeps following the same connection.
        session.id = getattr(self.session, "id", None) or secrets.token_hex(6)  # type: ignore[attr-defined]
        return session

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _PLAIN_PATH.fullmatch(arg)
        if m is None:
            try:
                return super()._getaddr(arg)
            except Exception:       # the email package trips over some domain literals ("<a@[>")
                return None, None
        address = m.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, m.group(2) or ""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the chunked reader (``dataread``); the rest mirrors aiosmtpd 1.4.6."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            data = await dataread.read_data(self._reader, self.data_size_limit)
        except asyncio.CancelledError:
            self._writer.close()      # the connection went away during DATA
            raise
        except asyncio.IncompleteReadError:
            self._writer.close()      # closed before the final dot: nothing was received
            return
        if data.refusal is not None:
            self.event_handler.log.info("smtp.rejected", stage="data", reason=data.refusal,
                                        session=getattr(self.session, "id", None), size=data.size)
            self._set_post_data_state()
            await self.push(reply(data.refusal, limit=self.data_size_limit))
            return
        self.envelope.content = self.envelope.original_content = data.content
        self.envelope.bsm_data_end = time.monotonic()  # type: ignore[attr-defined]
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.mail_from:
            await self.push(reply("rcpt.need_mail"))
            return
        m = _RCPT_ARG.fullmatch(arg or "") or _RCPT_BARE.fullmatch(arg or "")
        if m is None:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if m.group(2).strip():
            await self.push("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        if len(self.envelope.rcpt_tos) >= self.relay.settings.smtp.max_recipients:
            await self.push(reply("rcpt.too_many"))
            return
        status = await self.event_handler.resolve_recipient(self, self.session, self.envelope, m.group(1))
        if not status.startswith("250"):
            self.bad_recipients += 1
            if self.bad_recipients > self.relay.settings.smtp.max_invalid_recipients:
                await self.push(reply("rcpt.too_many_invalid"))
                assert self.transport is not None
                self.transport.close()
                return
        await self.push(status)


class Handler:
    __dir__ = _aiosmtpd_dir   # aiosmtpd reads the handle_/auth_ hooks from dir() per connection

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.log = log.get()
        self.trusted_proxies = [ipaddress.ip_network(entry.strip(), strict=False)
                                for entry in relay.settings.smtp.trusted_proxies]
        self.queue_depth = QueueDepth(relay.sessions)   # [queue] max_depth, see handle_MAIL
        self._disk_checked = (-_DISK_CHECK_INTERVAL, True)   # (monotonic time, room) of the last look

    async def _disk_has_room(self) -> bool:
        """[storage] min_free_bytes: is there room for the queue?  statvfs runs in a thread, at most
        every few seconds; one look answers every session meanwhile."""
        floor = self.relay.settings.storage.min_free_bytes
        if floor <= 0:
            return True
        loop = asyncio.get_running_loop()
        at, room = self._disk_checked
        if loop.time() - at >= _DISK_CHECK_INTERVAL:
            self._disk_checked = (loop.time(), room)    # concurrent sessions use the last answer
            try:
                st = await asyncio.to_thread(os.statvfs, self.relay.settings.storage.state_dir)
                room = st.f_bavail * st.f_frsize >= floor
            except OSError:
                room = True        # cannot tell: the commit itself will fail with 451 if it must
            self._disk_checked = (loop.time(), room)
        return room

    def trusted_proxy(self, peer: Any) -> bool:
        ip = _ip(peer[0] if isinstance(peer, tuple) else "")
        return ip is not None and any(ip in network for network in self.trusted_proxies)

    def proxy_refused(self, session: Session) -> None:
        self.log.warning("smtp.rejected", stage="proxy", reason="proxy.untrusted",
                         session=getattr(session, "id", None), peer=_peer_ip(session))

    async def handle_PROXY(self, server: SMTP, session: Session, envelope: Envelope, proxy_data: ProxyData) -> bool:
        # aiosmtpd calls this only for a well-formed header; False closes the connection.
        if not self.trusted_proxy(session.peer):
            self.proxy_refused(session)
            return False
        return True

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if not await self.queue_depth.admit(self.relay.settings.queue.max_depth):
            # Delivery is behind: no transaction starts (RCPT then gets 503) until the queue drains.
            self.log.info("smtp.rejected", stage="mail", reason="queue.full", session=getattr(session, "id", None))
            return reply("queue.full")
        if not await self._disk_has_room():
            self.log.warning("smtp.rejected", stage="mail", reason="storage.low_space",
                             session=getattr(session, "id", None))
            return reply("storage.low_space")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.bsm_recipients = []  # type: ignore[attr-defined]
        return reply("ok.sender")

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"

    async def resolve_recipient(self, server: SMTP, session: Session, envelope: Envelope, text: str) -> str:
        settings = self.relay.settings
        r = route(text, settings.aliases.domain, self.relay.local_domains)
        recipients: list[intake.Recipient] = getattr(envelope, "bsm_recipients", [])
        envelope.bsm_recipients = recipients  # type: ignore[attr-defined]
        if r.kind is Kind.POSTMASTER:
            recipients.append(intake.Recipient(r.address))
            envelope.rcpt_tos.append(r.address)
            return reply("ok.recipient")
        if r.kind is Kind.FOREIGN:
            return self._refused(session, "rcpt.relay_denied", domain=settings.aliases.domain)
        if r.kind is Kind.ALIAS:
            resolved = await self._resolve_alias(r.local, r.address)
            if resolved is not None:
                recipients.append(resolved)
                envelope.rcpt_tos.append(r.address)
                return reply("ok.recipient")
        if r.kind is Kind.BOUNCE:
            queue_id = self.relay.bounces.decode(r.address)
            if queue_id is None or not await bounce_in.is_known(self.relay, queue_id):
                return self._refused(session, "rcpt.bad_bounce")
            recipients.append(intake.Recipient(r.address, bounce_of=queue_id))
            envelope.rcpt_tos.append(r.address)
            return reply("ok.recipient")
        # INVALID, forged, revoked, unknown pair:
        # one generic answer, so the reply tells nothing about why.
        return self._refused(session, "rcpt.unknown")

    async def _resolve_alias(self, token: str, address: str) -> intake.Recipient | None:
        ref = self.relay.codec.decode(token)
        if ref is None:
            return None
        pair = await self.relay.store.resolve_pair(ref.seller_id, ref.buyer_id, token)
        if pair is None:
            return None
        return intake.Recipient(address, ref, pair[0], pair[1])

    def _refused(self, session: Session, reason: str, **params: object) -> str:
        self.log.info("smtp.rejected", stage="rcpt", reason=reason, session=getattr(session, "id", None))
        return reply(reason, **params)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        if not content.endswith(b"\r\n"):
            content += b"\r\n"
        tx = intake.Transaction(session_id=getattr(session, "id", ""), mail_from=envelope.mail_from or "",
                                recipients=list(getattr(envelope, "bsm_recipients", [])), content=content,
                                client_ip=_client_ip(session), helo=session.host_name or "")
        try:
            outcome = await intake.process(self.relay, tx)
        except _STORAGE_FAILURES as exc:
            # The queue's commit failed (StorageError), or another write or read of the database
            # did (an unknown sender recorded as pending): locked, read-only, full.  Nothing was
            # accepted, the client tries again later (catalogue D3).
            self.log.error("store.error", session=tx.session_id, error=log.error_line(exc))
            return reply("local.storage")
        if not outcome.decision.accepted:
            self.log.info("smtp.rejected", stage="data", reason=outcome.decision.reason,
                          session=tx.session_id, mail_from=tx.mail_from, **outcome.log)
            return reply_for(outcome.decision)
        if not outcome.queue_ids:   # only bounce addresses: handled, nothing of the sender's queued
            self.log.info("bounce.received", session=tx.session_id, **outcome.log)
            return reply("ok.bounce")
        # Seconds from the final dot to the 250 (the group commit included): what the client waits.
        wait = round(time.monotonic() - getattr(envelope, "bsm_data_end", time.monotonic()), 4)
        for qid in outcome.queue_ids:
            # mail_from is the sender's own address: a keyed digest in the log unless [logging] redact = false.
            self.log.info("message.accepted", queue_id=qid, session=tx.session_id, size=len(content),
                          mail_from=tx.mail_from, accept_wait=wait, **outcome.log)
        return reply("ok.queued", queue_id=" ".join(outcome.queue_ids))

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.CancelledError):  # pragma: no cover - re-raised by aiosmtpd
            raise error
        if isinstance(error, _STORAGE_FAILURES):   # a database failure in another hook (a RCPT lookup)
            self.log.error("store.error", error=log.error_line(error))
            return reply("local.storage")
        self.log.error("smtp.error", error_type=type(error).__name__, exc_info=error)
        return reply("local.error")


# The database could not be used (locked, read-only, full, gone): 451 4.3.0 local.storage.
_STORAGE_FAILURES = (StorageError, OperationalError)


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as the relay compares it: an IPv4-mapped IPv6 peer counts as its IPv4 address.
    Kept for the addresses seen lately (read several times a message, from the same few peers)."""
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _peer_ip(session: Session) -> str:
    peer = session.peer
    ip = _ip(str(peer[0])) if isinstance(peer, tuple) and peer else None
    return str(ip) if ip is not None else ""


def _client_ip(session: Session) -> str:
    """The address SPF judges: the proxied source behind a trusted PROXY header, else the TCP peer.

    A v1 UNKNOWN or v2 LOCAL header (the proxy's own health check) carries no source;
    the connection is then the proxy's own.
    """
    proxy: ProxyData | None = session.proxy_data
    if proxy and proxy.src_addr is not None and proxy.family in (AF.INET, AF.INET6):
        ip = _ip(str(proxy.src_addr))
        if ip is not None:
            return str(ip)
    return _peer_ip(session)


def protocol_factory(relay: Relay, gate: Gate | None = None, starttls: ssl.SSLContext | None = None,
                     tls_label: str = "", handler: Handler | None = None) -> Any:
    """Protocols for one listener: ``starttls`` offers STARTTLS with that context; ``gate`` and
    ``handler`` are shared by every listener of the process (session limits and drain; the queue
    depth count)."""
    handler = handler if handler is not None else Handler(relay)
    gate = gate if gate is not None else Gate(relay)
    return lambda: RelaySMTP(relay, handler, gate=gate, tls_label=tls_label, tls_context=starttls)
