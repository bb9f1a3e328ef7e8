"""Running it as an MTA, end to end against ``bsm-relay serve`` subprocesses: graceful drain on
SIGTERM, ``--workers 2``, STARTTLS and implicit TLS with a certificate made here, refusal to start
on a bad key, session limits and timeouts, SIGHUP reload."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import _RUNNING, BIN, RelayProcess, Sink, free_port, make_relay, message

SELLER = "seller@acme.example"
BUYER = "buyer@example.org"


# -- harness ------------------------------------------------------------------------------

def with_smtp(relay: RelayProcess, text: str) -> None:
    """Add ``text`` (key = value lines) to the relay's [smtp] table."""
    cfg = relay.config.read_text()
    relay.config.write_text(cfg.replace("[smtp]\n", "[smtp]\n" + text.strip() + "\n", 1))


def start(relay: RelayProcess, *args: str) -> None:
    """``bsm-relay serve ARGS`` as in production, returning once the port accepts connections."""
    relay.log_path = relay.workdir / "relay.log"
    out = open(relay.log_path, "ab")  # noqa: SIM115 - the child process holds it
    relay.proc = subprocess.Popen([str(BIN), "--config", str(relay.config), "serve", *args], stdout=out,
                                  stderr=subprocess.STDOUT, env=relay.env, cwd=relay.workdir)
    _RUNNING.append(relay.proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if relay.proc.poll() is not None:
            raise AssertionError(f"relay exited: {relay.log()}")
        try:
            socket.create_connection(("127.0.0.1", relay.port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("relay did not start listening")


def events(relay: RelayProcess, name: str | None = None) -> list[dict]:
    out = []
    for line in relay.log().splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and (name is None or ev.get("event") == name):
            out.append(ev)
    return out


def wait_event(relay: RelayProcess, name: str, count: int = 1, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(relay, name)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {count} x {name} in the log:\n{relay.log()}")


def seeded(workdir: Path, sink: Sink | None, extra: str = "") -> tuple[RelayProcess, str]:
    relay = make_relay(workdir, sink_port=sink.port if sink else None, extra=extra)
    relay.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    relay.cli("buyer", "add", "B1", "--email", BUYER)
    relay.cli("order", "add", "111-2223334-4445556", "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    alias = json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]
    return relay, alias


def mail(alias: str, subject: str = "About order 111-2223334-4445556") -> bytes:
    return message(SELLER, alias, subject=subject)


class Line:
    """A raw SMTP connection: send lines, read replies, see the server close."""

    def __init__(self, port: int, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = ""

    def reply(self) -> str:
        """One (possibly multi-line) reply, or "" when the server closed the connection."""
        lines = []
        while True:
            line = self.file.readline().decode()
            if not line:
                return "".join(lines)
            lines.append(line)
            if line[3:4] != "-":
                return "".join(lines)

    def cmd(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def greeted(port: int) -> Line:
    """A connection that got its 220, retrying while the relay still counts a just-closed one."""
    deadline = time.monotonic() + 20
    while True:
        conn = Line(port)
        greeting = conn.reply()
        if greeting.startswith("220"):
            conn.greeting = greeting
            return conn
        conn.close()
        assert time.monotonic() < deadline, greeting
        time.sleep(0.05)


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and ``mx.relay.test``, with ``cryptography``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.relay.test"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# -- graceful drain -----------------------------------------------------------------------

def test_sigterm_drains_open_transaction_refuses_new_and_exits_0(tmp_path, sink):
    relay, alias = seeded(tmp_path, sink)
    start(relay)
    before = len(sink.messages)
    client = relay.smtp()
    client.mail(SELLER)
    assert client.rcpt(alias)[0] == 250
    idle = Line(relay.port)                       # a second session, between transactions
    assert idle.reply().startswith("220")
    assert idle.cmd("EHLO idle.test").startswith("250")

    relay.proc.send_signal(signal.SIGTERM)
    wait_event(relay, "relay.draining")
    # The idle session is told at once; the listener is closed to anyone new.
    assert idle.reply().startswith("421 4.3.2")
    assert idle.closed()
    try:
        late = Line(relay.port, timeout=5)
    except ConnectionRefusedError:
        pass
    else:
        assert late.reply() in ("", ) or late.reply().startswith("421 4.3.2")
        late.close()

    # The transaction open during SIGTERM completes, then the session is ended.
    code, text = client.data(mail(alias, "Drained 111-2223334-4445556"))
    assert code == 250, text
    assert client.noop()[0] == 421 if not _disconnected(client) else True
    assert relay.proc.wait(timeout=60) == 0
    relay.proc = None
    if len(sink.messages) == before:      # accepted but not yet delivered before exit: the next run delivers it
        start(relay)
        sink.wait_for(before + 1, timeout=90)
        assert relay.stop() == 0
    delivered = [m for m in sink.messages[before:] if b"Drained 111-2223334-4445556" in m.data]
    assert len(delivered) == 1
    assert "Traceback" not in relay.log()


def _disconnected(client: smtplib.SMTP) -> bool:
    try:
        code, _ = client.noop()
    except smtplib.SMTPServerDisconnected:
        return True
    return code == 421


# -- workers --------------------------------------------------------------------------------

def test_two_workers_share_the_port_restart_a_crashed_one_and_deliver_once(tmp_path, sink):
    relay, alias = seeded(tmp_path, sink)
    start(relay, "--workers", "2")
    started = wait_event(relay, "relay.started", 2)
    pids = {ev["pid"] for ev in started}
    assert len(pids) == 2
    before = len(sink.messages)
    subjects = [f"Worker test {i} 111-2223334-4445556" for i in range(24)]
    for subject in subjects:
        with relay.smtp() as c:
            c.sendmail(SELLER, [alias], mail(alias, subject))
    served = {ev["pid"] for ev in events(relay, "smtp.connected")}
    assert served == pids, "both processes accepted sessions"
    # Every outcome recorded before the crash: a worker killed while a delivery is in flight may
    # deliver that message again once its lease is released (at-least-once; the two-node test
    # counts those), which is not what this test is about.
    sink.wait_for(before + len(subjects), timeout=60)
    deadline = time.monotonic() + 30
    while json.loads(relay.cli("queue", "list", "--json").stdout):
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.1)

    # A crashed worker is replaced; the service keeps serving.
    victim = sorted(pids)[0]
    import os
    os.kill(victim, signal.SIGKILL)
    wait_event(relay, "worker.started", 3)
    replacement = wait_event(relay, "relay.started", 3)[-1]["pid"]
    assert replacement not in pids
    with relay.smtp() as c:
        c.sendmail(SELLER, [alias], mail(alias, "After restart 111-2223334-4445556"))

    sink.wait_for(before + len(subjects) + 1, timeout=90)
    assert relay.stop() == 0
    got = [m.data for m in sink.messages[before:]]
    for subject in subjects + ["After restart 111-2223334-4445556"]:
        assert sum(subject.encode() in data for data in got) == 1, subject
    assert len(got) == len(subjects) + 1
    assert "Traceback" not in relay.log()
    # Two processes write one log file: every line is still one whole JSON event.
    for line in relay.log().splitlines():
        assert isinstance(json.loads(line), dict), line


# -- TLS --------------------------------------------------------------------------------------

def test_starttls_and_implicit_tls_deliver_and_certificate_reloads_on_sighup(tmp_path, sink):
    cert, key = make_cert(tmp_path, "relay")
    implicit = free_port()
    relay, alias = seeded(tmp_path, sink, extra=f'\n[tls]\ncert = "{cert}"\nkey = "{key}"\n'
                                                f'implicit_listen = "127.0.0.1:{implicit}"\n')
    start(relay)
    before = len(sink.messages)
    trust = ssl.create_default_context(cafile=str(cert))
    with relay.smtp() as c:
        assert c.has_extn("starttls")
        c.starttls(context=trust)
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        c.ehlo("client.test")
        assert not c.has_extn("starttls")
        c.sendmail(SELLER, [alias], mail(alias, "Over STARTTLS 111-2223334-4445556"))
    with smtplib.SMTP_SSL("127.0.0.1", implicit, context=trust, timeout=30) as c:
        c.ehlo("client.test")
        assert not c.has_extn("starttls")
        c.sendmail(SELLER, [alias], mail(alias, "Over SMTPS 111-2223334-4445556"))
    got = sink.wait_for(before + 2, timeout=90)[before:]
    assert any(b"Over STARTTLS" in m.data for m in got) and any(b"Over SMTPS" in m.data for m in got)
    assert any(ev.get("tls") == "implicit" for ev in events(relay, "smtp.connected"))

    # A renewed certificate at the same paths is used after SIGHUP, by both listeners.
    make_cert(tmp_path, "relay")
    relay.proc.send_signal(signal.SIGHUP)
    wait_event(relay, "config.reloaded")
    renewed = ssl.create_default_context(cafile=str(cert))
    with relay.smtp() as c:
        c.starttls(context=renewed)
        assert c.noop()[0] == 250
    with smtplib.SMTP_SSL("127.0.0.1", implicit, context=renewed, timeout=30) as c:
        assert c.noop()[0] == 250
    assert relay.stop() == 0
    assert "Traceback" not in relay.log()


@pytest.mark.parametrize("case", ["mismatch", "missing_key"])
def test_serve_refuses_to_start_with_a_bad_key(tmp_path, case):
    cert, _ = make_cert(tmp_path, "one")
    _, other_key = make_cert(tmp_path, "two")
    key = other_key if case == "mismatch" else tmp_path / "nowhere.key"
    relay = make_relay(tmp_path, extra=f'\n[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    for args in ((), ("--workers", "2")):
        res = subprocess.run([str(BIN), "--config", str(relay.config), "serve", *args], capture_output=True,
                             text=True, env=relay.env, cwd=relay.workdir, timeout=60)
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        expected = "does not match the key" if case == "mismatch" else "cannot read the TLS key"
        assert lines[0].startswith("bsm-relay: ") and expected in lines[0], lines[0]


# -- limits and timeouts --------------------------------------------------------------------

def test_per_ip_cap_and_invalid_command_cap(tmp_path):
    relay = make_relay(tmp_path)
    with_smtp(relay, "max_sessions_per_ip = 2\nmax_invalid_commands = 3")
    start(relay)
    # (the readiness probe's connection may still count for a moment: wait for each greeting)
    first, second = greeted(relay.port), greeted(relay.port)
    third = Line(relay.port)
    assert third.reply().startswith("421 4.7.0")
    assert third.closed()
    second.close()
    again = greeted(relay.port)      # the slot is free again once a session ends
    # Invalid commands: three are answered, the fourth ends the session.
    for _ in range(3):
        assert first.cmd("MAIL FROM:<x@acme.example>").startswith("503")
    assert first.cmd("MAIL FROM:<x@acme.example>").startswith("421 4.7.0")
    assert first.closed()
    # A valid session on the same relay is unaffected.
    assert again.cmd("EHLO ok.test").startswith("250")
    assert again.cmd("QUIT").startswith("221")
    refused = {ev["reason"] for ev in events(relay, "smtp.rejected")}
    assert {"conn.too_many_from_ip", "conn.too_many_invalid"} <= refused
    assert relay.stop() == 0


def test_idle_and_data_timeouts_close_the_session_and_queue_nothing(tmp_path):
    relay = make_relay(tmp_path)
    with_smtp(relay, "timeout = 1.0\ndata_timeout = 2.0")
    start(relay)
    idle = Line(relay.port)
    assert idle.reply().startswith("220")
    assert idle.reply().startswith("421 4.4.2")    # nothing sent: the server gives up
    assert idle.closed()

    # The timeout counts from the last command, not from the connection: commands 0.6 s apart
    # keep a session open well past 1 s (the timer armed at connect re-arms for the rest), and
    # once they stop it is closed.
    busy = Line(relay.port)
    busy.reply()
    opened = time.monotonic()
    for _ in range(4):
        time.sleep(0.6)
        assert busy.cmd("NOOP").startswith("250")
    assert time.monotonic() - opened > 2.0
    last = time.monotonic()
    assert busy.reply().startswith("421 4.4.2")
    assert 0.8 < time.monotonic() - last < 5
    assert busy.closed()

    slow = Line(relay.port)
    slow.reply()
    assert slow.cmd("EHLO slow.test").startswith("250")
    assert slow.cmd(f"MAIL FROM:<{SELLER}>").startswith("250")
    assert slow.cmd("RCPT TO:<postmaster>").startswith("250")
    assert slow.cmd("DATA").startswith("354")
    slow.sock.sendall(b"From: " + SELLER.encode() + b"\r\nSubject: half\r\n")   # ... and nothing more
    assert slow.reply().startswith("421 4.4.2")
    assert slow.closed()
    assert not events(relay, "message.accepted")
    assert {ev["stage"] for ev in events(relay, "smtp.timeout")} == {"command", "data"}
    assert json.loads(relay.cli("queue", "list", "--json").stdout) == []
    assert relay.stop() == 0


# -- SIGHUP -------------------------------------------------------------------------------------

def test_sighup_reloads_a_limit_and_says_what_changed(tmp_path):
    relay = make_relay(tmp_path)
    with_smtp(relay, "max_sessions_per_ip = 5")
    start(relay)
    relay.config.write_text(relay.config.read_text()
                            .replace("max_sessions_per_ip = 5", "max_sessions_per_ip = 1")
                            .replace('hostname = "mx.relay.test"', 'hostname = "mx2.relay.test"'))
    relay.proc.send_signal(signal.SIGHUP)
    ev = wait_event(relay, "config.reloaded")[0]
    assert ev["changed"] == ["smtp.max_sessions_per_ip"]
    assert ev["needs_restart"] == ["smtp.hostname"]
    one = greeted(relay.port)
    assert one.greeting.startswith("220 mx.relay.test")     # the hostname keeps its running value
    two = Line(relay.port)
    assert two.reply().startswith("421 4.7.0")               # the new limit applies at once

    # A configuration that does not load is reported and changes nothing.
    relay.config.write_text(relay.config.read_text().replace("max_sessions_per_ip = 1", "max_sessions_per_ip = 0"))
    relay.proc.send_signal(signal.SIGHUP)
    failed = wait_event(relay, "config.reload_failed")[0]
    assert "max_sessions_per_ip" in failed["error"]
    assert Line(relay.port).reply().startswith("421 4.7.0")
    one.close()
    assert relay.stop() == 0
    assert "Traceback" not in relay.log()


def test_clients_that_connect_and_close_at_once_do_not_hold_session_slots(tmp_path):
    """A connect-and-close flood (each client gone before its greeting) must not keep counting
    against max_sessions_per_ip: on uvloop such a transport was never closed (issue 7)."""
    relay = make_relay(tmp_path)
    with_smtp(relay, "max_sessions_per_ip = 2")
    start(relay)
    for _ in range(20):
        socket.create_connection(("127.0.0.1", relay.port)).close()
    first, second = greeted(relay.port), greeted(relay.port)   # both slots free again
    assert first.cmd("EHLO ok.test").startswith("250")
    assert second.cmd("QUIT").startswith("221")
    assert relay.stop() == 0


def test_the_state_init_creates_is_the_relay_users_alone(tmp_path, sink):
    # Real addresses and queued messages live in the database: whatever the umask, a state
    # directory and SQLite file that init creates are readable by the relay's user only, and
    # SQLite's -wal and -shm files, made while serving, take the database file's mode.
    old = os.umask(0o022)
    try:
        relay, alias = seeded(tmp_path, sink)
    finally:
        os.umask(old)
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    database = relay.database.sqlite_path if relay.database is not None else None
    if database is None:                 # PostgreSQL: no database file here
        return
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    start(relay)
    try:
        with relay.smtp() as c:
            c.sendmail(SELLER, [alias], mail(alias))
        sink.wait_for(1)
        side = list(database.parent.glob(database.name + "-*"))
        assert side and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in side)
    finally:
        relay.stop()
