"""Acceptance catalogue, D (durability and delivery): ../shared/CATALOGUE.md, mapped in docs/catalogue.md.

Covered elsewhere:
D1: tests/test_e2e_durability.py::test_kill_9_after_250_then_restart_delivers_everything
D5: tests/test_delivery_faults.py::test_smtp_sink_soft_reject_is_retried_until_it_recovers,
    tests/test_delivery.py::test_4xx_is_retried_with_backoff_then_delivered
D6: tests/test_delivery_faults.py::test_smtp_sink_hard_reject_is_not_retried_and_bounces,
    tests/test_delivery.py::test_5xx_bounces_once_in_aliases
D7: tests/test_delivery_faults.py::test_smtp_sink_lost_final_reply_is_temporary_and_retried
D8: tests/test_delivery_faults.py::test_smtp_sink_slow_final_reply_waits_up_to_the_timeout
D9: tests/test_delivery_faults.py::test_mx_delivery
D10: tests/test_delivery.py::test_partial_recipients_only_the_deferred_one_is_retried
D11: tests/test_delivery.py::test_two_workers_never_attempt_the_same_item,
    tests/test_e2e_ops.py::test_two_workers_share_the_port_restart_a_crashed_one_and_deliver_once
D12: tests/test_delivery.py::test_poison_item_is_held_after_three_tries_while_others_flow
D13: tests/test_delivery.py::test_expiry_with_a_compressed_clock_bounces_with_4_4_7

D3: a locked database and a low-disk threshold here; a full and a read-only file system under a running
relay in tests/test_catalogue_d_storage.py. All end in the same 4xx path
(docs/decisions/0008-acceptance-catalogue-answers.md).
"""

from __future__ import annotations

import email
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from helpers import make_relay, seed_pair, serving, until
from test_e2e_ops import Line, greeted

from bsm_relay.policy.reasons import reply

SMTP_SOURCE = shutil.which("smtp-source") or next(
    (p for p in ("/usr/sbin/smtp-source",) if Path(p).exists()), None)


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    yield from serving(make_relay(tmp_path_factory.mktemp("cat-d"), sink_port=sink.port))


def queued(relay, everything: bool = True) -> list:
    return json.loads(relay.cli("queue", "list", *(["--all"] if everything else []), "--json").stdout)


def postmaster_session(port: int) -> Line:
    conn = greeted(port)
    assert conn.cmd("EHLO client.test").startswith("250")
    assert conn.cmd("MAIL FROM:<someone@outside.example>").startswith("250")
    assert conn.cmd("RCPT TO:<postmaster>").startswith("250")
    assert conn.cmd("DATA").startswith("354")
    return conn


def test_D2_kill_during_data_queues_nothing_and_the_client_can_retry(tmp_path, sink):
    r = make_relay(tmp_path, sink_port=sink.port)
    r.start()
    conn = postmaster_session(r.port)
    conn.sock.sendall(b"Subject: half\r\n\r\nthe first half of a message ")
    time.sleep(0.3)
    r.proc.send_signal(signal.SIGKILL)
    r.proc.wait()
    r.proc = None
    conn.close()
    before = len(sink.messages)
    r.start()
    assert queued(r) == []
    # The client retries after the crash: that copy is accepted and delivered, once.
    conn = postmaster_session(r.port)
    assert conn.cmd("Subject: whole\r\n\r\nthe whole message\r\n.").startswith("250")
    conn.close()
    got = sink.wait_for(before + 1)
    time.sleep(0.5)
    assert len(sink.messages) == before + 1 and b"the whole message" in got[-1].data
    assert r.stop() == 0


@pytest.fixture
def locked_relay(tmp_path, sink):
    """A relay whose writes wait at most 0.5 s for a lock ([storage] busy_timeout; the default 30 s
    would only make the test slow)."""
    r = make_relay(tmp_path, sink_port=sink.port)
    if r.database is None or r.database.sqlite_path is None:
        pytest.skip("the lock case is SQLite's (PostgreSQL: tests/test_backpressure.py and friends)")
    r.config.write_text(r.config.read_text().replace("[storage]\n", "[storage]\nbusy_timeout = 0.5\n", 1))
    r.start()
    yield r
    assert r.stop() == 0
    assert "Traceback" not in r.log()


def test_D3_locked_database_answers_451_430_without_internals_then_recovers(locked_relay, sink):
    relay = locked_relay
    db = sqlite3.connect(relay.database.sqlite_path, timeout=0.1, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")               # another process holds the write lock
    try:
        conn = postmaster_session(relay.port)
        answer = conn.cmd("Subject: while locked\r\n\r\nbody\r\n.")
        conn.close()
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert answer.strip() == reply("local.storage"), answer        # 451 4.3.0, a catalogue text
    assert "lock" not in answer.lower() and "sqlite" not in answer.lower()
    before = len(sink.messages)
    conn = postmaster_session(relay.port)
    assert conn.cmd("Subject: after\r\n\r\nbody\r\n.").startswith("250")
    conn.close()
    got = sink.wait_for(before + 1)
    assert b"while locked" not in b"".join(m.data for m in got)
    assert '"store.error"' in relay.log()


def _refused_by(port: int, alias: str, sender: str) -> str:
    conn = greeted(port)
    assert conn.cmd("EHLO client.test").startswith("250")
    assert conn.cmd(f"MAIL FROM:<{sender}>").startswith("250")
    assert conn.cmd(f"RCPT TO:<{alias}>").startswith("250")
    assert conn.cmd("DATA").startswith("354")
    answer = conn.cmd(f"From: {sender}\r\nTo: {alias}\r\nSubject: hi\r\n\r\nhello\r\n.")
    conn.close()
    return answer


def test_D3_a_refusal_is_answered_while_the_database_is_locked_and_logged_after(tmp_path, sink):
    """A refusal's message-log row promises nothing: the refusal is answered at once, not after the
    writer's next commit (which another process's lock holds up here), and the row is written when
    the lock is let go.  (A new address's pending record is waited for: see the read-only case.)"""
    r = make_relay(tmp_path, sink_port=sink.port)
    if r.database is None or r.database.sqlite_path is None:
        pytest.skip("the database is held up from outside by SQLite's write lock")
    alias = seed_pair(r)["buyer_alias"]
    stranger = "stranger@outside.example"
    pending = "SELECT status, attempts FROM seller_addresses WHERE address = ?"
    r.start()
    try:
        assert _refused_by(r.port, alias, stranger).startswith("550")      # recorded as pending
        assert r.database.query(pending, stranger) == [("pending", 1)]
        db = sqlite3.connect(r.database.sqlite_path, timeout=0.1, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")               # another process holds the write lock
        try:
            answer = _refused_by(r.port, alias, stranger)
            # Answered while the lock is still held: before, the session waited for the commit.
            assert answer.startswith("550"), answer
            assert r.database.query("SELECT count(*) FROM message_log")[0][0] == 1
        finally:
            db.execute("ROLLBACK")
            db.close()
        logged = [("refused", "sender.not_approved")] * 2
        until(lambda: r.database.query("SELECT decision, reason FROM message_log") == logged,
              "the second refusal's row, once the lock is let go")
        until(lambda: r.database.query(pending, stranger) == [("pending", 2)], "the second try counted")
    finally:
        assert r.stop() == 0
    assert '"store.error"' not in r.log()


def test_D3_low_disk_threshold_answers_452_431_at_mail(tmp_path):
    r = make_relay(tmp_path)
    r.config.write_text(r.config.read_text().replace("[storage]\n", f"[storage]\nmin_free_bytes = {2 ** 62}\n", 1))
    r.start()
    try:
        conn = greeted(r.port)
        assert conn.cmd("EHLO client.test").startswith("250")
        assert conn.cmd("MAIL FROM:<someone@outside.example>").strip() == reply("storage.low_space")
        assert conn.cmd("RCPT TO:<postmaster>").startswith("503")     # no transaction
        conn.close()
        assert queued(r) == []
    finally:
        assert r.stop() == 0
    assert '"storage.low_space"' in r.log()


def test_D4_half_close_after_the_dot_and_quit_never_loses_an_accepted_message(relay, sink):
    before = len(sink.messages)
    answers = []
    for i in range(5):
        conn = postmaster_session(relay.port)
        conn.sock.sendall(f"Subject: half-close {i}\r\n\r\nbody {i}\r\n.\r\nQUIT\r\n".encode())
        conn.sock.shutdown(socket.SHUT_WR)
        answers.append(conn.reply())
        conn.close()
    accepted = [i for i, a in enumerate(answers) if a.startswith("250")]
    time.sleep(1.0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        got = [m for m in sink.messages[before:] if b"half-close" in m.data]
        if len(got) >= len(accepted):
            break
        time.sleep(0.1)
    subjects = [email.message_from_bytes(m.data)["Subject"] for m in sink.messages[before:]]
    for i in accepted:                           # every 250 is delivered ...
        assert subjects.count(f"half-close {i}") >= 1
    for i in range(5):                           # ... and nothing more than once per message
        assert subjects.count(f"half-close {i}") <= 1


@pytest.mark.skipif(SMTP_SOURCE is None, reason="Postfix's smtp-source is not installed")
def test_D14_2000_messages_over_20_connections_no_loss_no_duplicate(relay, sink):
    before = len(sink.messages)
    res = subprocess.run([SMTP_SOURCE, "-s", "20", "-m", "2000", "-f", "load@outside.example",
                          "-t", "postmaster", "-M", "load.test", f"127.0.0.1:{relay.port}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    got = sink.wait_for(before + 2000, timeout=300)[before:]
    time.sleep(1.0)
    assert len(sink.messages) == before + 2000
    ids = [email.message_from_bytes(m.data)["Message-Id"] for m in got]
    assert None not in ids and len(set(ids)) == 2000
    assert queued(relay, everything=False) == []
