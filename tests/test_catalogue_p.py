"""Acceptance catalogue, P (protocol): ../shared/CATALOGUE.md, mapped in docs/catalogue.md.

Covered elsewhere:
P1-P11 (smuggling): tests/test_e2e_speed.py::test_smuggling_variants_yield_at_most_one_message,
    tests/test_dataread.py::test_fake_ends_do_not_end_the_data, docs/decisions/0003-line-endings-and-smuggling.md
P13 (pipelined after the dot): also
    tests/test_e2e_speed.py::test_pipelined_commands_after_the_final_dot_are_read_in_order
P16 (long line): also tests/test_e2e_speed.py::test_long_line_refused_and_nothing_queued
P20 (idle, DATA stalled): also tests/test_e2e_ops.py::test_idle_and_data_timeouts_close_the_session_and_queue_nothing
P21 (per-IP cap): also tests/test_e2e_ops.py::test_per_ip_cap_and_invalid_command_cap

One relay for the module, with STARTTLS and short limits: 20 KB messages, 2 s idle and 3 s DATA
timeouts, 2 sessions per IP and 4 in all.  Raw sockets (``Line``) where the bytes on the wire are
the point; postmaster mail where only the protocol matters (no policy in the way).
"""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest
from helpers import make_relay
from test_e2e_ops import Line, greeted, with_smtp
from tlsutil import make_cert

LIMIT = 20_000
HOST = "mx.relay.test"


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    work = tmp_path_factory.mktemp("cat-p")
    cert, key = make_cert(work, "mx.relay.test")
    r = make_relay(work, sink_port=sink.port, extra=f'[tls]\ncert = "{cert}"\nkey = "{key}"\n')
    with_smtp(r, f"max_message_size = {LIMIT}\ntimeout = 2.0\ndata_timeout = 3.0\n"
                 "max_sessions = 4\nmax_sessions_per_ip = 2\nmax_invalid_commands = 50")
    r.start()
    yield r
    assert r.stop() == 0
    assert "Traceback" not in r.log()


def session(relay, mail_from: str = "someone@outside.example") -> Line:
    """A greeted raw session with EHLO done and, if ``mail_from`` is not None, a MAIL and a RCPT to postmaster."""
    conn = greeted(relay.port)
    assert conn.cmd("EHLO client.test").startswith("250")
    if mail_from is not None:
        assert conn.cmd(f"MAIL FROM:<{mail_from}>").startswith("250")
        assert conn.cmd("RCPT TO:<postmaster>").startswith("250")
    return conn


def queued(relay) -> list:
    return json.loads(relay.cli("queue", "list", "--all", "--json").stdout)


def test_P12_bdat_is_not_a_command_and_an_exim_style_smuggle_is_one_message_at_most(relay, sink):
    conn = session(relay, mail_from=None)
    assert conn.cmd("BDAT 86 LAST")[:3] in ("500", "502")
    conn.close()
    before = len(sink.messages)
    conn = session(relay)
    assert conn.cmd("DATA").startswith("354")
    smuggled = b"MAIL FROM:<admin@victim.example>\r\nRCPT TO:<postmaster>\r\n"
    conn.sock.sendall(b"Subject: one\r\n\r\nbody\r\n.\nBDAT " + str(len(smuggled)).encode() + b" LAST\r\n"
                      + smuggled + b"\r\n.\r\n")
    answer = conn.reply()
    assert answer[:3] in ("250", "550"), answer       # one message, or refused for the bare LF
    assert conn.cmd("QUIT").startswith("221")
    time.sleep(1.0)
    new = sink.messages[before:]
    assert len(new) <= 1
    assert all(m.mail_from != "admin@victim.example" for m in new)


def test_P13_commands_in_the_packet_of_the_final_dot_are_processed_in_order_never_merged(relay, sink):
    before = len(sink.messages)
    conn = session(relay)
    assert conn.cmd("DATA").startswith("354")
    conn.sock.sendall(b"Subject: first\r\n\r\nfirst body\r\n.\r\nMAIL FROM:<second@outside.example>\r\n"
                      b"RCPT TO:<postmaster>\r\nDATA\r\n")
    assert conn.reply().startswith("250 2.0.0")      # the first message, ended by its own dot
    assert conn.reply().startswith("250")            # MAIL of the second transaction
    assert conn.reply().startswith("250")            # RCPT
    assert conn.reply().startswith("354")            # DATA
    assert conn.cmd("Subject: second\r\n\r\nsecond body\r\n.").startswith("250 2.0.0")
    assert conn.cmd("QUIT").startswith("221")
    got = sink.wait_for(before + 2)[before:]
    bodies = sorted((m.data for m in got), key=lambda data: b"second body" in data)
    assert len(got) == 2
    assert b"first body" in bodies[0] and b"second" not in bodies[0] and b"MAIL FROM" not in bodies[0]
    assert b"second body" in bodies[1] and b"first body" not in bodies[1]


def test_P14_starttls_injection_gets_no_reply_inside_tls(relay):
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    f = raw.makefile("rb")
    assert f.readline().startswith(b"220")
    raw.sendall(b"EHLO client.test\r\n")
    while not (line := f.readline()).startswith(b"250 "):
        assert line.startswith(b"250-")
    raw.sendall(b"STARTTLS\r\nNOOP\r\n")           # the NOOP rides in the plaintext packet
    assert f.readline().startswith(b"220")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        tls = ctx.wrap_socket(raw, server_hostname=HOST)
    except (ssl.SSLError, OSError):
        return                                     # refusing the handshake is also safe
    tls.settimeout(10)
    tf = tls.makefile("rb")
    tls.sendall(b"EHLO client.test\r\n")
    first = tf.readline()
    # The first thing said inside TLS answers our EHLO, never the injected NOOP.
    assert first == b"" or first.startswith(b"250-" + HOST.encode()), first
    tls.close()


def test_P15_600_byte_mail_from_is_500_and_the_session_continues(relay):
    conn = session(relay, mail_from=None)
    answer = conn.cmd("MAIL FROM:<" + "a" * 580 + "@outside.example>")
    assert answer.startswith("500") and "too long" in answer
    assert conn.cmd("NOOP").startswith("250")
    assert conn.cmd("MAIL FROM:<ok@outside.example>").startswith("250")
    conn.close()


def test_P16_999_octet_line_delivered_1000_refused_with_nothing_queued(relay, sink):
    before_items = len(queued(relay))
    before = len(sink.messages)
    conn = session(relay)
    assert conn.cmd("DATA").startswith("354")
    assert conn.cmd("Subject: ok\r\n\r\n" + "a" * 999 + "\r\n.").startswith("250")
    assert conn.cmd("MAIL FROM:<someone@outside.example>").startswith("250")
    assert conn.cmd("RCPT TO:<postmaster>").startswith("250")
    assert conn.cmd("DATA").startswith("354")
    assert conn.cmd("Subject: long\r\n\r\n" + "b" * 1000 + "\r\n.").startswith("500")
    assert conn.cmd("NOOP").startswith("250")
    conn.close()
    got = sink.wait_for(before + 1)
    time.sleep(0.5)
    assert len(sink.messages) == before + 1 and b"a" * 999 + b"\r\n" in got[-1].data
    assert len(queued(relay)) == before_items + 1     # the refused one left no row, not even a partial one


def test_P17_size_at_mail_and_after_data(relay, sink):
    conn = session(relay, mail_from=None)
    assert f"SIZE {LIMIT}" in conn.cmd("EHLO client.test")
    assert conn.cmd(f"MAIL FROM:<big@outside.example> SIZE={LIMIT + 1}").startswith("552")
    assert conn.cmd(f"MAIL FROM:<big@outside.example> SIZE={LIMIT}").startswith("250")
    assert conn.cmd("RCPT TO:<postmaster>").startswith("250")
    assert conn.cmd("DATA").startswith("354")
    before = len(sink.messages)
    line = "x" * 70 + "\r\n"
    assert conn.cmd("Subject: big\r\n\r\n" + line * (LIMIT // len(line) + 10) + ".").startswith("552")
    assert conn.cmd("NOOP").startswith("250")
    conn.close()
    time.sleep(0.5)
    assert len(sink.messages) == before


def test_P18_lf_only_message_is_refused_whole(relay, sink):
    before = len(sink.messages)
    conn = session(relay)
    assert conn.cmd("DATA").startswith("354")
    conn.sock.sendall(b"Subject: unix\nFrom: someone@outside.example\n\nline one\nline two\n\r\n.\r\n")
    assert conn.reply().startswith("550 5.6.0")
    conn.close()
    time.sleep(0.5)
    assert len(sink.messages) == before


def test_P19_five_unknown_commands_then_goodbye(relay):
    conn = session(relay, mail_from=None)
    answers = [conn.cmd(f"XYZZY{i}") for i in range(5)]
    assert all(a.startswith("500") for a in answers[:4])
    assert answers[4].startswith("502") and "goodbye" in answers[4]
    assert conn.closed()


def test_P19_noop_flood_gets_421_after_the_junk_limit(relay):
    conn = session(relay, mail_from=None)
    for _ in range(100):                              # [smtp] junk_command_limit = 100 (default)
        assert conn.cmd("NOOP").startswith("250")
    assert conn.cmd("NOOP").startswith("421 4.7.0")
    assert conn.closed()
    assert '"conn.too_many_junk"' in relay.log()


def test_P20_dribbled_command_is_closed_by_the_idle_timeout(relay):
    conn = greeted(relay.port)
    try:
        for ch in b"EHLO slow.test":                  # never a whole line: the 2 s timeout is not reset
            conn.sock.sendall(bytes([ch]))
            time.sleep(0.4)
    except OSError:
        pass
    assert conn.reply().startswith("421 4.4.2")
    assert conn.closed()


def test_P20_trickled_data_is_closed_by_the_data_timeout_and_queues_nothing(relay, sink):
    before_items = len(queued(relay))
    conn = session(relay)
    assert conn.cmd("DATA").startswith("354")
    got = ""
    try:
        for _ in range(40):                           # a line every 0.25 s, for longer than data_timeout
            conn.sock.sendall(b"Subject: drip\r\n")
            time.sleep(0.25)
    except OSError:
        pass
    got = conn.reply()
    assert got.startswith("421 4.4.2"), got
    assert len(queued(relay)) == before_items


def _from(ip: str, port: int) -> Line:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(ip, 0))
    conn = Line.__new__(Line)
    conn.sock, conn.file, conn.greeting = sock, sock.makefile("rb"), ""
    return conn


def test_P21_flood_beyond_the_per_ip_and_total_caps_gets_421_existing_sessions_unaffected(relay):
    first, second = greeted(relay.port), greeted(relay.port)
    third = Line(relay.port)                          # max_sessions_per_ip = 2
    assert third.reply().startswith("421 4.7.0") and third.closed()
    others = [_from(ip, relay.port) for ip in ("127.0.0.2", "127.0.0.3")]
    assert all(o.reply().startswith("220") for o in others)
    fifth = _from("127.0.0.4", relay.port)            # max_sessions = 4
    assert fifth.reply().startswith("421 4.7.0") and fifth.closed()
    for conn in (first, second, *others):             # the admitted sessions go on as before
        assert conn.cmd("NOOP").startswith("250")
        assert conn.cmd("QUIT").startswith("221")
    reasons = {json.loads(line).get("reason") for line in relay.log().splitlines() if line.startswith("{")}
    assert {"conn.too_many_from_ip", "conn.too_many_sessions"} <= reasons


def test_P22_non_ascii_mail_from_without_smtputf8(relay, sink):
    before = len(sink.messages)
    conn = session(relay, mail_from=None)
    assert "SMTPUTF8" not in conn.cmd("EHLO client.test")
    conn.sock.sendall("MAIL FROM:<jörg@outside.example>\r\n".encode())
    assert conn.reply()[:3] in ("500", "553")
    conn.sock.sendall("MAIL FROM:<jörg@outside.example> SMTPUTF8\r\n".encode())
    assert conn.reply()[:3] in ("500", "501", "553", "555")
    assert conn.cmd("RCPT TO:<postmaster>")[:3] == "503"   # no transaction was started
    conn.close()
    time.sleep(0.5)
    assert len(sink.messages) == before


def test_P22_mail_from_domain_literals_that_trip_the_email_parser_get_553_not_a_traceback(relay):
    # The email package raises AttributeError on these (aiosmtpd would answer "500 Error: (...)").
    conn = session(relay, mail_from=None)
    for path in ("<#@[>", "<?_+@['}`#>", '<"c&=0"@[#.>'):
        assert conn.cmd(f"MAIL FROM:{path}").startswith("553 5.1.3"), path
    assert conn.cmd("MAIL FROM:<someone@outside.example> SIZE=100").startswith("250")
    assert conn.cmd("RCPT TO:<postmaster>").startswith("250")
    conn.close()
