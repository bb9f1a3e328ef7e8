"""Delivery against real downstreams that misbehave: Postfix's smtp-sink scripted to refuse,
defer, drop the connection before the final reply or answer slowly; and MX delivery against
the test DNS server (null MX, no MX with A fallback, NXDOMAIN, SERVFAIL)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from delivery_harness import ALIASES, SELLER, dsns, enqueue, item, run_until, sessions, settings_for  # noqa: F401
from dnsserver import DnsServer

from bsm_relay.relay.delivery import MxTarget
from bsm_relay.relay.dns import make_resolver
from helpers import Sink, free_port

SMTP_SINK = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None)
needs_smtp_sink = pytest.mark.skipif(SMTP_SINK is None, reason="Postfix's smtp-sink is not installed")
RCPT = "bea@buyers.example"


class PostfixSink:
    """Postfix's smtp-sink on a loopback port, dumping each accepted message into a directory."""

    def __init__(self, tmp_path: Path, *options: str) -> None:
        self.port = free_port()
        self.dumps = tmp_path / f"dumps-{self.port}"
        self.dumps.mkdir()
        user = ["-u", pwd.getpwuid(os.getuid()).pw_name] if os.getuid() == 0 else []
        self.proc = subprocess.Popen([SMTP_SINK, *user, "-d", f"{self.dumps}/msg.", *options, f"127.0.0.1:{self.port}", "32"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        import socket
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("smtp-sink did not start")

    def count(self) -> int:
        return len(list(self.dumps.iterdir()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


@pytest.fixture
def postfix_sinks(tmp_path):
    started: list[PostfixSink] = []

    def start(*options: str, port: int | None = None) -> PostfixSink:
        s = PostfixSink(tmp_path, *options)
        started.append(s)
        return s
    yield start
    for s in started:
        if s.proc.poll() is None:
            s.stop()


def with_port(settings, port: int, **delivery):
    return dataclasses.replace(settings, delivery=dataclasses.replace(
        settings.delivery, smarthost=f"127.0.0.1:{port}", **delivery))


@needs_smtp_sink
async def test_smtp_sink_soft_reject_is_retried_until_it_recovers(tmp_path, sessions, postfix_sinks):
    bad = postfix_sinks("-r", "RCPT")
    settings = settings_for(tmp_path, bad.port)
    await enqueue(sessions, "qsoft", [(RCPT, ALIASES[0])])

    async def two_attempts():
        return (await item(sessions, "qsoft"))["attempts"] >= 2
    await run_until(settings, sessions, two_attempts)
    row = await item(sessions, "qsoft")
    assert row["status"] == "queued" and row["last_error"].startswith("4")
    assert bad.count() == 0
    good = postfix_sinks()

    async def delivered():
        return (await item(sessions, "qsoft"))["status"] == "done"
    await run_until(with_port(settings, good.port), sessions, delivered)
    assert good.count() == 1


@needs_smtp_sink
async def test_smtp_sink_hard_reject_is_not_retried_and_bounces(tmp_path, sessions, postfix_sinks):
    sink = postfix_sinks("-f", "RCPT")
    settings = settings_for(tmp_path, sink.port)
    await enqueue(sessions, "qhard", [(RCPT, ALIASES[0])])

    async def failed():
        return (await item(sessions, "qhard"))["status"] == "done"
    await run_until(settings, sessions, failed)
    row = await item(sessions, "qhard")
    assert row["attempts"] == 1 and row["recipients"][0]["status"] == "failed"
    # The DSN to the approved sender is queued (smtp-sink refuses it too, and a bounce never bounces).
    from bsm_relay.relay.queue import list_items
    notices = [r for r in await list_items(sessions, include_done=True) if r["kind"] == "notice"]
    assert len(notices) == 1 and notices[0]["recipients"][0]["alias"] == SELLER


@needs_smtp_sink
async def test_smtp_sink_lost_final_reply_is_temporary_and_retried(tmp_path, sessions, postfix_sinks):
    dropper = postfix_sinks("-q", ".")
    settings = settings_for(tmp_path, dropper.port)
    await enqueue(sessions, "qlost", [(RCPT, ALIASES[0])])

    async def one_attempt():
        return (await item(sessions, "qlost"))["attempts"] >= 1
    await run_until(settings, sessions, one_attempt)
    row = await item(sessions, "qlost")
    assert row["status"] == "queued" and row["last_error"].startswith("451")
    good = postfix_sinks()

    async def delivered():
        return (await item(sessions, "qlost"))["status"] == "done"
    await run_until(with_port(settings, good.port), sessions, delivered)
    assert good.count() == 1     # delivered; the first sink may hold a duplicate, never a loss


@needs_smtp_sink
async def test_smtp_sink_slow_final_reply_waits_up_to_the_timeout(tmp_path, sessions, postfix_sinks):
    slow = postfix_sinks("-W", ".:2")
    settings = with_port(settings_for(tmp_path, 0), slow.port, timeout=0.5)
    await enqueue(sessions, "qslow", [(RCPT, ALIASES[0])])

    async def one_attempt():
        return (await item(sessions, "qslow"))["attempts"] >= 1
    await run_until(settings, sessions, one_attempt)
    assert (await item(sessions, "qslow"))["status"] == "queued"        # timed out: deferred
    patient = with_port(settings, slow.port, timeout=10.0)

    async def delivered():
        return (await item(sessions, "qslow"))["status"] == "done"
    await run_until(patient, sessions, delivered, timeout=30)


# -- MX delivery against the test DNS server ----------------------------------------------------------

@pytest.fixture
async def dns_zone():
    server = DnsServer({
        ("nullmx.example", "MX"): ["0 ."],
        ("amx.example", "A"): ["127.0.0.1"],                     # no MX: A fallback
        ("withmx.example", "MX"): ["10 mail.withmx.example."],
        ("mail.withmx.example", "A"): ["127.0.0.1"],
    }, servfail={"broken.example"})
    async with server:
        yield server


@pytest.mark.parametrize("domain,outcome", [
    ("withmx.example", "delivered"),
    ("amx.example", "delivered"),
    ("nullmx.example", "5.1.10"),
    ("nxdomain.example", "5.1.2"),
    ("broken.example", "deferred"),
])
async def test_mx_delivery(tmp_path, sessions, dns_zone, domain, outcome):
    with Sink() as sink:
        settings = settings_for(tmp_path, 0)
        settings = dataclasses.replace(settings, delivery=dataclasses.replace(
            settings.delivery, mode="mx", mx_port=sink.port))
        target = MxTarget(settings, make_resolver([dns_zone.nameserver], timeout=1.0))
        rcpt = f"someone@{domain}"
        await enqueue(sessions, "qmx", [(rcpt, ALIASES[0])])

        async def attempted():
            return (await item(sessions, "qmx"))["attempts"] >= 1
        await run_until(settings, sessions, attempted, target=target)
        row = await item(sessions, "qmx")
        if outcome == "delivered":
            assert row["status"] == "done" and row["recipients"][0]["status"] == "delivered"
            assert [m.rcpt_tos for m in sink.messages] == [[rcpt]]
        elif outcome == "deferred":
            assert row["status"] == "queued" and "4.4.3" in row["last_error"]
            assert sink.messages == []
        else:
            assert row["status"] == "done" and row["recipients"][0]["status"] == "failed"
            assert outcome in row["last_error"]
            from bsm_relay.relay.queue import list_items
            notices = [r for r in await list_items(sessions, include_done=True) if r["kind"] == "notice"]
            assert len(notices) == 1
        await asyncio.sleep(0)
