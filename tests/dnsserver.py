"""A small, real DNS responder for the tests (and the benchmark).

It answers over UDP and TCP on 127.0.0.1 (one ephemeral port for both), from a
zone held in a plain dict, with dnspython's own message and rdata classes, so the
relay's resolver is exercised exactly as it is against a real server: truncation
and the retry over TCP, NXDOMAIN against NODATA, SERVFAIL, slow and lost answers.

    zone = {
        ("example.com.", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
        ("example.com.", "MX"): ["10 mx.example.com."],
        ("mx.example.com.", "A"): ["127.0.0.1"],
    }
    async with DnsServer(zone) as dns:          # in a pytest-asyncio test
        resolver = make_resolver([dns.nameserver])

    server = DnsServer(zone)                    # for a relay run as a subprocess
    host, port = server.start_in_thread()
    ...
    server.stop()

``spf_fallback`` answers the TXT query of any host name the zone has no TXT for
(never a ``_domainkey``/``_dmarc`` name), so made-up test domains all publish SPF.

Fault injection is per name (or per ``(name, type)``): ``servfail`` and ``drop``
are sets, ``delay`` maps to seconds.  A delayed answer is scheduled on the loop, so
other queries keep being answered meanwhile.  The zone, the fault sets and the
``queries`` log may be changed while the server runs (from the test's thread).

A TXT value longer than 255 bytes is split into 255-byte character-strings, as a
zone file would have to; a UDP answer larger than the client allows (512 bytes
without EDNS) is sent truncated so the client retries over TCP.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Iterable
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

TTL = 60
_UDP_DEFAULT_PAYLOAD = 512


def _norm_name(name: str) -> str:
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def _norm_key(key: Any) -> Any:
    """``"Example.COM"`` -> ``"example.com."``; ``("x", "txt")`` -> ``("x.", "TXT")``."""
    if isinstance(key, tuple):
        name, rdtype = key
        return (_norm_name(name), rdtype.upper())
    return _norm_name(key)


class Zone(dict):  # type: ignore[type-arg]
    """A dict of ``(name, type) -> [values]`` whose keys are normalised on the way in."""

    def __init__(self, records: dict[tuple[str, str], Iterable[str]] | None = None) -> None:
        super().__init__()
        for key, values in (records or {}).items():
            self[key] = values

    def __setitem__(self, key: tuple[str, str], values: Iterable[str] | str) -> None:
        if isinstance(values, (str, bytes)):
            values = [values]
        super().__setitem__(_norm_key(key), list(values))

    def __getitem__(self, key: tuple[str, str]) -> list[str]:
        return super().__getitem__(_norm_key(key))  # type: ignore[no-any-return]

    def __delitem__(self, key: tuple[str, str]) -> None:
        super().__delitem__(_norm_key(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(_norm_key(key))

    def get(self, key: tuple[str, str], default: Any = None) -> Any:
        return super().get(_norm_key(key), default)

    def pop(self, key: tuple[str, str], *default: Any) -> Any:
        return super().pop(_norm_key(key), *default)

    def name_exists(self, name: str) -> bool:
        """True for an owner name or an empty non-terminal above one (RFC 8020)."""
        suffix = "." + name
        return any(n == name or n.endswith(suffix) for n, _ in list(self.keys()))


class _NormSet(set):  # type: ignore[type-arg]
    """A set of names or ``(name, type)`` pairs, normalised like the zone's keys."""

    def __init__(self, items: Iterable[Any] = ()) -> None:
        super().__init__(_norm_key(i) for i in items)

    def add(self, item: Any) -> None:
        super().add(_norm_key(item))

    def discard(self, item: Any) -> None:
        super().discard(_norm_key(item))

    def remove(self, item: Any) -> None:
        super().remove(_norm_key(item))

    def __contains__(self, item: object) -> bool:
        return super().__contains__(_norm_key(item))


class _NormDict(dict):  # type: ignore[type-arg]
    def __init__(self, items: dict[Any, float] | None = None) -> None:
        super().__init__()
        for k, v in (items or {}).items():
            self[k] = v

    def __setitem__(self, key: Any, value: float) -> None:
        super().__setitem__(_norm_key(key), value)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(_norm_key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(_norm_key(key), default)

    def pop(self, key: Any, *default: Any) -> Any:
        return super().pop(_norm_key(key), *default)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(_norm_key(key))


def _rdata(rdtype: str, value: str | bytes) -> dns.rdata.Rdata:
    if rdtype == "TXT":
        raw = value.encode() if isinstance(value, str) else value
        chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
        return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)
    text = value.decode() if isinstance(value, bytes) else value
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)


class DnsServer:
    """See the module docstring.  ``queries`` and ``answers`` log ``(transport, name, type)``."""

    def __init__(
        self,
        zone: dict[tuple[str, str], Iterable[str]] | None = None,
        *,
        servfail: Iterable[Any] = (),
        delay: dict[Any, float] | None = None,
        drop: Iterable[Any] = (),
        host: str = "127.0.0.1",
        spf_fallback: str | None = None,
    ) -> None:
        self.zone = Zone(zone)
        # The TXT answer for any host name (no "_" label) without TXT records in the zone,
        # e.g. "v=spf1 ip4:127.0.0.0/8 -all": every domain a test makes up gets an SPF record.
        self.spf_fallback = spf_fallback
        self.servfail = _NormSet(servfail)
        self.delay = _NormDict(delay)
        self.drop = _NormSet(drop)
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str, str]] = []
        self.answers: list[tuple[str, str, str]] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._pending: set[asyncio.TimerHandle] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_stop: asyncio.Event | None = None

    # -- where to point a resolver ------------------------------------------

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, the form ``[dns] nameservers`` takes."""
        return f"{self.host}:{self.port}"

    def queried(self, name: str, rdtype: str | None = None) -> int:
        """How many queries for ``name`` (and ``rdtype``) arrived so far."""
        return self._count(self.queries, name, rdtype)

    def answered(self, name: str, rdtype: str | None = None) -> int:
        """How many answers for ``name`` (and ``rdtype``) were sent so far."""
        return self._count(self.answers, name, rdtype)

    @staticmethod
    def _count(log: list[tuple[str, str, str]], name: str, rdtype: str | None) -> int:
        name = _norm_name(name)
        return sum(1 for _, n, t in list(log) if n == name and (rdtype is None or t == rdtype))

    # -- life cycle on the caller's loop ------------------------------------

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._loop = loop
        # One port for UDP and TCP: take an ephemeral UDP port, then bind TCP to it.
        last_error: OSError | None = None
        for _ in range(20):
            transport, _proto = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, 0))
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError as exc:
                transport.close()
                last_error = exc
                continue
            self._udp = transport  # type: ignore[assignment]
            self.port = port
            return self.host, port
        raise RuntimeError(f"could not bind UDP and TCP on one port: {last_error}")

    async def aclose(self) -> None:
        for item in list(self._pending):
            item.cancel()
        self._pending.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            # Connections a client left open (or that wait on a dropped query) are closed too;
            # wait_closed() waits for them on Python 3.12+.
            for writer in list(self._writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- life cycle in a thread of its own ------------------------------------

    def start_in_thread(self) -> tuple[str, int]:
        started = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._thread_stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as exc:  # handed to the starting thread
                failure.append(exc)
                started.set()
                return
            started.set()
            await self._thread_stop.wait()
            await self.aclose()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="test-dns", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]
        return self.host, self.port

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._loop is not None and self._thread_stop is not None
        self._loop.call_soon_threadsafe(self._thread_stop.set)
        self._thread.join(10)
        self._thread = None

    # -- answering -----------------------------------------------------------

    def _fault(self, faults: Any, name: str, rdtype: str) -> bool:
        return name in faults or (name, rdtype) in faults

    def _handle(self, wire: bytes, transport: str, send: Any) -> None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return
        if not query.question:
            return
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((transport, name, rdtype))
        if self._fault(self.drop, name, rdtype):
            return
        delay = self.delay.get((name, rdtype), self.delay.get(name, 0.0))

        handles: list[asyncio.TimerHandle] = []

        def answer() -> None:
            for handle in handles:
                self._pending.discard(handle)
            response = self._response(query, name, rdtype)
            send(self._to_wire(response, query, transport))
            self.answers.append((transport, name, rdtype))

        if delay:
            assert self._loop is not None
            handles.append(self._loop.call_later(delay, answer))
            self._pending.update(handles)
        else:
            answer()

    def _response(self, query: dns.message.Message, name: str, rdtype: str) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self._fault(self.servfail, name, rdtype):
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        owner, seen = name, set()
        while True:  # follow CNAMEs inside the zone
            values = self.zone.get((owner, rdtype))
            if values is not None or rdtype == "CNAME":
                break
            target = self.zone.get((owner, "CNAME"))
            if not target or owner in seen:
                break
            seen.add(owner)
            response.answer.append(self._rrset(owner, "CNAME", target[:1]))
            owner = _norm_name(target[0])
        if not values and rdtype == "TXT" and self.spf_fallback and not response.answer \
                and not any(label.startswith("_") for label in owner.split(".")):
            values = [self.spf_fallback]
        if values:
            response.answer.append(self._rrset(owner, rdtype, values))
        elif not response.answer and not self.zone.name_exists(owner):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    @staticmethod
    def _rrset(owner: str, rdtype: str, values: list[str]) -> dns.rrset.RRset:
        rrset = dns.rrset.RRset(dns.name.from_text(owner), dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))
        for value in values:
            rrset.add(_rdata(rdtype, value), TTL)
        return rrset

    @staticmethod
    def _to_wire(response: dns.message.Message, query: dns.message.Message, transport: str) -> bytes:
        if transport == "tcp":
            return response.to_wire(max_size=65535)
        limit = max(query.payload, _UDP_DEFAULT_PAYLOAD) if query.edns >= 0 else _UDP_DEFAULT_PAYLOAD
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(data: bytes) -> None:
            if not writer.is_closing():
                writer.write(struct.pack("!H", len(data)) + data)

        self._writers.add(writer)
        try:
            while True:
                head = await reader.readexactly(2)
                wire = await reader.readexactly(struct.unpack("!H", head)[0])
                self._handle(wire, "tcp", send)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        def send(wire: bytes) -> None:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(wire, addr)

        self.server._handle(data, "udp", send)
