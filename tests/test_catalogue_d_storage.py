"""Acceptance catalogue D3, the file system cases: a full and a read-only state directory under a
running ``bsm-relay serve`` (../shared/CATALOGUE.md, mapped in docs/catalogue.md).

The faults are real, made with the kernel against the unmodified serving process:

* **full**: the state directory (SQLite database, WAL, keys) is a small tmpfs of its own; the test
  fills it with a file up to ``ENOSPC`` while a client is in DATA, and deletes the file to end the fault.
* **read-only**: ``mount -o remount,ro`` is refused (EBUSY) while the relay holds its database open
  for writing, and an ext4 file system that turned itself read-only on an error (errors=remount-ro)
  stays so until it is unmounted, so neither can fault a running relay and then go away.  The state
  directory is therefore an ext4 image mounted over a loop device, and ``chattr +i`` on the database,
  its WAL and the directory makes them read-only the way a read-only mount does: every write through
  the relay's open descriptors fails (EPERM, ext4 checks it on open files) and so does every new open
  for writing.  ``chattr -i`` ends the fault while the relay keeps running.

Both need root (mount, losetup, chattr): CI runs as root and never skips them; a developer's run
without root skips them with that reason.  The locked-database and low-disk cases are in
tests/test_catalogue_d.py; all share the answer ``451 4.3.0`` (``local.storage``), never a 5xx and
never a 250 for a message that was not stored.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from dbtest import on_postgres
from helpers import DEMO_ORDER, DEMO_SELLER, RelayProcess, make_relay, message, seed_pair
from test_e2e_ops import events, greeted

from bsm_relay.policy.reasons import reply

pytestmark = [
    pytest.mark.skipif(on_postgres(), reason="the file system cases are SQLite's (the database is not in the "
                                             "state directory on PostgreSQL)"),
    pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                       reason="needs root to mount a file system for the state directory (CI runs as root)"),
]

STORAGE = reply("local.storage")            # 451 4.3.0 Temporary storage problem; try again later
SUBJECT = f"Order {DEMO_ORDER}"


def _run(*argv: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr.strip()}"


@contextmanager
def mounted(state: Path, *argv: str) -> Iterator[Path]:
    """``mount ARGV state`` for the duration; unmounted (and its loop device freed) afterwards."""
    state.mkdir(parents=True, exist_ok=True)
    _run("mount", *argv, str(state))
    try:
        yield state
    finally:
        if subprocess.run(["umount", str(state)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(state)], capture_output=True)


@contextmanager
def running(relay: RelayProcess) -> Iterator[RelayProcess]:
    """The relay serving; stopped before its file system is unmounted, cleanly and without a traceback."""
    relay.start()
    try:
        yield relay
    finally:
        code = relay.stop()
    assert code == 0
    assert "Traceback" not in relay.log(), relay.log()[-3000:]


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system has no byte left (ENOSPC)."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 1 << 12, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    st = os.statvfs(directory)
    assert st.f_bavail == 0, st
    return path


def transaction(relay: RelayProcess, rcpt: str, sender: str = DEMO_SELLER):  # type: ignore[no-untyped-def]
    """A session in DATA (354 received), for ``sender`` to ``rcpt``."""
    conn = greeted(relay.port)
    assert conn.cmd("EHLO client.test").startswith("250")
    assert conn.cmd(f"MAIL FROM:<{sender}>").startswith("250")
    assert conn.cmd(f"RCPT TO:<{rcpt}>").startswith("250")
    assert conn.cmd("DATA").startswith("354")
    return conn


def send(relay: RelayProcess, rcpt: str, subject: str, body: str = "Hello there.\r\n",
         sender: str = DEMO_SELLER) -> str:
    """One message in its own session: the reply to its final dot, or the 451 its RCPT got when the
    recipient's lookup could not use the database either.  The session must go on after it."""
    conn = greeted(relay.port)
    assert conn.cmd("EHLO client.test").startswith("250")
    assert conn.cmd(f"MAIL FROM:<{sender}>").startswith("250")
    answer = conn.cmd(f"RCPT TO:<{rcpt}>")
    if answer.startswith("250"):
        assert conn.cmd("DATA").startswith("354")
        answer = conn.cmd(message(sender, rcpt, subject, body).decode() + ".")
    else:
        assert answer.strip() == STORAGE, answer
    assert conn.cmd("NOOP").startswith("250"), "the session must go on after the reply to the message"
    conn.cmd("QUIT")
    conn.close()
    return answer.strip()


def alive(relay: RelayProcess) -> None:
    """The serving process is still there and answers a new session."""
    assert relay.proc is not None and relay.proc.poll() is None, relay.log()[-3000:]
    conn = greeted(relay.port)
    assert conn.cmd("EHLO client.test").startswith("250")
    assert conn.cmd("NOOP").startswith("250")
    conn.close()


def queued_subjects(relay: RelayProcess) -> list[bytes]:
    """The Subject lines of every queue row, delivered or not."""
    assert relay.database is not None
    return [line for (body,) in relay.database.query("SELECT body FROM queue")
            for line in bytes(body).split(b"\r\n") if line.startswith(b"Subject:")]


@contextmanager
def serving_after_one(tmp_path: Path, sink) -> Iterator[tuple[RelayProcess, str, int]]:
    """A relay with its state in ``tmp_path / "state"`` (mounted by the caller), serving, one message
    accepted and delivered first: (relay, buyer alias, the sink's count before that message)."""
    relay = make_relay(tmp_path, sink_port=sink.port)
    alias = seed_pair(relay)["buyer_alias"]
    with running(relay):
        before = len(sink.messages)
        assert send(relay, alias, f"{SUBJECT} before").startswith("250")
        sink.wait_for(before + 1)
        yield relay, alias, before


def smtp_storage_errors(relay: RelayProcess) -> list[dict]:
    """``store.error`` events of SMTP sessions (the delivery side's carry a ``stage``)."""
    return [e for e in events(relay, "store.error") if "stage" not in e]


def test_D3_full_file_system_answers_451_430_then_accepts_again_once_there_is_room(tmp_path, sink):
    with mounted(tmp_path / "state", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs") as state:
        with serving_after_one(tmp_path, sink) as (relay, alias, before):

            # The disk fills up while a client is in DATA (MAIL found room; [storage] min_free_bytes is 0).
            conn = transaction(relay, "postmaster", "someone@outside.example")
            filler = fill(state)
            # SQLite writes its WAL from the start again only after a checkpoint, which it runs once
            # the WAL holds 1000 pages: below that every commit appends and needs space there is not.
            assert (state / "relay.db-wal").stat().st_size < 1000 * 4096
            answer = conn.cmd("Subject: while full\r\n\r\nHello there.\r\n.")
            assert answer.strip() == STORAGE, answer
            assert conn.cmd("NOOP").startswith("250")          # the session goes on
            conn.close()
            # A seller's message in a new session: the same answer, never a 5xx.
            assert send(relay, alias, f"{SUBJECT} while full") == STORAGE
            alive(relay)
            refused = smtp_storage_errors(relay)
            assert len(refused) == 2 and all("full" in e["error"] for e in refused), refused

            filler.unlink()                                          # room again
            assert send(relay, alias, f"{SUBJECT} after").startswith("250")
            sink.wait_for(before + 2)
            time.sleep(0.5)
            delivered = b"".join(m.data for m in sink.messages[before:])
            assert len(sink.messages) == before + 2 and b"before" in delivered and b"after" in delivered
            assert b"while full" not in delivered
            stored = b"".join(queued_subjects(relay))
            assert b"while full" not in stored                       # no 250, and no row either
            assert b"before" in stored and b"after" in stored


@contextmanager
def read_only(state: Path) -> Iterator[None]:
    """The database, its WAL and the state directory unwritable (chattr +i) for the duration."""
    paths = [str(state / "relay.db"), str(state / "relay.db-wal"), str(state)]
    _run("chattr", "+i", *paths)
    try:
        yield
    finally:
        _run("chattr", "-i", *paths)


@contextmanager
def ext4_state(tmp_path: Path) -> Iterator[Path]:
    image = tmp_path / "state.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    _run("mkfs.ext4", "-q", "-F", str(image))
    with mounted(tmp_path / "state", "-o", "loop", str(image)) as state:
        os.chmod(state, 0o700)
        yield state


def test_D3_read_only_file_system_answers_451_430_then_accepts_again_once_writable(tmp_path, sink):
    with ext4_state(tmp_path) as state:
        with serving_after_one(tmp_path, sink) as (relay, alias, before):
            with read_only(state):
                assert send(relay, alias, f"{SUBJECT} while read-only") == STORAGE
                # An unknown sender is recorded as pending before it is refused: that write fails
                # too, and the answer is the storage one (try again), not a refusal.
                assert send(relay, alias, f"{SUBJECT} unknown", sender="new@acme.example") == STORAGE
                assert send(relay, "postmaster", "to postmaster while read-only",
                            sender="someone@outside.example") == STORAGE
                alive(relay)
            refused = smtp_storage_errors(relay)
            assert len(refused) == 3, refused                     # one per refused message, saying why
            assert all("readonly" in e["error"] or "I/O" in e["error"] for e in refused), refused
            # Writable again: accepted and delivered.  This client retries a 451 as any MTA would;
            # the strict version (every write succeeds at once) is the test below.
            for _ in range(20):
                answer = send(relay, alias, f"{SUBJECT} after")
                if not answer.startswith("451"):
                    break
                time.sleep(0.2)
            assert answer.startswith("250"), answer
            got = sink.wait_for(before + 2)
            assert any(b"after" in m.data for m in got[before:])
            alive(relay)
        delivered = b"".join(m.data for m in sink.messages[before:])
        assert b"read-only" not in delivered and b"unknown" not in delivered
        stored = b"".join(queued_subjects(relay))
        assert b"read-only" not in stored and b"unknown" not in stored and b"after" in stored


def test_D3_after_a_read_only_spell_every_write_succeeds_again(tmp_path, sink):
    with ext4_state(tmp_path) as state:
        with serving_after_one(tmp_path, sink) as (relay, alias, before):
            with read_only(state):
                # Several clients at once, as in production: the relay opens more database
                # connections while the files cannot be written.
                with ThreadPoolExecutor(6) as pool:
                    answers = list(pool.map(lambda i: send(relay, alias, f"{SUBJECT} during {i}"), range(6)))
                assert answers == [STORAGE] * 6, answers
            mark = len(events(relay, "store.error"))
            # From now on every write succeeds at the first try: accepting, claiming, recording.
            answers = [send(relay, alias, f"{SUBJECT} after {i}") for i in range(6)]
            assert all(a.startswith("250") for a in answers), answers
            sink.wait_for(before + 7)
            deadline = time.monotonic() + 5
            while relay.cli("queue", "list", "--json").stdout.strip() not in ("[]", "") \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)                                  # a few more delivery rounds
            assert events(relay, "store.error")[mark:] == []
            assert relay.cli("queue", "list", "--json").stdout.strip() == "[]"
        subjects = [line for m in sink.messages[before:] for line in m.data.split(b"\r\n")
                    if line.startswith(b"Subject:")]
        assert sorted(subjects) == sorted({*subjects}) and len(subjects) == 7, subjects   # each exactly once
