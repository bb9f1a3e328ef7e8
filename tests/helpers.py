"""Test harness: a recording downstream SMTP server and the relay run as in production.

The relay is started the way an operator starts it: ``bsm-relay init`` then
``bsm-relay serve --config FILE`` in a subprocess; the downstream is a real
aiosmtpd server on loopback that records what it received (and can be scripted
to refuse).

Sender authentication is on (``[auth] sender_authentication = "dmarc"``, the
default), so the relay's resolver points at a real DNS responder
(``tests/dnsserver.py``): by default one shared per test process whose every made-up
domain publishes ``v=spf1 ip4:127.0.0.0/8 -all`` (mail from loopback passes SPF);
a test that needs its own records passes ``dns=`` and stops that server itself.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from cliworker import worker_for
from dbtest import TestDatabase, fresh
from dnsserver import DnsServer

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "bsm-relay"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    peer: Any = None          # the client's (host, port): which connection brought the message


class RecordingHandler:
    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        # Scripted answers: callable(rcpt) -> reply string or None (accept).
        self.mail_reply: Callable[[str], str | None] = lambda sender: None
        self.rcpt_reply: Callable[[str], str | None] = lambda rcpt: None
        self.data_reply: Callable[[], str | None] = lambda: None

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        answer = self.mail_reply(address)
        if answer:
            return answer
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        answer = self.rcpt_reply(address)
        if answer:
            return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        answer = self.data_reply()
        if answer:
            return answer
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                                          session.peer))
        return "250 2.0.0 Ok: queued"


class Sink:
    """A real SMTP server on loopback, in its own thread, recording every message."""

    def __init__(self) -> None:
        self.handler = RecordingHandler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> Sink:
        self.controller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.controller.stop()

    @property
    def messages(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.messages)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.messages
            if len(msgs) >= count:
                return msgs
            time.sleep(0.05)
        raise AssertionError(f"expected {count} delivered messages, got {len(self.messages)}")


def until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``condition`` until it returns something true (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


_RUNNING: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftover_relays() -> None:
    """A test that failed half-way must not leave a relay running after the test session."""
    for proc in _RUNNING:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@dataclass
class RelayProcess:
    workdir: Path
    port: int
    config: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)
    # The relay's database (SQLite in its state dir, or its own PostgreSQL schema): tests read it here.
    database: TestDatabase | None = None

    def cli(self, *args: str, check: bool = True, console: bool = False) -> subprocess.CompletedProcess[str]:
        """A `bsm-relay` management command; ``console=True`` runs the installed console script in
        its own process (as an operator would), otherwise the same ``main(argv)`` runs in the
        shared CLI worker process (see cliworker.py), which saves the interpreter start-up."""
        if console:
            res = subprocess.run([str(BIN), "--config", str(self.config), *args], capture_output=True, text=True,
                                 env=self.env, cwd=self.workdir, timeout=60)
        else:
            res = worker_for(self.env).run(["--config", str(self.config), *args], self.workdir)
        if check and res.returncode != 0:
            raise AssertionError(f"bsm-relay {' '.join(args)} failed: {res.stderr}")
        return res

    def start(self) -> None:
        self.log_path = self.workdir / "relay.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(BIN), "--config", str(self.config), "serve"], stdout=log,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        _RUNNING.append(self.proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited: {self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("relay did not start listening")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
        client.ehlo("client.test")
        return client


LOOPBACK_SPF = "v=spf1 ip4:127.0.0.0/8 -all"
_shared_dns: DnsServer | None = None
_shared_dns_lock = threading.Lock()


def shared_dns() -> DnsServer:
    """The test process's DNS responder (started on first use, stopped when the process ends)."""
    global _shared_dns
    with _shared_dns_lock:
        if _shared_dns is None:
            server = DnsServer(spf_fallback=LOOPBACK_SPF)
            server.start_in_thread()
            atexit.register(server.stop)
            _shared_dns = server
        return _shared_dns


def write_config(workdir: Path, port: int, extra: str = "", *, sink_port: int | None = None,
                 nameserver: str | None = None, dns_timeout: float = 3.0,
                 database: TestDatabase | None = None) -> Path:
    """The relay's configuration file; ``database`` (default: SQLite in the state directory) is
    where ``[storage]`` points, see ``tests/dbtest.py``."""
    dns = f'\n[dns]\nnameservers = ["{nameserver}"]\ntimeout = {dns_timeout}\n' if nameserver else ""
    delivery = (f'mode = "smarthost"\nsmarthost = "127.0.0.1:{sink_port}"\nsmarthost_tls = "off"\n'
                if sink_port else f'mode = "maildir"\nmaildir = "{workdir / "maildir"}"\n')
    text = f"""
[smtp]
listen = "127.0.0.1:{port}"
hostname = "mx.relay.test"
postmaster = "ops@operator.test"
max_invalid_recipients = 20

[aliases]
domain = "marketplace.example"
marketplace_name = "Marketplace"

[storage]
state_dir = "{workdir / 'state'}"
{database.toml() if database else ""}
[delivery]
{delivery}poll_interval = 0.2

[queue]
min_backoff = 1
max_backoff = 2

[logging]
format = "json"
level = "info"
{dns}{extra}
"""
    path = workdir / "relay.toml"
    path.write_text(text)
    return path


def make_relay(workdir: Path, *, sink_port: int | None = None, extra: str = "",
               dns: DnsServer | None = None, dns_timeout: float = 3.0,
               database: TestDatabase | None = None) -> RelayProcess:
    """A relay ready to ``start()``: configured, initialised, its resolver on ``dns``
    (default: :func:`shared_dns`).  ``extra`` must not hold a ``[dns]`` table.
    ``database``: default a fresh one (``BSM_RELAY_TEST_DATABASE_URL``, else SQLite)."""
    port = free_port()
    server = dns if dns is not None else shared_dns()
    database = database or fresh(workdir / "state")
    config = write_config(workdir, port, extra, sink_port=sink_port, nameserver=server.nameserver,
                          dns_timeout=dns_timeout, database=database)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BSM_RELAY_")}
    relay = RelayProcess(workdir, port, config, env, database=database)
    relay.cli("init")
    return relay


def message(from_: str, to: str, subject: str = "Hello", body: str = "Hello there.\r\n",
            extra_headers: str = "") -> bytes:
    return (f"From: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n{extra_headers}\r\n{body}").encode()


DEMO_SELLER = "seller@acme.example"
DEMO_BUYER = "buyer@example.org"
DEMO_ORDER = "111-2223334-4445556"


def seed_pair(relay: RelayProcess) -> dict[str, str]:
    """The marketplace most end-to-end modules start from: seller S1 (DEMO_SELLER), buyer B1
    (DEMO_BUYER) and one shipped order; returns the pair's aliases (buyer_alias, seller_alias)."""
    relay.cli("seller", "add", "S1", "--name", "Acme Books", "--email", DEMO_SELLER)
    relay.cli("buyer", "add", "B1", "--email", DEMO_BUYER, "--name", "Bea Buyer")
    relay.cli("order", "add", DEMO_ORDER, "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    return json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)


def serving(relay: RelayProcess):  # type: ignore[no-untyped-def]
    """Start ``relay`` for a module fixture; at teardown it must stop cleanly with no traceback."""
    relay.start()
    yield relay
    assert relay.stop() == 0
    assert "Traceback" not in relay.log(), relay.log()[-2000:]
