"""SMTP in: the aiosmtpd protocol and handler, and nothing else.

Recipients are routed and resolved at RCPT (refusals before DATA cost nothing);
the message is judged after DATA by ``intake``.  Every reply comes from the
catalogue in ``policy.reasons``; an unexpected failure answers ``451 4.3.0`` with
no internals, never aiosmtpd's default ``500 Error: (SomeException)``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import secrets
from typing import Any

from aiosmtpd.proxy_protocol import AF, ProxyData
from aiosmtpd.smtp import SMTP, Envelope, Session

from ..aliases.routing import Kind, route
from ..policy.reasons import reply, reply_for
from . import bounce_in, intake, log
from .context import Relay
from .queue import StorageError

_RCPT_ARG = re.compile(r"TO:\s*<([^<>]*)>\s*(.*)", re.IGNORECASE | re.ASCII)
_RCPT_BARE = re.compile(r"TO:\s*(\S+)\s*(.*)", re.IGNORECASE | re.ASCII)

# Seconds a trusted proxy has to send its PROXY header after connecting.
PROXY_TIMEOUT = 10.0


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with a strict, cheap RCPT parser and per-session limits."""

    def __init__(self, relay: Relay, handler: Handler, **kwargs: Any) -> None:
        settings = relay.settings.smtp
        if settings.proxy_protocol:
            # aiosmtpd then reads a PROXY v1/v2 header before the greeting and asks handle_PROXY.
            kwargs.setdefault("proxy_protocol_timeout", PROXY_TIMEOUT)
        super().__init__(handler, hostname=settings.hostname, data_size_limit=settings.max_message_size,
                         timeout=settings.timeout, ident="bsm-relay", **kwargs)
        self.relay = relay
        self.bad_recipients = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None  # not the TLS layer of a STARTTLS
        super().connection_made(transport)
        assert self.session is not None
        if first and self.relay.settings.smtp.proxy_protocol \
                and not self.event_handler.trusted_proxy(self.session.peer):
            # Only a configured proxy may connect when PROXY is expected: anyone else is cut off
            # before a byte is read (handle_PROXY checks again, should this ever be skipped).
            self.event_handler.proxy_refused(self.session)
            transport.close()

    def _create_session(self) -> Session:
        session = super()._create_session()
        session.id = secrets.token_hex(6)  # type: ignore[attr-defined]
        return session

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
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.log = log.get()
        self.trusted_proxies = [ipaddress.ip_network(entry.strip(), strict=False)
                                for entry in relay.settings.smtp.trusted_proxies]

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
        if ref is None or await self.relay.store.is_revoked(token):
            return None
        seller = await self.relay.store.seller(id=ref.seller_id)
        buyer = await self.relay.store.buyer(id=ref.buyer_id)
        if seller is None or buyer is None:
            return None
        return intake.Recipient(address, ref, seller, buyer)

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
        except StorageError:
            self.log.error("store.error", session=tx.session_id)
            return reply("local.storage")
        if not outcome.decision.accepted:
            self.log.info("smtp.rejected", stage="data", reason=outcome.decision.reason,
                          session=tx.session_id, **outcome.log)
            return reply_for(outcome.decision)
        if not outcome.queue_ids:   # only bounce addresses: handled, nothing of the sender's queued
            self.log.info("bounce.received", session=tx.session_id, **outcome.log)
            return reply("ok.bounce")
        for qid in outcome.queue_ids:
            self.log.info("message.accepted", queue_id=qid, session=tx.session_id, size=len(content),
                          **outcome.log)
        return reply("ok.queued", queue_id=" ".join(outcome.queue_ids))

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.CancelledError):  # pragma: no cover - re-raised by aiosmtpd
            raise error
        self.log.error("smtp.error", error_type=type(error).__name__, exc_info=error)
        return reply("local.error")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as the relay compares it: an IPv4-mapped IPv6 peer counts as its IPv4 address."""
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


def protocol_factory(relay: Relay) -> Any:
    handler = Handler(relay)
    return lambda: RelaySMTP(relay, handler)
