"""PIPELINING (RFC 2920) for delivery's transactions on aiosmtplib's connections.

aiosmtplib reads one reply per command and drops data that arrives while a parsed reply waits
to be picked up: MAIL, RCPT and DATA written at once would lose replies.  Delivery keeps
aiosmtplib for the session (connect, EHLO, STARTTLS, AUTH) and, on a server that offers
PIPELINING, writes a transaction's MAIL, RCPTs and DATA in one write and reads their replies
here: two writes and two round trips a message instead of four (docs/decisions/0018).

The protocol's class is swapped in place (aiosmtplib builds it by name, with no factory to
pass): outside a group (:func:`exchange`) it behaves exactly as aiosmtplib's.  STARTTLS and
AUTH happen before any group, so nothing sent before TLS can be kept past it.
"""

from __future__ import annotations

from collections import deque

import aiosmtplib
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol that, while a group's replies are read (``replies`` is not None),
    keeps every complete reply in order instead of dropping the ones after the first."""

    replies: deque[SMTPResponse] | None = None
    error: Exception | None = None       # a malformed reply met after the first of a read

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if self.replies is None or waiter is None:
            super().data_received(data)
            return
        if self._response_pending and not waiter.done():
            super().data_received(data)       # the first complete reply goes to the waiting read
            if not waiter.done():
                return                        # nothing complete yet: the buffer holds it
        elif self.error is not None:
            return                            # the group has failed: its reader closes the connection
        else:
            # Replies after one that is parsed and not yet picked up: kept, within aiosmtplib's
            # bound on a reply (a server that never ends a line is not buffered without end).
            self._buffer.extend(data)
            if len(self._buffer) > MAX_RESPONSE_LENGTH:
                del self._buffer[:]
                self.error = aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response.value,
                                                              "Response too long")
                return
        try:
            while (response := self._read_response_from_buffer()) is not None:
                self.replies.append(response)
        except Exception as exc:  # noqa: BLE001 - raised to the group's reader, in order
            self.error = exc
            del self._buffer[:]


def protocol(client: aiosmtplib.SMTP) -> PipeliningProtocol:
    proto = client.protocol
    if proto is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if type(proto) is SMTPProtocol:
        proto.__class__ = PipeliningProtocol
        if proto.transport is not None:
            # uvloop's transports keep the protocol's bound methods from when it was set: set
            # again, so that they are the new class's.
            proto.transport.set_protocol(proto)
    assert isinstance(proto, PipeliningProtocol)
    return proto


async def exchange(client: aiosmtplib.SMTP, group: bytes, count: int) -> list[SMTPResponse]:
    """Write ``group`` (``count`` commands, the last one DATA or a command that ends the group)
    in one write and return the ``count`` replies, in order.  A server that answers more than
    it was asked is out of step: the connection is closed."""
    proto = protocol(client)
    proto.replies, proto.error = deque(), None
    out: list[SMTPResponse] = []
    try:
        proto.write(group)
        while len(out) < count:
            if proto.replies:
                out.append(proto.replies.popleft())
            elif proto.error is not None:
                client.close()                 # the replies are out of step from here on
                raise proto.error
            else:
                out.append(await proto.read_response(timeout=client.timeout))
        if proto.replies or proto.error is not None:
            client.close()
            raise aiosmtplib.SMTPResponseException(451, "4.5.0 the server sent replies nobody asked for")
    finally:
        proto.replies = None
    return out
