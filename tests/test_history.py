"""[storage] history_days: the serving relay deletes finished queue items (their recipients with
them), decision log rows and delivery events older than the window, at start and then every
ten minutes; a message still queued is kept however old, and so is everything newer."""

from __future__ import annotations

import json
import time

import pytest
from helpers import DEMO_SELLER, Sink, make_relay, message, seed_pair, until

from bsm_relay.config.settings import ConfigError, load

DAY = 86400


def counts(relay) -> dict[str, int]:
    q = relay.database.query
    return {"done": q("SELECT count(*) FROM queue WHERE status = 'done'")[0][0],
            "queued": q("SELECT count(*) FROM queue WHERE status = 'queued'")[0][0],
            "recipients": q("SELECT count(*) FROM queue_recipients")[0][0],
            "log": q("SELECT count(*) FROM message_log")[0][0],
            "events": q("SELECT count(*) FROM message_events")[0][0]}


def test_history_older_than_the_window_is_deleted_and_the_rest_kept(tmp_path):
    with Sink() as sink:
        relay = make_relay(tmp_path, sink_port=sink.port,
                           extra="\n[auth]\nsender_authentication = \"none\"\n")
        relay.config.write_text(relay.config.read_text().replace("[storage]\n", "[storage]\nhistory_days = 30\n", 1))
        alias = seed_pair(relay)["buyer_alias"]
        relay.start()
        try:
            with relay.smtp() as c:
                for n in range(3):
                    c.sendmail(DEMO_SELLER, [alias], message(DEMO_SELLER, alias, subject=f"Old {n}"))
            sink.wait_for(3)
            until(lambda: counts(relay)["done"] == 3, "three finished items")
        finally:
            assert relay.stop() == 0
        # Those three become 40 days old; a fourth message, queued 40 days ago and never
        # delivered (on hold), must stay.
        old = time.time() - 40 * DAY
        db = relay.database
        db.execute("UPDATE queue SET next_attempt_at = ?, created_at = ?", old, old)
        db.execute("UPDATE message_log SET at = ?", old)
        db.execute("UPDATE message_events SET at = ?", old)
        held = json.loads(relay.cli("queue", "list", "--all", "--json").stdout)[0]["id"]
        db.execute("UPDATE queue SET status = 'hold' WHERE id = ?", held)
        before = counts(relay)
        assert before["done"] == 2 and before["log"] >= 3 and before["events"] >= 3
        relay.start()
        try:
            after = until(lambda: (c := counts(relay))["done"] == 0 and c["log"] == 0 and c["events"] == 0 and c,
                          "the sweep at start")
            # The held item and its recipient are kept; the finished ones took theirs with them.
            assert db.query("SELECT id, status FROM queue") == [(held, "hold")]
            assert after["recipients"] == 1
            # What happens now is history of today: kept.
            with relay.smtp() as c:
                c.sendmail(DEMO_SELLER, [alias], message(DEMO_SELLER, alias, subject="New"))
            sink.wait_for(4)
            until(lambda: counts(relay)["done"] == 1, "the new message finished")
            assert counts(relay)["log"] >= 1
        finally:
            assert relay.stop() == 0
        log = relay.log()
        assert "Traceback" not in log
        purged = [json.loads(line) for line in log.splitlines() if '"history.purged"' in line]
        assert purged and purged[0]["queue_items"] == 2 and purged[0]["log_rows"] == before["log"]


def test_a_negative_window_is_refused_at_start(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text(f'[storage]\nstate_dir = "{tmp_path}"\nhistory_days = -1\n')
    with pytest.raises(ConfigError, match="history_days"):
        load(str(config))
    config.write_text(f'[storage]\nstate_dir = "{tmp_path}"\nhistory_days = 0\n')
    assert load(str(config)).storage.history_days == 0


def test_spool_files_no_queue_row_names_are_removed_once_an_hour_old(tmp_path):
    import os

    from bsm_relay.relay import spool
    sink = Sink()                    # never started: the downstream is down, the message stays queued
    relay = make_relay(tmp_path, sink_port=sink.port, extra="\n[auth]\nsender_authentication = \"none\"\n")
    relay.config.write_text(relay.config.read_text().replace("[queue]\n", "[queue]\nspool_threshold = 1024\n", 1))
    alias = seed_pair(relay)["buyer_alias"]
    relay.start()
    try:
        with relay.smtp() as c:
            c.sendmail(DEMO_SELLER, [alias], message(DEMO_SELLER, alias, body="A long line of text.\r\n" * 200))
    finally:
        assert relay.stop() == 0
    directory = tmp_path / "state" / spool.host_prefix()
    [queued] = list(directory.iterdir())            # the queued message's own file
    orphan = directory / "q00000000000deadbeef-00000000.eml"   # a crash's leftover: no row names it
    fresh = directory / "q00000000001deadbeef-00000001.eml"    # as young as an acceptance in progress
    orphan.write_bytes(b"Subject: left behind\r\n\r\nx\r\n")
    fresh.write_bytes(b"Subject: being accepted\r\n\r\nx\r\n")
    two_hours_ago = time.time() - 7200
    for path in (queued, orphan):
        os.utime(path, (two_hours_ago, two_hours_ago))
    relay.start()
    try:
        until(lambda: not orphan.exists(), "the orphaned spool file removed")
        assert queued.exists() and fresh.exists()
        assert len(json.loads(relay.cli("queue", "list", "--json").stdout)) == 1
    finally:
        assert relay.stop() == 0
    purged = [json.loads(line) for line in relay.log().splitlines() if '"history.purged"' in line]
    assert [p["spool_files"] for p in purged] == [1]
