"""The load: N open SMTP connections, each sending messages back to back.

One transaction per message on a reused connection (MAIL, RCPT, DATA, body, final dot).
:func:`run` drives every connection from this process and times what the benchmark reports as
latency: from writing the final dot to reading the server's reply to it (end of DATA -> 250); it
counts accepted and refused messages.

:func:`run_with_smtp_source` is the issue's load where Postfix's ``smtp-source`` is installed: it
carries all but a few of the connections (C, a few tens of microseconds of CPU a message, where
this process's asyncio needs about 0.2 ms: on a 2-core machine that CPU is taken from the
programs measured), and the few connections left to :func:`run`'s code are the latency probes.
``smtp-source`` stops at the first unexpected reply, so it carries only loads that are accepted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    sent: int = 0
    accepted: int = 0
    refused: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)   # end of DATA -> reply, accepted only

    def percentile(self, p: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def _connection(port: int, mail_from: str, rcpt: str, body: bytes, count: int, result: LoadResult,
                      until: asyncio.Event | None = None) -> None:
    """``count`` messages on one connection, or as many as it can send before ``until`` is set."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        writer.write(b"EHLO load.bench.test\r\n")
        await _reply(reader)
        envelope = f"MAIL FROM:<{mail_from}>\r\n".encode(), f"RCPT TO:<{rcpt}>\r\n".encode()
        for _ in range(count):
            if until is not None and until.is_set():
                break
            result.sent += 1
            writer.write(envelope[0])
            if not (await _reply(reader)).startswith(b"250"):
                result.refused += 1
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(envelope[1])
            if not (await _reply(reader)).startswith(b"250"):
                result.refused += 1
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(b"DATA\r\n")
            if not (await _reply(reader)).startswith(b"354"):
                result.errors += 1
                continue
            writer.write(body)
            await writer.drain()
            start = time.perf_counter()
            writer.write(b".\r\n")
            answer = await _reply(reader)
            if answer.startswith(b"250"):
                result.accepted += 1
                result.latencies.append(time.perf_counter() - start)
            elif answer[:1] == b"5":
                result.refused += 1
            else:
                result.errors += 1
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    except (ConnectionError, OSError):
        result.errors += 1
    finally:
        writer.close()


def stuffed(message: bytes) -> bytes:
    data = message.replace(b"\r\n.", b"\r\n..")
    return (b"." + data) if data.startswith(b".") else data


async def run(port: int, mail_from: str, rcpt: str, message: bytes, total: int, connections: int) -> LoadResult:
    result = LoadResult()
    body = stuffed(message if message.endswith(b"\r\n") else message + b"\r\n")
    per = [total // connections + (1 if i < total % connections else 0) for i in range(connections)]
    start = time.perf_counter()
    await asyncio.gather(*(_connection(port, mail_from, rcpt, body, n, result) for n in per if n))
    result.seconds = time.perf_counter() - start
    return result


SMTP_SOURCE = shutil.which("smtp-source", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin")


async def run_with_smtp_source(port: int, mail_from: str, rcpt: str, message: bytes, total: int, connections: int,
                               probes: int) -> LoadResult:
    """``connections - probes`` sessions of ``smtp-source -d`` sending their share of ``total``,
    and ``probes`` timed connections of this process sending until ``smtp-source`` is done: the
    latencies are the probes' (each connection sees the same server, so they stand for all)."""
    assert SMTP_SOURCE is not None and 0 < probes < connections
    result = LoadResult()
    body = stuffed(message if message.endswith(b"\r\n") else message + b"\r\n")
    share = total * (connections - probes) // connections
    with tempfile.NamedTemporaryFile(suffix=".eml") as f:
        # smtp-source -F sends the file's lines with CRLF appended, dot-stuffed.
        f.write(message.replace(b"\r\n", b"\n"))
        f.flush()
        done = asyncio.Event()
        start = time.perf_counter()
        probing = [asyncio.create_task(_connection(port, mail_from, rcpt, body, total, result, until=done))
                   for _ in range(probes)]
        source = await asyncio.create_subprocess_exec(
            SMTP_SOURCE, "-d", "-s", str(connections - probes), "-m", str(share), "-M", "load.bench.test",
            "-f", mail_from, "-t", rcpt, "-F", f.name, f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await source.communicate()
        done.set()
        await asyncio.gather(*probing)
        result.seconds = time.perf_counter() - start
    result.sent += share
    if source.returncode == 0:
        result.accepted += share
    else:                   # it stopped at an unexpected reply: how many it sent is unknown
        result.errors += 1
        print(f"smtp-source failed ({source.returncode}): {err.decode(errors='replace').strip()[-300:]}")
    return result
