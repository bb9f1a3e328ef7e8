"""Acceptance catalogue, C (content): ../shared/CATALOGUE.md, mapped in docs/catalogue.md.

The decisions for each shape are recorded in docs/catalogue.md (C4 table) and
docs/decisions/0008-acceptance-catalogue-answers.md; C5 in docs/decisions/0009-8bitmime-towards-7bit-servers.md.
Unit level: tests/test_mime.py (nesting, boundaries), tests/test_headers.py (header parsing).
"""

from __future__ import annotations

import json
import smtplib
import threading
import time

import pytest
from helpers import make_relay
from test_delivery_faults import SMTP_SINK, PostfixSink
from test_e2e_ops import greeted, wait_event

from bsm_relay.policy.reasons import reply

SELLER = "seller@acme.example"
BUYER = "buyer@example.org"
ORDER = "111-2223334-4445556"
SUBJECT = f"Order {ORDER}"


def _seed(r):
    r.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    r.cli("buyer", "add", "B1", "--email", BUYER, "--name", "Bea Buyer")
    r.cli("order", "add", ORDER, "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    return json.loads(r.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("cat-c"), sink_port=sink.port)
    r.alias = _seed(r)  # type: ignore[attr-defined]
    r.start()
    yield r
    assert r.stop() == 0
    log = r.log()
    assert "Traceback" not in log and "RecursionError" not in log


def mail(alias: str, headers: str = "", body: str = "Hello there.\r\n") -> bytes:
    return f"From: {SELLER}\r\nTo: {alias}\r\nSubject: {SUBJECT}\r\n{headers}\r\n{body}".encode()


def outcome(relay, data: bytes) -> tuple[int, str]:
    """The final reply to ``data`` (250 ... or the refusal)."""
    with relay.smtp() as c:
        try:
            c.sendmail(SELLER, [relay.alias], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
    return 250, ""


def nested(depth: int) -> tuple[str, str]:
    """A message body nested ``depth`` multiparts deep: (top-level Content-Type header, body)."""
    body = "Content-Type: text/plain\r\n\r\nhi\r\n"
    for i in range(depth):
        body = f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n{body}\r\n--b{i}--\r\n'
    head, _, rest = body.partition("\r\n\r\n")
    return "MIME-Version: 1.0\r\n" + head + "\r\n", rest


MALFORMED = reply("msg.malformed")


@pytest.mark.parametrize("depth", [101, 1000])
def test_C2_mime_nesting_too_deep_is_554_560_without_recursion_error(relay, sink, depth):
    headers, body = nested(depth)
    before = len(sink.messages)
    code, text = hostile(relay, mail(relay.alias, headers, body))
    assert f"{code} {text}" == MALFORMED
    assert len(sink.messages) == before
    assert "RecursionError" not in relay.log() and "Traceback" not in relay.log()


def test_C2_mime_nesting_at_the_limit_is_delivered(relay, sink):
    headers, body = nested(20)
    before = len(sink.messages)
    assert outcome(relay, mail(relay.alias, headers, body))[0] == 250
    sink.wait_for(before + 1)


# While a hostile message is processed, the event loop must keep serving everyone else: a second
# session sends NOOPs, one at a time and 50 ms apart, from before the message's final dot until
# after its final reply, and every NOOP must be answered within LIVENESS.  Not a benchmark: the
# bound is far above what a free loop needs (milliseconds), and since a NOOP is on its way all the
# time the message is processed, a loop blocked by that processing for longer than the bound cannot
# slip between two NOOPs.
LIVENESS = 3.0
_BEAT = 0.05


class Heartbeat:
    """NOOPs on sessions of their own, one at a time, from ``with`` until one sent after its end."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.waits: list[float] = []        # seconds from each NOOP sent to its answer
        self.answers: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._beating = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn, sent = None, 0
        try:
            while True:
                if conn is None or sent >= 90:      # [smtp] junk_command_limit: 100 NOOPs a session
                    if conn is not None:
                        conn.close()
                    conn = greeted(self.port)
                    assert conn.cmd("EHLO heartbeat.test").startswith("250")
                    sent = 0
                last = self._stop.is_set()
                start = time.monotonic()
                answer = conn.cmd("NOOP")
                self.waits.append(time.monotonic() - start)
                self.answers.append(answer)
                sent += 1
                self._beating.set()
                if last or not answer.startswith("250"):
                    return
                self._stop.wait(_BEAT)
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.error = exc
        finally:
            if conn is not None:
                conn.close()
            self._beating.set()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        assert self._beating.wait(30), "the heartbeat session did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(LIVENESS + 30)

    def check(self) -> None:
        assert self.error is None, repr(self.error)
        assert self.answers and all(a.startswith("250") for a in self.answers), self.answers
        worst = max(self.waits)
        assert worst < LIVENESS, f"a concurrent NOOP waited {worst:.2f} s: the event loop was blocked"


def hostile(relay, data: bytes) -> tuple[int, str]:
    """The final reply to ``data`` (the seller to the alias), sent while a :class:`Heartbeat` checks
    that the relay keeps answering a second session."""
    with relay.smtp() as big:
        assert big.mail(SELLER)[0] == 250 and big.rcpt(relay.alias)[0] == 250
        assert big.docmd("DATA")[0] == 354
        with Heartbeat(relay.port) as beat:
            big.send(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            code, text = big.getreply()
    beat.check()
    return code, text.decode()


def test_C3_header_section_over_100kb_handled_and_the_loop_keeps_serving(relay, sink):
    junk = "".join(f"X-Junk-{i}: {'a' * 90}\r\n" for i in range(1200))       # ~115 KB of header
    data = mail(relay.alias, junk)
    assert len(data.partition(b"\r\n\r\n")[0]) > 100 * 1024
    before = len(sink.messages)
    code, text = hostile(relay, data)
    assert code == 250, text                       # decision: accepted; the allowlist drops the junk
    got = sink.wait_for(before + 1)[-1]
    assert b"X-Junk" not in got.data and len(got.data) < 10_000


def test_C3_to_header_with_20000_addresses(relay, sink):
    to = ",\r\n ".join(f"u{i}@crowd.example" for i in range(20_000))
    data = f"From: {SELLER}\r\nTo: {to}\r\nSubject: {SUBJECT}\r\n\r\nHello.\r\n".encode()
    before = len(sink.messages)
    code, text = hostile(relay, data)
    assert code == 250, text                       # decision: accepted; To is rewritten to the one recipient
    got = sink.wait_for(before + 1)[-1]
    assert b"crowd.example" not in got.data and got.rcpt_tos == [BUYER]


# C4: each torture shape and its one documented answer (docs/catalogue.md, C4 table).
TORTURE = {
    "endless-boundary": ('MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="zz"\r\n',
                         "--zz\r\nContent-Type: text/plain\r\n\r\nhi\r\n" * 3, 250),
    "missing-boundary": ("MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n", "hi\r\n", 554),
    "broken-base64": ("MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n",
                      "!!!notbase64===\r\nabc\r\n", 250),
    "broken-quoted-printable": ("MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"
                                "Content-Transfer-Encoding: quoted-printable\r\n", "=ZZ=4\r\nabc=\r\n", 250),
    "unknown-charset": ("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=x-klingon\r\n", "hi\r\n", 250),
    "lying-charset": ("MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
                      "Content-Transfer-Encoding: 8bit\r\n", "h\u00e9llo\r\n", 250),
}


@pytest.mark.parametrize("shape", sorted(TORTURE))
def test_C4_torture_messages_get_their_documented_answer(relay, sink, shape):
    headers, body, expected = TORTURE[shape]
    before = len(sink.messages)
    data = mail(relay.alias, headers, "") + body.encode("utf-8")
    code, text = hostile(relay, data)
    assert code == expected, (shape, code, text)
    if code == 250:
        got = sink.wait_for(before + 1)[-1]
        assert got.data.endswith(b"\r\n\r\n" + body.encode("utf-8"))      # the body passes untouched
    else:
        assert f"{code} {text}" == MALFORMED                              # a catalogue text, no internals


# The same shapes at a size that makes the relay work, each answered while a second session's
# NOOPs are (hostile(): LIVENESS): (headers, body, the expected reply, or "250").
LARGE = {
    # Endless boundaries: 20,000 parts opened and never closed; 100,000 delimiter lines and no part.
    # More than relay/mime.MAX_PARTS (500) parts is malformed.
    "20000-unclosed-parts": ('MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="zz"\r\n',
                             "--zz\r\nContent-Type: text/plain\r\n\r\nhi\r\n" * 20_000, MALFORMED),
    "100000-delimiters": ('MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="zz"\r\n',
                          "--zz\r\n" * 100_000, MALFORMED),
    # 2 MB of base64 with characters outside the alphabet in a PDF attachment: decoded leniently.
    "2mb-broken-base64": ('MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n',
                          "--b\r\nContent-Type: text/plain\r\n\r\nSee the invoice.\r\n"
                          "--b\r\nContent-Type: application/pdf; name=x.pdf\r\n"
                          "Content-Disposition: attachment; filename=x.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                          + ("!!JVBERi0xLjQgeHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh*\r\n" * 28_000)
                          + "--b--\r\n", "250"),
    # A 1,000,000-octet line (catalogue P16: more than 998 octets): refused, nothing queued.
    "1mb-line": ("", "y" * 1_000_000 + "\r\n", reply("msg.line_too_long")),
}


@pytest.mark.parametrize("shape", sorted(LARGE))
def test_C4_large_torture_messages_answered_while_the_loop_keeps_serving(relay, sink, shape):
    headers, body, expected = LARGE[shape]
    before = len(sink.messages)
    code, text = hostile(relay, mail(relay.alias, headers, "") + body.encode())
    if expected == "250":
        assert code == 250, text
        sink.wait_for(before + 1)
    else:
        assert f"{code} {text}" == expected
        time.sleep(0.3)
        assert len(sink.messages) == before


def test_C4_headers_without_a_body_are_delivered(relay, sink):
    before = len(sink.messages)
    assert outcome(relay, f"From: {SELLER}\r\nTo: {relay.alias}\r\nSubject: {SUBJECT}\r\n".encode())[0] == 250
    sink.wait_for(before + 1)


def test_C4_a_body_without_headers_is_malformed(relay, sink):
    before = len(sink.messages)
    code, text = outcome(relay, b"just a body\r\nwith two lines\r\n")
    assert f"{code} {text}" == MALFORMED
    assert len(sink.messages) == before


@pytest.mark.skipif(SMTP_SINK is None, reason="Postfix's smtp-sink is not installed")
def test_C5_8bit_body_never_sent_raw_to_a_server_without_8bitmime(tmp_path):
    seven = PostfixSink(tmp_path, "-8")                # smtp-sink -8: does not announce 8BITMIME
    (tmp_path / "relay").mkdir()
    r = make_relay(tmp_path / "relay", sink_port=seven.port)
    try:
        alias = _seed(r)
        r.start()
        with r.smtp() as c:
            c.sendmail(SELLER, [alias], mail(alias, "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                                             "Content-Transfer-Encoding: 8bit\r\n", "Gr\u00fc\u00dfe\r\n"))
            c.sendmail(SELLER, [alias], mail(alias, body="plain ascii\r\n"))
        failed = wait_event(r, "delivery.failed")
        assert "5.6.3" in failed[0]["reply"]
        wait_event(r, "delivery.delivered", count=2)     # the ASCII message, and our DSN to the seller
        deadline = time.monotonic() + 10
        while seven.count() < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        dumps = [p.read_bytes() for p in seven.dumps.iterdir()]
        assert len(dumps) == 2
        assert all(d.isascii() for d in dumps)           # nothing 8-bit reached the 7-bit server
        assert any(b"plain ascii" in d for d in dumps)
        dsn = [d for d in dumps if b"multipart/report" in d]
        assert dsn and b"5.6.3" in dsn[0] and BUYER.encode() not in dsn[0]
        assert r.stop() == 0
        assert "Traceback" not in r.log()
    finally:
        if r.proc is not None:
            r.stop()
        seven.stop()
