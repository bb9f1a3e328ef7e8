"""What an operator sees, end to end: trace, stats, metrics, check and the log (issue 6).

One relay (``bsm-relay serve`` subprocess, smarthost delivery to a recording sink scripted to
defer or refuse some recipients, metrics on) takes a small run of mail: a plain message, one
written 40 minutes ago (upstream delay), one deferred once then delivered, one refused
downstream (5xx, so our DSN goes to the seller), one refused in the session.  The tests then
read that run back through ``trace``, ``stats``, the Prometheus endpoint and the log.  A second
relay that never delivers (``[delivery] workers = 0``) shows the queue gauges and the log with
``[logging] redact = false``; ``check`` runs against the test DNS server with a complete and an
incomplete zone.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import urllib.request
from email.utils import formatdate

import pytest
import structlog
from dnsserver import DnsServer
from helpers import RelayProcess, Sink, free_port, make_relay, until

from bsm_relay.relay import log
from bsm_relay.relay.log import EVENTS

SELLER = "seller@acme.example"
SELLER_ALT = "orders@acme.example"
BUYER = "buyer@example.org"
SLOW = "slow@example.com"        # the sink defers the first delivery to this buyer
GONE = "gone@example.net"        # the sink refuses this buyer for good (5xx)
REAL = (SELLER, SELLER_ALT, BUYER, SLOW, GONE)


def compose(from_: str, to: str, subject: str, *, written: float | None = None, received: float | None = None) -> bytes:
    written = time.time() if written is None else written
    hop = ""
    if received is not None:
        hop = ("Received: from laptop.acme.example ([198.51.100.7]) by smtp.slowprovider.example with ESMTPSA "
               f"id 77AB; {formatdate(received, usegmt=True)}\r\n")
    return (f"{hop}From: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\nDate: {formatdate(written, usegmt=True)}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@laptop.acme.example>\r\n\r\nHello.\r\n").encode()


def submit(relay: RelayProcess, mail_from: str, rcpt: str, data: bytes) -> str:
    """Send one message; returns the queue id of the 250 reply."""
    with relay.smtp() as c:
        c.mail(mail_from)
        code, text = c.rcpt(rcpt)
        assert code == 250, text
        code, text = c.data(data)
    assert code == 250, text
    return text.decode().rsplit(" ", 1)[-1]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def log_lines(relay: RelayProcess) -> list[dict]:
    return [json.loads(line) for line in relay.log().splitlines() if line.startswith("{")]


def trace(relay: RelayProcess, ident: str) -> dict:
    return json.loads(relay.cli("trace", ident, "--json").stdout)


# -- the run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sink():
    with Sink() as s:
        slow_seen = []
        lock = threading.Lock()

        def rcpt_reply(rcpt: str) -> str | None:
            if rcpt == GONE:
                return f"550 5.1.1 <{GONE}>: Recipient address rejected: User unknown"
            if rcpt == SLOW:
                with lock:
                    slow_seen.append(rcpt)
                    if len(slow_seen) == 1:
                        return "451 4.2.0 Mailbox busy, try again later"
            return None

        s.handler.rcpt_reply = rcpt_reply
        yield s


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink, metrics_port):
    r = make_relay(tmp_path_factory.mktemp("obs"), sink_port=sink.port,
                   extra=f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\nqueue_interval = 0.2\n')
    r.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    for buyer, address in (("B1", BUYER), ("B2", SLOW), ("B3", GONE)):
        r.cli("buyer", "add", buyer, "--email", address)
    for n, buyer in enumerate(("B1", "B2", "B3")):
        r.cli("order", "add", f"111-222333{n}-4445556", "--seller", "S1", "--buyer", buyer, "--status", "shipped")
    r.start()
    yield r
    code = r.stop()
    assert code == 0, f"exit {code}: {r.log()[-3000:]}"
    assert "Traceback" not in r.log(), r.log()[-5000:]


@pytest.fixture(scope="module")
def run(relay, sink, metrics_port):
    """The run of mail every test below reads back; returns what the tests need to find it."""
    before = until(lambda: _try_scrape(metrics_port), "the metrics endpoint")
    alias = {b: json.loads(relay.cli("alias", "S1", b, "--json").stdout)["buyer_alias"] for b in ("B1", "B2", "B3")}
    now = time.time()
    q_plain = submit(relay, SELLER, alias["B1"], compose(SELLER, alias["B1"], "plain one"))
    q_late = submit(relay, SELLER, alias["B1"], compose(SELLER, alias["B1"], "written earlier",
                                                        written=now - 2400, received=now - 2395))
    q_slow = submit(relay, SELLER, alias["B2"], compose(SELLER, alias["B2"], "deferred once"))
    q_gone = submit(relay, SELLER, alias["B3"], compose(SELLER, alias["B3"], "bounced"))
    with relay.smtp() as c:   # refused in the session: an unapproved sender, an unknown alias
        c.mail(SELLER_ALT)
        assert c.rcpt(alias["B1"])[0] == 250
        assert c.data(compose(SELLER_ALT, alias["B1"], "unapproved"))[0] == 550
        c.rset()
        c.mail(SELLER)
        assert c.rcpt("nosuchtoken@marketplace.example")[0] == 550
    # plain, late, slow (second try) and our DSN to the seller for the bounced one.
    delivered = sink.wait_for(4)
    # The late one is bounced later by the buyer's provider, to its signed bounce address.
    bounce_address = next(d for d in delivered if b"Subject: written earlier" in d.data).mail_from
    with relay.smtp() as c:
        c.mail("<>")
        assert c.rcpt(bounce_address)[0] == 250
        assert c.data(LATER_DSN.format(to=bounce_address).encode())[0] == 250
    delivered = sink.wait_for(5)      # ... and the seller gets our DSN for it
    until(lambda: json.loads(relay.cli("queue", "list", "--json").stdout) == [], "an empty queue")
    return {"alias": alias, "plain": q_plain, "late": q_late, "slow": q_slow, "gone": q_gone,
            "delivered": delivered, "metrics_before": before}


LATER_DSN = (
    "From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\nTo: <{to}>\r\n"
    "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\r\n"
    "--b1\r\nContent-Type: text/plain\r\n\r\nThe mailbox is full.\r\n"
    "--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n"
    f"Final-Recipient: rfc822; {BUYER}\r\nAction: failed\r\nStatus: 5.2.2\r\n"
    f"Diagnostic-Code: smtp; 552 5.2.2 <{BUYER}>: mailbox full\r\n\r\n--b1--\r\n")


def _try_scrape(port: int) -> dict[str, float] | None:
    try:
        return scrape(port)
    except OSError:
        return None


def _no_real_address(text: str) -> None:
    for address in REAL:
        assert address not in text, address


# -- trace --------------------------------------------------------------------------------

def test_trace_delivered_by_queue_id_message_id_and_session(relay, run):
    data = trace(relay, run["plain"])
    assert data["matched_by"] == "queue_id"
    [m] = data["messages"]
    assert m["decision"] == "accepted" and m["status"] == "done" and m["seller"] == "S1" and m["buyer"] == "B1"
    assert m["rewrite"]["recipients"][0]["alias"] == run["alias"]["B1"]
    assert m["rewrite"]["recipients"][0]["delivered_to"].startswith("addr:")     # redacted by default
    assert m["rewrite"]["from_alias"].endswith("@marketplace.example")
    assert m["rewrite"]["envelope_from"].endswith("@marketplace.example")
    assert [(h["event"], [r["outcome"] for r in h["recipients"]]) for h in m["history"]] == \
        [("delivery.attempt", ["delivered"])]
    # The Message-ID the buyer saw leads to the same message, and so does the session.
    minted = next(d for d in run["delivered"] if b"Subject: plain one" in d.data).data
    message_id = re.search(rb"^Message-ID: <([^>]+)>", minted, re.MULTILINE | re.IGNORECASE).group(1).decode()
    assert m["rewrite"]["message_id"] == f"<{message_id}>"
    by_mid = trace(relay, f"<{message_id}>")
    assert by_mid["matched_by"] == "message_id" and [x["queue_id"] for x in by_mid["messages"]] == [run["plain"]]
    by_session = trace(relay, m["session"])
    assert by_session["matched_by"] == "session" and [x["queue_id"] for x in by_session["messages"]] == [run["plain"]]

    text = relay.cli("trace", run["plain"]).stdout
    assert f"message queue id {run['plain']}, session {m['session']}" in text
    assert "accepted" in text and run["alias"]["B1"] in text and f"Message-ID <{message_id}>" in text
    assert "attempt 1: delivered" in text and "status: done, 1 attempt" in text
    _no_real_address(text)


def test_trace_deferred_then_delivered(relay, run):
    [m] = trace(relay, run["slow"])["messages"]
    attempts = [h for h in m["history"] if h["event"] == "delivery.attempt"]
    assert [[r["outcome"] for r in h["recipients"]] for h in attempts] == [["deferred"], ["delivered"]]
    assert attempts[0]["recipients"][0]["reply"].startswith("451 4.2.0")
    assert attempts[0]["next_attempt_at"] and attempts[1]["next_attempt_at"] is None
    text = relay.cli("trace", run["slow"]).stdout
    assert "attempt 1: deferred" in text and "451 4.2.0 Mailbox busy" in text and "next attempt" in text
    assert "attempt 2: delivered" in text and "status: done, 2 attempts" in text
    _no_real_address(text)


def test_trace_bounced_shows_the_failure_in_aliases_and_our_dsn(relay, run):
    [m] = trace(relay, run["gone"])["messages"]
    [attempt, dsn] = m["history"]
    assert attempt["event"] == "delivery.attempt" and attempt["recipients"][0]["outcome"] == "failed"
    # The downstream named the real recipient in its reply: the history names the alias instead.
    assert attempt["recipients"][0]["reply"] == \
        f"550 5.1.1 <{run['alias']['B3']}>: Recipient address rejected: User unknown"
    assert dsn["event"] == "dsn.queued" and dsn["action"] == "failed"
    [notice] = m["notices"]
    assert notice["queue_id"] == dsn["notice"] and notice["kind"] == "notice" and notice["status"] == "done"
    assert [r["outcome"] for r in notice["history"][0]["recipients"]] == ["delivered"]
    # The DSN itself can be traced by its own queue id.
    assert trace(relay, dsn["notice"])["messages"][0]["kind"] == "notice"
    text = relay.cli("trace", run["gone"]).stdout
    assert "attempt 1: failed" in text and "DSN (failed) queued to the sender as " + dsn["notice"] in text
    _no_real_address(text)


def test_trace_of_a_message_bounced_back_later(relay, run):
    [m] = trace(relay, run["late"])["messages"]
    assert [h["event"] for h in m["history"]] == ["delivery.attempt", "bounce.received"]
    bounce = m["history"][1]
    assert bounce["error"] == "bounced later: 5.2.2"
    [notice] = m["notices"]
    assert notice["queue_id"] == bounce["notice"] and notice["status"] == "done"
    text = relay.cli("trace", run["late"]).stdout
    assert "attempt 1: delivered" in text and f"bounce received from downstream (bounced later: 5.2.2); " \
        f"DSN queued as {bounce['notice']}" in text
    _no_real_address(text)


def test_trace_of_a_refused_message_by_its_session(relay, run):
    rejected = [e for e in log_lines(relay) if e["event"] == "smtp.rejected" and e.get("stage") == "data"]
    assert [e["reason"] for e in rejected] == ["sender.not_approved"]
    data = trace(relay, rejected[0]["session"])
    [m] = data["messages"]
    assert m["decision"] == "refused" and m["reason"] == "sender.not_approved" and m["reply"] == "550 5.7.1"
    text = relay.cli("trace", rejected[0]["session"]).stdout
    assert "refused: sender.not_approved (550 5.7.1)" in text
    _no_real_address(text)


def test_trace_of_something_unknown_fails(relay, run):
    res = relay.cli("trace", "q000000000000", check=False)
    assert res.returncode == 1 and "nothing known by" in res.stderr


# -- upstream delay --------------------------------------------------------------------------

def test_upstream_delay_in_the_log_trace_and_stats(relay, run):
    accepted = {e["queue_id"]: e for e in log_lines(relay) if e["event"] == "message.accepted"}
    assert 2390 <= accepted[run["late"]]["upstream_delay"] <= 2520
    assert accepted[run["plain"]]["upstream_delay"] < 60
    [m] = trace(relay, run["late"])["messages"]
    assert 2390 <= m["upstream_delay"] <= 2520
    text = relay.cli("trace", run["late"]).stdout
    assert "held it for 40 minutes before it reached us" in text
    stats = json.loads(relay.cli("stats", "--since", "1h", "--json").stdout)["upstream_delay"]
    assert stats["count"] == 4 and 2390 <= stats["max"] <= 2520 and stats["p50"] < 60


# -- stats --------------------------------------------------------------------------------

def test_stats_count_the_run(relay, run):
    data = json.loads(relay.cli("stats", "--since", "1h", "--json").stdout)
    assert data["accepted"] == 4
    assert data["refused_by_reason"] == {"sender.not_approved": 1}
    assert data["delivered"] == 5 and data["delivered_by_kind"] == {"forward": 3, "notice": 2}
    assert data["deferred"] == 1
    # One refused at delivery (5xx), one bounced back later by the downstream.
    assert data["bounced"] == 2 and data["failed"] == 1 and data["bounces_received"] == 1
    assert data["dsns_queued"] == 1
    assert data["queue"] == {"depth": 0, "by_status": {}, "oldest_age": None}
    text = relay.cli("stats", "--since", "90m").stdout
    assert "accepted   4" in text and "sender.not_approved" in text and "delivered  5" in text
    assert "deferred   1" in text and "bounced    2" in text and "p90" in text
    # A window that ends before the run counts nothing of it; a bad unit is refused.
    assert json.loads(relay.cli("stats", "--since", "0s", "--json").stdout)["accepted"] == 0
    bad = relay.cli("stats", "--since", "1w", check=False)
    assert bad.returncode == 1 and "--since" in bad.stderr


# -- metrics --------------------------------------------------------------------------------

def test_metrics_move_when_messages_pass(relay, run, metrics_port):
    before = run["metrics_before"]
    assert before.get("bsm_relay_messages_accepted_total") == 0
    after = scrape(metrics_port)
    assert after["bsm_relay_messages_accepted_total"] == 4
    assert after['bsm_relay_messages_refused_total{reason="sender.not_approved",stage="data"}'] == 1
    assert after['bsm_relay_messages_refused_total{reason="rcpt.unknown",stage="rcpt"}'] == 1
    assert after['bsm_relay_deliveries_total{kind="forward",outcome="delivered"}'] == 3
    assert after['bsm_relay_deliveries_total{kind="notice",outcome="delivered"}'] == 2
    assert after["bsm_relay_bounces_received_total"] == 1
    assert after['bsm_relay_deliveries_total{kind="forward",outcome="deferred"}'] == 1
    assert after['bsm_relay_deliveries_total{kind="forward",outcome="failed"}'] == 1
    assert after['bsm_relay_delivery_latency_seconds_count{kind="forward"}'] == 3
    assert after["bsm_relay_upstream_delay_seconds_count"] == 4
    # Each accepted message's wait from its final dot to the 250: a commit (with its fsync) takes
    # some time, and on a test machine far less than 30 s.
    assert after["bsm_relay_accept_wait_seconds_count"] == 4
    assert after["bsm_relay_accept_wait_seconds_sum"] > 0
    assert after['bsm_relay_accept_wait_seconds_bucket{le="30.0"}'] == 4
    assert after['bsm_relay_upstream_delay_seconds_bucket{le="1800.0"}'] == 3     # the late one is above
    assert after["bsm_relay_smtp_sessions_total"] >= before["bsm_relay_smtp_sessions_total"] + 5
    assert after['bsm_relay_queue_depth{status="queued"}'] == 0
    assert after["bsm_relay_queue_oldest_age_seconds"] == 0
    # The writer's group commits: each accepted message and each outcome went through one.
    commits = after["bsm_relay_queue_commits_total"] - before["bsm_relay_queue_commits_total"]
    entries = after["bsm_relay_queue_commit_entries_total"] - before["bsm_relay_queue_commit_entries_total"]
    assert 1 <= commits <= entries and entries >= 4 + 3
    assert after["bsm_relay_queue_commit_seconds_total"] > before["bsm_relay_queue_commit_seconds_total"]
    assert after["bsm_relay_queue_write_lock_wait_seconds_total"] >= 0


def test_a_message_alone_in_intake_is_delivered_without_a_claim(tmp_path):
    # With no other message being taken in, a small message is inserted already leased to the
    # process's delivery and sent from memory once committed (docs/decisions/0022): two entries
    # through the writer (the message, its outcome), not three (a claim between them).
    port = free_port()
    with Sink() as alone_sink:
        r = make_relay(tmp_path, sink_port=alone_sink.port, extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        r.env["BSM_RELAY_DELIVERY_POLL_INTERVAL"] = "3600"    # no poll: a wake-up or the hand-off delivers
        r.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
        r.cli("buyer", "add", "B1", "--email", BUYER)
        r.cli("order", "add", "111-2223334-4445556", "--seller", "S1", "--buyer", "B1", "--status", "shipped")
        alias = json.loads(r.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]
        r.start()
        try:
            until(lambda: _try_scrape(port), "the metrics endpoint")
            time.sleep(0.5)                                    # past the start-up's own writes
            before = scrape(port)
            for n in range(3):
                submit(r, SELLER, alias, compose(SELLER, alias, f"alone {n}"))
                alone_sink.wait_for(n + 1)
                until(lambda n=n: scrape(port)['bsm_relay_deliveries_total{kind="forward",outcome="delivered"}']
                      == n + 1, "the outcome stored")
            after = scrape(port)
        finally:
            assert r.stop() == 0, r.log()[-3000:]
    entries = after["bsm_relay_queue_commit_entries_total"] - before["bsm_relay_queue_commit_entries_total"]
    assert entries == 3 * 2, entries
    assert [m.rcpt_tos for m in alone_sink.messages] == [[BUYER]] * 3


# -- the log --------------------------------------------------------------------------------

def test_library_records_become_redacted_json_events():
    # SQLAlchemy's pool, asyncio and aiosmtpd write through the standard logging module.
    out = io.StringIO()
    root, mail_log = logging.getLogger(), logging.getLogger("mail.log")
    levels = root.level, mail_log.level
    log.configure("json", "info", log.Redactor(b"k" * 32, "marketplace.example"), stream=out)
    try:
        try:
            raise ValueError(f"boom for {BUYER}")      # a driver's message may quote parameters
        except ValueError:
            logging.getLogger("sqlalchemy.pool.impl").error("reset failed for %s", BUYER, exc_info=True)
        logging.getLogger("mail.log").warning("%r unrecognised: %s", ("127.0.0.1", 1), BUYER)
        logging.getLogger("asyncio").info("below the threshold")
    finally:   # this test process's other tests keep the default configuration
        for handler in [h for h in root.handlers if isinstance(h, log._Bridge)]:
            root.removeHandler(handler)
        root.setLevel(levels[0])
        mail_log.setLevel(levels[1])
        structlog.reset_defaults()
    [line] = out.getvalue().splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"], event["logger"]) == ("library.log", "error", "sqlalchemy.pool.impl")
    assert event["message"].startswith("reset failed for addr:") and BUYER not in line
    assert "ValueError: boom for addr:" in event["exception"]


def test_redacted_digests_stay_the_same_past_the_kept_ones():
    # Digests are kept for the addresses seen most recently; forgetting them changes nothing.
    redactor = log.Redactor(b"k" * 32, "marketplace.example")
    first = redactor.address(BUYER)
    assert first.startswith("addr:") and redactor.address(BUYER.upper()) == first
    assert redactor.address("bea@marketplace.example") == "bea@marketplace.example"
    others = {redactor.address(f"user{i}@example.org") for i in range(log._DIGESTS_KEPT + 10)}
    assert len(others) == log._DIGESTS_KEPT + 10 and first not in others
    assert redactor.address(BUYER) == first == log.Redactor(b"k" * 32, "marketplace.example").address(BUYER)
    assert log.Redactor(b"j" * 32, "marketplace.example").address(BUYER) != first


def test_redacted_texts_follow_a_reload_of_the_redact_setting():
    # Field values are kept with their redacted text; a reload that switches redaction off and on
    # again must never hand back what was kept under the other setting.
    redactor = log.Redactor(b"k" * 32, "marketplace.example")
    text = f"Bea <{BUYER}> wrote"
    redacted = redactor.text(text)
    assert BUYER not in redacted and redacted == redactor.text(text) and "addr:" in redacted
    redactor.enabled = False
    assert redactor.text(text) == text
    redactor.enabled = True
    assert redactor.text(text) == redacted
    long_text = "x" * 400 + f" {BUYER}"          # long values are redacted, not kept
    assert BUYER not in redactor.text(long_text) and long_text not in redactor._texts


def test_log_events_carry_ids_and_no_real_address_by_default(relay, run):
    # A client's junk verb is dropped by aiosmtpd's own logger, which writes plain text: it must
    # not reach the log, which holds JSON lines only.
    with relay.smtp() as c:
        assert c.docmd(f"{BUYER}")[0] == 500
    events = log_lines(relay)
    assert events
    assert len(events) == len(relay.log().splitlines())     # every line is one JSON event
    for e in events:
        assert {"event", "ts", "level"} <= e.keys() and e["event"] in EVENTS, e
    _no_real_address(relay.log())
    assert any(str(e.get("mail_from", "")).startswith("addr:") for e in events)
    accepted = [e for e in events if e["event"] == "message.accepted"]
    assert len(accepted) == 4 and all(e["queue_id"] and e["session"] and "upstream_delay" in e for e in accepted)
    session_of = {e["queue_id"]: e["session"] for e in accepted}
    deliveries = [e for e in events if e["event"].startswith("delivery.")]
    assert {e["event"] for e in deliveries} == {"delivery.delivered", "delivery.deferred", "delivery.failed"}
    for e in deliveries:
        assert e["queue_id"] and e["to"].startswith("addr:")
        if e["kind"] == "forward":
            assert e["session"] == session_of[e["queue_id"]]
    assert all(isinstance(e["latency"], float) for e in deliveries if e["event"] == "delivery.delivered")
    rejected = [e for e in events if e["event"] == "smtp.rejected"]
    assert {e["reason"] for e in rejected} == {"sender.not_approved", "rcpt.unknown"}
    assert all(e["session"] for e in rejected)
    [bounce] = [e for e in events if e["event"] == "bounce.received"]
    assert bounce["session"] and bounce["bounce_of"] == run["late"] and bounce["bounce"] == "notified"
    assert sum(1 for e in events if e["event"] == "smtp.connected") >= 5


# -- a relay that never delivers: queue gauges, and the log with redact = false --------------

@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    port = free_port()
    r = make_relay(tmp_path_factory.mktemp("quiet"),
                   extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\nqueue_interval = 0.2\n')
    r.env["BSM_RELAY_DELIVERY_WORKERS"] = "0"      # accept, never deliver: the queue stays
    r.env["BSM_RELAY_LOGGING_REDACT"] = "false"
    r.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    r.cli("buyer", "add", "B1", "--email", BUYER)
    r.cli("order", "add", "111-2223334-4445556", "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    r.start()
    r.metrics_port = port  # type: ignore[attr-defined]
    yield r
    code = r.stop()
    assert code == 0, f"exit {code}: {r.log()[-3000:]}"
    assert "Traceback" not in r.log(), r.log()[-5000:]


def test_queue_gauges_and_stats_show_what_waits(quiet):
    alias = json.loads(quiet.cli("alias", "S1", "B1", "--json").stdout)["buyer_alias"]
    qid = submit(quiet, SELLER, alias, compose(SELLER, alias, "waiting"))
    values = until(lambda: (v := _try_scrape(quiet.metrics_port)) and v['bsm_relay_queue_depth{status="queued"}'] == 1
                   and v["bsm_relay_queue_oldest_age_seconds"] > 0 and v, "the queue gauges")
    assert values["bsm_relay_messages_accepted_total"] == 1
    stats = json.loads(quiet.cli("stats", "--json").stdout)
    assert stats["queue"]["depth"] == 1 and stats["queue"]["by_status"] == {"queued": 1}
    assert stats["queue"]["oldest_age"] > 0 and stats["delivered"] == 0
    [m] = trace(quiet, qid)["messages"]
    assert m["status"] == "queued" and m["history"] == []
    # Unredacted on request: the operator sees the real recipient.
    assert m["rewrite"]["recipients"][0]["delivered_to"] == BUYER


def test_log_with_redact_false_shows_addresses(quiet):
    until(lambda: any(e["event"] == "message.accepted" for e in log_lines(quiet)), "message.accepted")
    accepted = [e for e in log_lines(quiet) if e["event"] == "message.accepted"]
    assert accepted[0]["mail_from"] == SELLER
    assert "addr:" not in quiet.log()


# -- check ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zone_dns():
    server = DnsServer()
    server.start_in_thread()
    yield server
    server.stop()


def test_check_complete_and_incomplete_zone(tmp_path, zone_dns):
    r = make_relay(tmp_path, dns=zone_dns)
    record = json.loads(r.cli("init", "--json").stdout)["dkim_txt_record"]
    assert record["name"] == "bsm1._domainkey.marketplace.example"
    zone_dns.zone[("marketplace.example", "MX")] = ["10 mx.relay.test."]
    zone_dns.zone[("marketplace.example", "TXT")] = ["v=spf1 mx -all"]
    zone_dns.zone[(record["name"], "TXT")] = [record["value"]]
    ok = r.cli("check", check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert all(line.startswith("ok ") for line in lines if line.strip()), ok.stdout
    for name in ("config", "alias keys", "dkim key", "database", "dns mx", "dns spf", "dns dkim"):
        assert any(line.split(None, 1)[1].startswith(name) for line in lines), name
    assert json.loads(r.cli("check", "--json").stdout)["ok"] is True

    # Incomplete: no MX, no DKIM key published; SPF still there.
    del zone_dns.zone[("marketplace.example", "MX")]
    del zone_dns.zone[(record["name"], "TXT")]
    bad = r.cli("check", check=False)
    assert bad.returncode == 1 and "2 of 7 checks failed: dns mx, dns dkim" in bad.stderr
    assert "MISSING  dns mx" in bad.stdout and "publish: marketplace.example. MX 10 mx.relay.test." in bad.stdout
    assert "ok       dns spf" in bad.stdout
    assert f'publish: {record["name"]}. TXT "{record["value"]}"' in bad.stdout
    data = json.loads(r.cli("check", "--json", check=False).stdout)
    assert data["ok"] is False
    assert {c["name"]: c["status"] for c in data["checks"]}["dns dkim"] == "MISSING"

    # A key that is not ours, and two SPF records, are wrong too.
    zone_dns.zone[("marketplace.example", "MX")] = ["10 mx.relay.test."]
    zone_dns.zone[(record["name"], "TXT")] = ["v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAold"]
    zone_dns.zone[("marketplace.example", "TXT")] = ["v=spf1 mx -all", "v=spf1 a -all"]
    wrong = r.cli("check", check=False)
    assert wrong.returncode == 1
    assert "publishes a different key" in wrong.stdout and "2 SPF records" in wrong.stdout


def test_check_without_init_says_what_to_do(tmp_path, zone_dns):
    r = make_relay(tmp_path, dns=zone_dns)
    (tmp_path / "state" / "keys" / "relay-keys.json").unlink()
    res = r.cli("check", check=False)
    assert res.returncode == 1
    assert "FAIL     alias keys" in res.stdout and "bsm-relay init" in res.stdout


# -- the upstream delay, as a pure function ----------------------------------------------------

NOW = 1_795_000_000.0   # a fixed "acceptance time"


@pytest.mark.parametrize(("headers", "expected"), [
    # Date only.
    (f"Date: {formatdate(NOW - 600, usegmt=True)}\r\n", 600.0),
    # The first Received (the bottom one) is earlier than Date: the provider's first hop counts.
    (f"Received: by mx2.example; {formatdate(NOW - 60, usegmt=True)}\r\n"
     f"Received: by smtp.example; {formatdate(NOW - 2400, usegmt=True)}\r\n"
     f"Date: {formatdate(NOW - 1800, usegmt=True)}\r\n", 2400.0),
    # A Date from a client clock that runs ahead is ignored, not a negative delay.
    (f"Date: {formatdate(NOW + 3600, usegmt=True)}\r\n", None),
    (f"Date: {formatdate(NOW + 3600, usegmt=True)}\r\nReceived: by a; {formatdate(NOW - 5, usegmt=True)}\r\n", 5.0),
    # Within the tolerated skew: zero.
    (f"Date: {formatdate(NOW + 60, usegmt=True)}\r\n", 0.0),
    ("Date: yesterday-ish\r\nReceived: from somewhere without a date\r\n", None),
    ("Subject: no timestamps at all\r\n", None),
])
def test_upstream_delay(headers, expected):
    from bsm_relay.relay.headers import parse_headers
    from bsm_relay.relay.intake import upstream_delay
    assert upstream_delay(parse_headers(headers.encode()), NOW) == expected
