"""Delivery's PIPELINING (RFC 2920) against a scripted server on loopback.

The server answers a transaction's commands only once it has read its DATA: a client that
waited for MAIL's reply before writing RCPT would hang here.  Its replies come in one write,
or a few bytes at a time (a reply split mid-line, several replies in one read), and every
reply is checked: refused recipients, a refused sender, a server that opens DATA without a
valid recipient, extra replies, a connection lost after the group.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import uvloop
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH
from delivery_harness import settings_for

from bsm_relay.relay.delivery import SmarthostTarget
from bsm_relay.relay.pipelining import PipeliningProtocol

SENDER = "b-x@marketplace.example"
BODY = b"From: a@marketplace.example\r\nTo: bea@buyers.example\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"

Answer = Callable[[bytes], bytes]


def usual(command: bytes) -> bytes:
    if command.startswith(b"DATA"):
        return b"354 go ahead\r\n"
    return b"250 2.0.0 ok\r\n"


@dataclass
class Scripted:
    """An SMTP server that offers PIPELINING and answers each group of commands at once."""

    answer: Answer = usual
    trickle: bool = False               # replies a few bytes a write
    extra: bytes = b""                  # sent after a group's replies (a server out of step)
    close_after_group: bool = False
    groups: list[list[bytes]] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def start(self) -> asyncio.base_events.Server:
        server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not self.trickle:
            writer.write(data)
            await writer.drain()
            return
        for i in range(0, len(data), 5):
            writer.write(data[i:i + 5])
            await writer.drain()
            await asyncio.sleep(0.002)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 scripted ESMTP\r\n")
        group: list[bytes] = []
        try:
            while line := await reader.readline():
                command = line.rstrip(b"\r\n")
                verb = command[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-scripted\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif verb in (b"RSET", b"NOOP"):
                    writer.write(b"250 ok\r\n")
                else:
                    group.append(command)
                    if verb != b"DATA":
                        continue              # MAIL and RCPT are answered with DATA
                    self.groups.append(group)
                    replies = [self.answer(c) for c in group]
                    group = []
                    await self._send(writer, b"".join(replies) + self.extra)
                    if self.close_after_group:
                        break
                    if replies[-1].startswith(b"354"):
                        data = b""
                        while not data.endswith(b"\r\n.\r\n") and data != b".\r\n":
                            line = await reader.readline()
                            if not line:
                                return            # the client went away in the middle
                            data += line
                        self.messages.append(data)
                        await self._send(writer, b"250 2.0.0 queued\r\n")
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):  # type: ignore[no-untyped-def]
    """Each test on both loops the relay runs on (uvloop's transports keep the protocol's methods
    from when it was set, asyncio's look them up on each call), with its scripted servers closed
    at the end."""
    runner = asyncio.run if request.param == "asyncio" else uvloop.run

    def go(case: Callable[[Callable[..., Any]], Awaitable[None]]) -> None:
        async def main() -> None:
            servers: list[asyncio.base_events.Server] = []

            async def scripted(**kwargs: Any) -> Scripted:
                s = Scripted(**kwargs)
                servers.append(await s.start())
                return s
            try:
                await asyncio.wait_for(case(scripted), 60)
            finally:
                for server in servers:
                    server.close()
        runner(main())
    return go


def target(tmp_path: Path, port: int) -> SmarthostTarget:
    settings = settings_for(tmp_path, port)      # a reply that never comes fails in 5 s, not 5 min
    return SmarthostTarget(dataclasses.replace(settings, delivery=dataclasses.replace(settings.delivery, timeout=5)))


@pytest.mark.parametrize("trickle", [False, True])
def test_mail_rcpts_and_data_go_in_one_group_and_every_reply_is_read(tmp_path, run, trickle):
    async def case(scripted: Any) -> None:
        server = await scripted(trickle=trickle)
        smarthost = target(tmp_path, server.port)
        for _ in range(3):       # the same connection, again and again: replies never fall out of step
            result = await asyncio.wait_for(
                smarthost.send(SENDER, ["bea@buyers.example", "bob@buyers.example"], BODY), 10)
            assert result.delivered == ["bea@buyers.example", "bob@buyers.example"], result
        assert server.connections == 1
        assert server.groups == [[b"MAIL FROM:<b-x@marketplace.example>", b"RCPT TO:<bea@buyers.example>",
                                  b"RCPT TO:<bob@buyers.example>", b"DATA"]] * 3
        assert server.messages[0] == BODY.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    run(case)


def test_a_refused_recipient_is_told_apart_from_the_delivered_one(tmp_path, run):
    async def case(scripted: Any) -> None:
        def answer(command: bytes) -> bytes:
            if command == b"RCPT TO:<bob@buyers.example>":
                return b"550 5.1.1 no such user\r\n"
            if command == b"RCPT TO:<cat@buyers.example>":
                return b"452 4.2.2 mailbox full\r\n"
            return usual(command)
        server = await scripted(answer=answer)
        result = await target(tmp_path, server.port).send(
            SENDER, ["bea@buyers.example", "bob@buyers.example", "cat@buyers.example"], BODY)
        assert result.delivered == ["bea@buyers.example"]
        assert result.failed == {"bob@buyers.example": "550 5.1.1 no such user"}
        assert result.deferred == {"cat@buyers.example": "452 4.2.2 mailbox full"}
        assert len(server.messages) == 1
    run(case)


def test_a_refused_sender_fails_every_recipient_and_sends_no_data(tmp_path, run):
    async def case(scripted: Any) -> None:
        def answer(command: bytes) -> bytes:
            return b"553 5.7.1 sender refused\r\n" if command.startswith(b"MAIL") else b"503 5.5.1 no MAIL\r\n"
        server = await scripted(answer=answer)
        result = await target(tmp_path, server.port).send(SENDER, ["bea@buyers.example"], BODY)
        assert result.failed == {"bea@buyers.example": "553 5.7.1 sender refused"} and not result.delivered
        assert server.messages == []
    run(case)


def test_data_opened_without_a_valid_recipient_is_ended_empty_and_the_connection_kept(tmp_path, run):
    async def case(scripted: Any) -> None:
        # RFC 2920 3.1 says DATA must then be refused; a server that opens it anyway gets an empty
        # message ended at once (never the body), and the connection stays in step for the next one.
        refuse = {"on": True}

        def answer(command: bytes) -> bytes:
            if command.startswith(b"RCPT") and refuse["on"]:
                return b"550 5.1.1 no such user\r\n"
            return usual(command)
        server = await scripted(answer=answer)
        smarthost = target(tmp_path, server.port)
        result = await smarthost.send(SENDER, ["bea@buyers.example"], BODY)
        assert result.failed == {"bea@buyers.example": "550 5.1.1 no such user"}
        assert server.messages == [b".\r\n"]
        refuse["on"] = False
        result = await smarthost.send(SENDER, ["bea@buyers.example"], BODY)
        assert result.delivered == ["bea@buyers.example"]
        assert server.messages[1].endswith(b"body\r\n.\r\n") and server.connections == 1
    run(case)


def test_replies_nobody_asked_for_defer_the_message_and_drop_the_connection(tmp_path, run):
    async def case(scripted: Any) -> None:
        server = await scripted(extra=b"250 2.0.0 and one more\r\n")
        smarthost = target(tmp_path, server.port)
        result = await smarthost.send(SENDER, ["bea@buyers.example"], BODY)
        assert result.deferred and result.deferred["bea@buyers.example"].startswith("451")
        assert server.messages == []                     # no body after replies out of step
        server.extra = b""
        result = await smarthost.send(SENDER, ["bea@buyers.example"], BODY)
        assert result.delivered == ["bea@buyers.example"] and server.connections == 2
    run(case)


def test_a_connection_lost_after_the_group_defers_the_message(tmp_path, run):
    async def case(scripted: Any) -> None:
        # MAIL and RCPT answered, then the connection closed instead of DATA's reply.
        server = await scripted(close_after_group=True, answer=lambda c: b"" if c == b"DATA" else usual(c))
        result = await asyncio.wait_for(target(tmp_path, server.port).send(SENDER, ["bea@buyers.example"], BODY), 10)
        assert result.deferred and not result.delivered and server.messages == []
    run(case)


def test_groups_after_starttls_over_a_real_smtp_server(tmp_path, run):
    # aiosmtpd behind STARTTLS and AUTH, offering PIPELINING: the session is aiosmtplib's, the
    # transactions after it go in groups over TLS (the protocol swapped on the TLS transport).
    from aiosmtpd.controller import Controller
    from delivery_harness import SmarthostAuth
    from helpers import RecordingHandler, free_port
    from tlsutil import make_cert, server_context

    from bsm_relay.relay.pipelining import PipeliningProtocol

    class Pipelining(RecordingHandler):
        async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
            session.host_name = hostname
            return [*responses[:-1], "250-PIPELINING", responses[-1]]

    cert, key = make_cert(tmp_path)
    handler, port = Pipelining(), free_port()
    server = Controller(handler, hostname="127.0.0.1", port=port, tls_context=server_context(cert, key),
                        require_starttls=True, authenticator=SmarthostAuth(), auth_required=True)
    server.start()
    try:
        async def case(scripted: Any) -> None:
            base = settings_for(tmp_path, port)
            smarthost = SmarthostTarget(dataclasses.replace(base, delivery=dataclasses.replace(
                base.delivery, smarthost_tls="required", smarthost_user="relay", smarthost_password="s3cret",
                timeout=5)))
            for rcpt in ("bea@buyers.example", "bob@buyers.example"):
                result = await smarthost.send(SENDER, [rcpt], BODY)
                assert result.delivered == [rcpt], result
            (_, client), = smarthost._idle
            assert type(client.protocol) is PipeliningProtocol and client.get_transport_info("sslcontext")
        run(case)
    finally:
        server.stop()
    assert [m.rcpt_tos for m in handler.messages] == [["bea@buyers.example"], ["bob@buyers.example"]]


def test_data_after_a_parsed_reply_is_bounded_as_aiosmtplib_bounds_a_reply():
    """Between a reply being parsed and the group's reader picking it up, what the server sends
    next is kept for the next replies; a line that never ends is not kept past aiosmtplib's
    bound on a reply but ends the group with an error."""
    class Transport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    async def main() -> None:
        proto = PipeliningProtocol(loop=asyncio.get_running_loop())
        proto.connection_made(Transport())           # type: ignore[arg-type]
        proto.replies = deque()
        proto.data_received(b"250 2.1.0 sender ok\r\n")  # the waiting read's reply
        assert proto._response_waiter is not None and proto._response_waiter.done()
        proto.data_received(b"250 2.1.5 recipient ok\r\n354 go")
        assert [r.code for r in proto.replies] == [250] and proto.error is None   # the next, kept
        for _ in range(16):
            proto.data_received(b"x" * 8192)
            assert len(proto._buffer) <= MAX_RESPONSE_LENGTH
        assert isinstance(proto.error, aiosmtplib.SMTPResponseException) and proto.error.code == -1
    asyncio.run(main())
