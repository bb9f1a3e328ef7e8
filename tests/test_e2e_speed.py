"""End to end, the speed parts of issue 7 that are correctness: the chunked DATA reader over real
SMTP (every smuggling variant of CATALOGUE P1-P11, long lines, the size limit) and the memory a
25 MB message costs the serving process (VmHWM from /proc, before and after)."""

from __future__ import annotations

import base64
import json
import re
import smtplib
import signal
import socket
import time
from pathlib import Path

import pytest
from helpers import DEMO_BUYER, DEMO_SELLER, RelayProcess, Sink, make_relay, message, seed_pair, serving

SELLER = DEMO_SELLER
BUYER = DEMO_BUYER


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("speed"), sink_port=sink.port)
    seed_pair(r)
    yield from serving(r)


class Wire:
    """A raw SMTP client: bytes out exactly as given, replies in as lines."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        assert self.reply().startswith("220")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One (possibly multi-line) reply; its last line."""
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return ""
                self.buf += chunk
                continue
            line, self.buf = self.buf[:end].decode(), self.buf[end + 2:]
            if line[3:4] != "-":
                return line

    def pending(self, wait: float = 0.5) -> bytes:
        """Whatever else the server says (nothing is expected)."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.buf += chunk
        except TimeoutError:
            pass
        self.sock.settimeout(30)
        rest, self.buf = self.buf, b""
        return rest

    def close(self) -> None:
        self.sock.close()


def open_transaction(relay: RelayProcess, rcpt: str, mail_from: str = SELLER) -> Wire:
    w = Wire(relay.port)
    w.send(b"EHLO client.test\r\n")
    assert w.reply().startswith("250")
    w.send(f"MAIL FROM:<{mail_from}>\r\n".encode())
    assert w.reply().startswith("250")
    w.send(f"RCPT TO:<{rcpt}>\r\n".encode())
    assert w.reply().startswith("250")
    w.send(b"DATA\r\n")
    assert w.reply().startswith("354")
    return w


def clean_wire(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") == crlf and data.count(b"\n") == crlf and b"\x00" not in data


FAKE_ENDS = [b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r",
             b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n.\r\r\n"]
SMUGGLER = "smuggler@acme.example"


def smuggled(alias: str) -> bytes:
    # The smuggled transaction would pass on its own (the seller's approved address), so if the
    # reader ended the data at the fake end, a second message would be delivered.
    return (f"MAIL FROM:<{SELLER}>\r\nRCPT TO:<{alias}>\r\nDATA\r\n").encode() + message(
        SELLER, alias, "Smuggled", "smuggled body\r\n",
        extra_headers=f"X-Smuggled-By: {SMUGGLER}\r\n")


@pytest.mark.parametrize("fake", FAKE_ENDS, ids=[repr(f)[2:-1] for f in FAKE_ENDS])
def test_smuggling_variants_yield_at_most_one_message(relay, sink, alias, fake):
    before = len(sink.messages)
    w = open_transaction(relay, alias)
    w.send(message(SELLER, alias, "Outer", "outer body") + fake + smuggled(alias) + b"\r\n.\r\n")
    answer = w.reply()
    # Only the real end ended the data; what it held has a bare CR, LF or NUL: intake's one rule.
    assert answer.startswith("550 5.6.0"), answer
    assert w.pending() == b""            # no second reply: no smuggled MAIL, RCPT or DATA was read
    w.send(b"QUIT\r\n")
    assert w.reply().startswith("221")
    w.close()
    time.sleep(0.5)                      # a delivery, were there one, would have reached the sink
    delivered = sink.messages[before:]
    assert len(delivered) <= 1
    assert not any(b"Smuggled" in m.data or b"X-Smuggled-By" in m.data for m in delivered)
    assert all(clean_wire(m.data) for m in sink.messages)


def test_clean_message_in_the_same_shape_is_delivered(relay, sink, alias):
    """The control: the raw client above does deliver when nothing is smuggled."""
    before = len(sink.messages)
    w = open_transaction(relay, alias)
    w.send(message(SELLER, alias, "Outer", "..a stuffed dot line\r\n.\r\n") + b".\r\n")
    assert w.reply().startswith("250")
    w.send(b"QUIT\r\n")
    w.close()
    got = sink.wait_for(before + 1)[before:]
    assert len(got) == 1 and clean_wire(got[0].data)
    assert b"\r\n.a stuffed dot line\r\n" in got[0].data      # unstuffed once by us, re-stuffed on the wire


def test_pipelined_commands_after_the_final_dot_are_read_in_order(relay, sink, alias):
    before = len(sink.messages)
    w = open_transaction(relay, alias)
    w.send(message(SELLER, alias, "First") + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    assert w.reply().startswith("250")    # the message
    assert w.reply().startswith("250")    # RSET
    assert w.reply().startswith("250")    # NOOP
    assert w.reply().startswith("221")
    w.close()
    assert len(sink.wait_for(before + 1)) == before + 1


def test_long_line_refused_and_nothing_queued(relay, sink, alias):
    before = len(sink.messages)
    ok = message(SELLER, alias, "Line 999", "x" * 999 + "\r\n")
    too_long = message(SELLER, alias, "Line 1000", "y" * 1000 + "\r\n")
    with relay.smtp() as c:
        c.sendmail(SELLER, [alias], ok)
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail(SELLER, [alias], too_long)
        assert info.value.smtp_code == 500
        assert c.noop()[0] == 250               # the session goes on
    got = sink.wait_for(before + 1)[before:]
    time.sleep(0.5)
    assert len(sink.messages) == before + 1 and b"Line 999" in got[0].data
    queue = json.loads(relay.cli("queue", "list", "--all", "--json").stdout)
    assert not any("Line 1000" in json.dumps(item) for item in queue)


def vm_hwm_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def big_message(alias: str, size: int) -> bytes:
    """About ``size`` bytes on the wire: a short text and three PDF attachments."""
    raw = (size - 4096) * 3 // 4 // 3
    parts = []
    for n in range(3):
        payload = b"%PDF-1.4\n" + bytes(range(256)) * (raw // 256)
        encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
        parts.append(b"--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
                     b"Content-Disposition: attachment; filename=\"doc%d.pdf\"\r\n\r\n" % n + encoded)
    head = (f"From: {SELLER}\r\nTo: {alias}\r\nSubject: Big one for order 111-2223334-4445556\r\n"
            "Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            "Documents attached.\r\n").encode()
    return head + b"".join(parts) + b"--b--\r\n"


# Peak memory growth of the serving process for one 25 MB message, as a multiple of its size
# (issue 7's bound: the message is read into one buffer, walked in place, spooled to a file and
# streamed from it; 1.02x measured in session 11).
MEMORY_BOUND = 2.0


@pytest.fixture(scope="module")
def big_relay(tmp_path_factory, sink):
    """A relay of its own (a fresh process, so its peak is this test's), taking 25 MB of attachments."""
    r = make_relay(tmp_path_factory.mktemp("big"), sink_port=sink.port,
                   extra="[policy]\nmax_attachment_bytes = 30000000\n")
    seed_pair(r)
    yield from serving(r)


def test_25mb_message_peak_memory(big_relay, sink):
    relay = big_relay
    alias = json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]
    data = big_message(alias, 25_000_000)
    before_msgs = len(sink.messages)
    pid = relay.proc.pid
    # Warm up the same path with a small message first, so the baseline includes the code paths.
    with relay.smtp() as c:
        c.sendmail(SELLER, [alias], big_message(alias, 200_000))
    sink.wait_for(before_msgs + 1)
    before = vm_hwm_kb(pid)
    with relay.smtp() as c:
        c.sendmail(SELLER, [alias], data)
    got = sink.wait_for(before_msgs + 2, timeout=120)[-1]
    after = vm_hwm_kb(pid)
    growth = (after - before) * 1024
    print(f"25 MB message: VmHWM {before} kB -> {after} kB, growth {growth / len(data):.2f}x its size")
    assert len(got.data) > len(data) * 0.99
    assert growth <= MEMORY_BOUND * len(data), f"peak grew by {growth / len(data):.2f}x the message size"


def vm_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def _greeted_session(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(30)
    reply = b""
    while not reply.endswith(b"\r\n"):
        reply += s.recv(512)
    assert reply.startswith(b"220"), reply
    s.sendall(b"EHLO idle.example\r\n")
    reply = b""
    while b"\r\n250 " not in b"\r\n" + reply:
        reply += s.recv(4096)
    return s


def test_1000_idle_sessions_cost_at_most_20_kb_each(tmp_path):
    """Issue 7: 1,000 greeted, idle sessions (after EHLO) cost the serving process at most 20 KB
    each, measured from /proc (Postfix spends about 1.3 MB per session: a process each)."""
    r = make_relay(tmp_path)
    cfg = r.config.read_text()
    r.config.write_text(cfg.replace("[smtp]\n", "[smtp]\nmax_sessions = 1200\nmax_sessions_per_ip = 1200\n", 1))
    r.start()
    socks: list[socket.socket] = []
    try:
        for s in [_greeted_session(r.port) for _ in range(50)]:   # first-use allocations in the baseline
            s.close()
        time.sleep(0.5)
        before = vm_rss_kb(r.proc.pid)
        socks = [_greeted_session(r.port) for _ in range(1000)]
        after = vm_rss_kb(r.proc.pid)
        per_session = (after - before) * 1024 / len(socks)
        print(f"1000 idle sessions: VmRSS {before} kB -> {after} kB, {per_session / 1024:.1f} KB each")
        assert per_session <= 20 * 1024, f"{per_session / 1024:.1f} KB per idle session"
        # Still serving: one more session is answered while the thousand stay open.
        extra = _greeted_session(r.port)
        extra.close()
    finally:
        for s in socks:
            s.close()
        assert r.stop() == 0


# -- spool files (large messages) ---------------------------------------------------------

def _spooling_relay(workdir: Path, sink_port: int) -> RelayProcess:
    """A relay that spools every message over 20,000 bytes (the default threshold is 1 MB)."""
    relay = make_relay(workdir, sink_port=sink_port)
    relay.config.write_text(relay.config.read_text().replace("[queue]\n", "[queue]\nspool_threshold = 20000\n", 1))
    return relay


def _spooled_message(alias: str) -> bytes:
    """About 200 KB, over the test threshold: text lines that begin with dots (stuffing on the
    wire both ways), whitespace runs (DKIM's relaxed body), a base64 attachment."""
    text = b"".join(b".line %d with  two  spaces\t \r\n..and a dotted one\r\n" % i for i in range(600))
    pdf = base64.encodebytes(b"%PDF-1.4\n" + bytes(range(256)) * 300).replace(b"\n", b"\r\n")
    head = (f"From: {DEMO_SELLER}\r\nTo: {alias}\r\nSubject: Spooled for order 111-2223334-4445556\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n").encode()
    return (head + b"--b\r\nContent-Type: text/plain\r\n\r\n" + text
            + b"--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n" + pdf
            + b"--b--\r\n")


def _spool_files(relay: RelayProcess) -> list[Path]:
    return sorted((relay.workdir / "state" / "spool").rglob("*.eml"))


def test_a_large_message_is_spooled_streamed_signed_and_removed(tmp_path, sink):
    import dkim

    relay = _spooling_relay(tmp_path, sink.port)
    record = json.loads(relay.cli("init", "--json").stdout)["dkim_txt_record"]
    alias = seed_pair(relay)["buyer_alias"]
    message = _spooled_message(alias)
    before = len(sink.messages)
    relay.start()
    try:
        with relay.smtp() as c:
            c.sendmail(DEMO_SELLER, [alias], message)
        got = sink.wait_for(before + 1)[-1]
        # The body arrives byte for byte (dotted lines unstuffed again by the receiver).
        assert got.data.split(b"\r\n\r\n", 1)[1] == message.split(b"\r\n\r\n", 1)[1]
        assert dkim.verify(got.data, dnsfunc=lambda name, timeout=5: record["value"].encode())
        deadline = time.monotonic() + 10
        while _spool_files(relay):                   # removed once the item is done
            assert time.monotonic() < deadline, _spool_files(relay)
            time.sleep(0.05)
    finally:
        assert relay.stop() == 0


def test_a_spooled_message_survives_kill_9_after_its_250(tmp_path):
    sink = Sink()                                   # down: nothing is delivered before the crash
    relay = _spooling_relay(tmp_path, sink.port)
    alias = seed_pair(relay)["buyer_alias"]
    message = _spooled_message(alias)
    relay.start()
    with relay.smtp() as c:
        c.sendmail(DEMO_SELLER, [alias], message)
    assert len(_spool_files(relay)) == 1            # on disk (and fsynced) before the 250
    relay.stop(signal.SIGKILL)
    with sink:
        relay.start()
        try:
            try:
                got = sink.wait_for(1, timeout=60)[0]
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the relay's log:\n{relay.log()[-4000:]}") from None
            assert got.data.split(b"\r\n\r\n", 1)[1] == message.split(b"\r\n\r\n", 1)[1]
        finally:
            assert relay.stop() == 0, relay.log()[-4000:]
    assert _spool_files(relay) == []
