"""The queue and delivery side, in process, against a real scripted SMTP sink on loopback.

Each test builds a throwaway SQLite database through the migrations, queues rows the
way intake does, and runs real ``Deliverer`` workers against a real downstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import dbtest
import dkim
import pytest
from delivery_harness import ALIASES, BUYERS, SELLER, dsns, enqueue, item, parse, run_until, sessions, settings_for  # noqa: F401
from helpers import Sink

from bsm_relay.relay.dkim import DkimSigner, generate_key
from bsm_relay.relay.queue import list_items


@pytest.fixture
def sink():
    with Sink() as s:
        yield s


async def test_4xx_is_retried_with_backoff_then_delivered(tmp_path, sink, sessions):
    settings = settings_for(tmp_path, sink.port)
    answers = iter(["451 4.3.0 try again later"])
    sink.handler.rcpt_reply = lambda rcpt: next(answers, None)
    await enqueue(sessions, "qretry", [(BUYERS[0], ALIASES[0])])

    async def delivered():
        return len(sink.messages) == 1
    await run_until(settings, sessions, delivered)
    row = await item(sessions, "qretry")
    assert row["status"] == "done" and row["attempts"] == 2
    assert sink.messages[0].rcpt_tos == [BUYERS[0]]
    assert dsns(sink) == []


async def test_a_refused_mail_from_is_retried_on_4xx_and_bounced_on_5xx(tmp_path, sink, sessions):
    # MAIL is written by delivery itself for plain addresses (delivery._mail): the downstream
    # server's answer to it must still decide the outcome as aiosmtplib's mail() would.
    settings = settings_for(tmp_path, sink.port)
    answers = iter(["451 4.3.0 sender check unavailable"])
    sink.handler.mail_reply = lambda sender: next(answers, None) if sender not in ("", "<>") else None
    await enqueue(sessions, "qmail4", [(BUYERS[0], ALIASES[0])])

    async def delivered():
        return len(sink.messages) == 1
    await run_until(settings, sessions, delivered)
    assert (await item(sessions, "qmail4"))["attempts"] == 2 and dsns(sink) == []

    sink.handler.mail_reply = lambda sender: "550 5.7.1 sender refused" if sender not in ("", "<>") else None
    await enqueue(sessions, "qmail5", [(BUYERS[1], ALIASES[1])])

    async def bounced():
        return len(dsns(sink)) == 1
    await run_until(settings, sessions, bounced)
    row = await item(sessions, "qmail5")
    assert row["status"] == "done" and row["recipients"] == [{"alias": ALIASES[1], "status": "failed"}]
    assert b"Status: 5.7.1" in dsns(sink)[0].data
    sink.handler.mail_reply = lambda sender: None


async def test_5xx_bounces_once_in_aliases(tmp_path, sink, sessions):
    settings = settings_for(tmp_path, sink.port)
    sink.handler.rcpt_reply = lambda rcpt: (f"550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
                                            if rcpt == BUYERS[0] else None)
    await enqueue(sessions, "qbounce", [(BUYERS[0], ALIASES[0])])

    async def bounced():
        return len(dsns(sink)) == 1
    await run_until(settings, sessions, bounced)
    await asyncio.sleep(0.3)   # no second DSN, no retry
    assert len(dsns(sink)) == 1 and len(sink.messages) == 1
    dsn = dsns(sink)[0]
    assert dsn.rcpt_tos == [SELLER]
    raw = dsn.data
    assert b"bea@buyers.example" not in raw.lower() and b"bea@" not in raw.lower()
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = parts[1].as_string()
    assert f"Final-Recipient: rfc822; {ALIASES[0]}" in status or f"Final-Recipient: rfc822;{ALIASES[0]}" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status and "Reporting-MTA: dns; mx.relay.test" in status
    row = await item(sessions, "qbounce")
    assert row["status"] == "done" and row["recipients"] == [{"alias": ALIASES[0], "status": "failed"}]


async def test_partial_recipients_only_the_deferred_one_is_retried(tmp_path, sink, sessions):
    settings = settings_for(tmp_path, sink.port)
    seen: list[str] = []

    def rcpt_reply(rcpt):
        seen.append(rcpt)
        if rcpt == BUYERS[2] and seen.count(rcpt) == 1:
            return "452 4.2.2 mailbox full, try later"
        return None
    sink.handler.rcpt_reply = rcpt_reply
    await enqueue(sessions, "qpartial", list(zip(BUYERS, ALIASES, strict=True)))

    async def all_delivered():
        return len(sink.messages) == 2
    await run_until(settings, sessions, all_delivered)
    first, second = sink.messages
    assert sorted(first.rcpt_tos) == sorted(BUYERS[:2])
    assert second.rcpt_tos == [BUYERS[2]]           # no re-send to the two accepted ones
    row = await item(sessions, "qpartial")
    assert row["status"] == "done" and {r["status"] for r in row["recipients"]} == {"delivered"}


async def test_partial_permanent_failure_bounces_only_that_alias(tmp_path, sink, sessions):
    settings = settings_for(tmp_path, sink.port)
    sink.handler.rcpt_reply = lambda rcpt: "550 5.7.1 refused" if rcpt == BUYERS[1] else None
    await enqueue(sessions, "qpart5", list(zip(BUYERS, ALIASES, strict=True)))

    async def done():
        return len(dsns(sink)) == 1 and len(sink.messages) == 2
    await run_until(settings, sessions, done)
    delivered = [m for m in sink.messages if m.mail_from not in ("", "<>")][0]
    assert sorted(delivered.rcpt_tos) == sorted([BUYERS[0], BUYERS[2]])
    raw = dsns(sink)[0].data
    status = list(parse(raw).iter_parts())[1].as_string()
    assert ALIASES[1] in status and ALIASES[0] not in status and ALIASES[2] not in status
    for real in BUYERS:   # not even the recipients that were delivered
        assert real.encode() not in raw


async def test_expiry_with_a_compressed_clock_bounces_with_4_4_7(tmp_path, sink, sessions):
    settings = settings_for(tmp_path, sink.port, max_lifetime=100)
    sink.handler.rcpt_reply = lambda rcpt: "451 4.3.0 still broken" if rcpt == BUYERS[0] else None
    # Queued 101 seconds ago: the next failed attempt is past the lifetime.
    await enqueue(sessions, "qexpire", [(BUYERS[0], ALIASES[0])], created_at=time.time() - 101)

    async def bounced():
        return len(dsns(sink)) == 1
    await run_until(settings, sessions, bounced)
    msg = parse(dsns(sink)[0].data)
    status = list(msg.iter_parts())[1].as_string()
    assert "Action: failed" in status and "Status: 4.4.7" in status
    row = await item(sessions, "qexpire")
    assert row["status"] == "done" and row["recipients"][0]["status"] == "failed"


async def test_delay_notice_is_sent_once(tmp_path, sink, sessions):
    settings = settings_for(tmp_path, sink.port, delay_warning=50)
    sink.handler.rcpt_reply = lambda rcpt: "451 4.3.0 busy" if rcpt == BUYERS[0] else None
    await enqueue(sessions, "qdelay", [(BUYERS[0], ALIASES[0])], created_at=time.time() - 60)

    async def three_attempts():
        return (await item(sessions, "qdelay"))["attempts"] >= 3
    await run_until(settings, sessions, three_attempts)
    notices = dsns(sink)
    assert len(notices) == 1
    msg = parse(notices[0].data)
    assert "Delayed" in msg["Subject"]
    assert "Action: delayed" in list(msg.iter_parts())[1].as_string()
    assert (await item(sessions, "qdelay"))["status"] == "queued"


@pytest.mark.parametrize("kind,envelope_from,origin", [
    ("notice", "", None),                                 # a bounce never bounces
    ("postmaster", "someone@outside.example", None),      # unverified sender: no backscatter
    ("forward", "", SELLER),                              # null envelope sender
])
async def test_no_bounce_without_a_verified_sender(tmp_path, sink, sessions, kind, envelope_from, origin):
    settings = settings_for(tmp_path, sink.port)
    sink.handler.rcpt_reply = lambda rcpt: "550 5.1.1 unknown"
    await enqueue(sessions, "qnobounce", [(BUYERS[0], ALIASES[0])], kind=kind, envelope_from=envelope_from,
                  origin=origin)

    async def failed():
        return (await item(sessions, "qnobounce"))["status"] == "done"
    await run_until(settings, sessions, failed)
    await asyncio.sleep(0.3)
    assert sink.messages == []
    assert [r["id"] for r in await list_items(sessions)] == []


async def test_poison_item_is_held_after_three_tries_while_others_flow(tmp_path, sink, sessions):
    settings = settings_for(tmp_path, sink.port)
    await enqueue(sessions, "qpoison", [])            # a broken row: no recipients at all
    for i in range(5):
        await enqueue(sessions, f"qgood{i}", [(BUYERS[0], ALIASES[0])])

    async def held():
        return (await item(sessions, "qpoison"))["status"] == "hold" and len(sink.messages) == 5
    await run_until(settings, sessions, held)
    row = await item(sessions, "qpoison")
    assert row["errors"] == 3 and "processing error" in row["last_error"]


async def test_two_workers_never_attempt_the_same_item(tmp_path, sink, sessions):
    settings = settings_for(tmp_path, sink.port)
    settings = dataclasses.replace(settings, delivery=dataclasses.replace(settings.delivery, workers=4))
    n = 300
    for i in range(n):
        await enqueue(sessions, f"qrace{i:03d}", [(BUYERS[i % 3], ALIASES[i % 3])])

    async def all_done():
        return len(sink.messages) >= n and not await list_items(sessions)
    await run_until(settings, sessions, all_done, workers=2, timeout=60)
    await asyncio.sleep(0.3)
    tags = [parse(m.data)["X-Test"] for m in sink.messages]
    assert len(tags) == n and len(set(tags)) == n
    rows = await list_items(sessions, include_done=True)
    assert all(r["attempts"] == 1 for r in rows)


async def test_outbound_mail_is_dkim_signed_and_verifies(tmp_path, sink, sessions):
    settings = settings_for(tmp_path, sink.port)
    for algorithm, selector in (("rsa", "r1"), ("ed25519", "e1")):
        path, txt = generate_key(tmp_path, selector, algorithm)
        signer = DkimSigner.load(path, "marketplace.example", selector)
        qid = f"qdkim{selector}"
        await enqueue(sessions, qid, [(BUYERS[0], ALIASES[0])])
        count = len(sink.messages)

        async def delivered(count=count):
            return len(sink.messages) == count + 1
        await run_until(settings, sessions, delivered, signer=signer)
        raw = sink.messages[-1].data
        assert raw.startswith(b"DKIM-Signature:")

        def dnsfunc(name, timeout=5, txt=txt, selector=selector):
            assert name.decode().rstrip(".") == f"{selector}._domainkey.marketplace.example"
            return txt.encode()
        assert dkim.verify(raw, dnsfunc=dnsfunc)
        assert not dkim.verify(raw.replace(b"body qdkim", b"body QDKIM"), dnsfunc=dnsfunc)


async def test_smarthost_starttls_required_and_auth(tmp_path, sessions):
    from aiosmtpd.controller import Controller
    from delivery_harness import SmarthostAuth
    from helpers import RecordingHandler, free_port
    from tlsutil import make_cert, server_context

    cert, key = make_cert(tmp_path)
    handler, auth = RecordingHandler(), SmarthostAuth()
    port = free_port()
    secure = Controller(handler, hostname="127.0.0.1", port=port, tls_context=server_context(cert, key),
                        require_starttls=True, authenticator=auth, auth_required=True)
    secure.start()
    plain = Sink()
    plain.controller.start()
    try:
        base = settings_for(tmp_path, port)
        settings = dataclasses.replace(base, delivery=dataclasses.replace(
            base.delivery, smarthost_tls="required", smarthost_user="relay", smarthost_password="s3cret"))
        await enqueue(sessions, "qtls", [(BUYERS[0], ALIASES[0])])

        async def delivered():
            return len(handler.messages) == 1
        await run_until(settings, sessions, delivered)
        assert auth.logins == ["relay"]
        # A smarthost that offers no STARTTLS while TLS is required: deferred, never sent in clear.
        no_tls = dataclasses.replace(settings, delivery=dataclasses.replace(
            settings.delivery, smarthost=f"127.0.0.1:{plain.port}", smarthost_user="", smarthost_password=""))
        await enqueue(sessions, "qclear", [(BUYERS[1], ALIASES[1])])

        async def attempted():
            return (await item(sessions, "qclear"))["attempts"] >= 1
        await run_until(no_tls, sessions, attempted)
        row = await item(sessions, "qclear")
        assert row["status"] == "queued" and "STARTTLS" in row["last_error"]
        assert plain.messages == []
    finally:
        secure.stop()
        plain.controller.stop()


async def test_a_pooled_connection_the_smarthost_dropped_is_replaced_without_a_deferral(tmp_path):
    """Connections used again within a moment skip the RSET check; if the server dropped one
    meanwhile, the message goes out on a new connection instead of waiting for a retry."""
    from bsm_relay.relay.delivery import SmarthostTarget
    body = b"From: a@marketplace.example\r\nSubject: pooled\r\n\r\nhello\r\n"
    with Sink() as first:
        target = SmarthostTarget(settings_for(tmp_path, first.port))
        result = await target.send("b@marketplace.example", ["r1@buyers.example"], body)
        assert result.delivered == ["r1@buyers.example"]
        first.wait_for(1)
    # The server went away (its connections with it) and is back on the same port.
    again = Sink()
    again.port = first.port
    again.controller = type(first.controller)(again.handler, hostname="127.0.0.1", port=first.port)
    with again:
        result = await target.send("b@marketplace.example", ["r2@buyers.example"], body)
        assert result.delivered == ["r2@buyers.example"] and not result.deferred
        assert [m.rcpt_tos for m in again.wait_for(1)] == [["r2@buyers.example"]]
    await target.close()


async def test_the_pool_keeps_a_connection_for_every_delivery_worker(tmp_path):
    """As many deliveries at once as there are workers, twice: the second wave goes out on the
    connections of the first (a pool smaller than the workers closed the extra ones after each
    wave and opened them again: a connection set up and torn down per message under load)."""
    from bsm_relay.relay.delivery import SmarthostTarget
    settings = settings_for(tmp_path, 0)
    with Sink() as sink:
        settings = dataclasses.replace(settings, delivery=dataclasses.replace(
            settings.delivery, smarthost=f"127.0.0.1:{sink.port}", workers=12))
        target = SmarthostTarget(settings)

        async def wave(tag: str) -> set:
            body = f"From: a@marketplace.example\r\nSubject: {tag}\r\n\r\nhello\r\n".encode()
            results = await asyncio.gather(*(target.send("b@marketplace.example", [f"{tag}{n}@buyers.example"], body)
                                             for n in range(12)))
            assert all(r.delivered for r in results)
            return {m.peer for m in sink.messages if m.rcpt_tos[0].startswith(tag)}

        first = await wave("first")
        assert len(first) == 12                    # twelve at once: twelve connections
        assert await wave("second") <= first       # ... kept, and used again
        await target.close()


async def test_leases_of_dead_processes_on_this_host_are_released_at_start(tmp_path, sessions):
    import os
    import subprocess
    from sqlalchemy import select, update

    from bsm_relay.relay.delivery import _pid_alive
    from bsm_relay.relay.models import QueueItem
    from bsm_relay.relay.queue import release_dead_leases
    dead = subprocess.Popen(["true"])
    dead.wait()                                    # a pid that no longer runs
    owners = {"qdead": f"hostA:{dead.pid}:aa", "qlive": f"hostA:{os.getpid()}:bb", "qother": f"hostB:{dead.pid}:cc"}
    for qid, owner in owners.items():
        await enqueue(sessions, qid, [(BUYERS[0], ALIASES[0])])
        async with sessions.begin() as s:
            await s.execute(update(QueueItem).where(QueueItem.id == qid)
                            .values(lease_owner=owner, lease_until=time.time() + 600))
    assert await release_dead_leases(sessions, "hostA", _pid_alive) == 1
    async with sessions() as s:
        left = {i.id: i.lease_owner for i in (await s.execute(select(QueueItem))).scalars()}
    assert left == {"qdead": None, "qlive": owners["qlive"], "qother": owners["qother"]}


async def test_a_spooled_item_is_claimed_only_by_the_node_that_holds_its_file(tmp_path, sessions):
    """PostgreSQL: another node's spool file is that node's to deliver.  SQLite has one node: a
    file under another host name is this relay's own, written before its host name changed (a
    container recreated), and must not wait forever."""
    from sqlalchemy import update

    from bsm_relay.relay import spool
    from bsm_relay.relay.models import QueueItem
    from bsm_relay.relay.queue import claim
    for qid, path in (("qlocal", spool.host_prefix() + "a.eml"), ("qremote", "spool/another-node/b.seg"),
                      ("qrow", None)):
        await enqueue(sessions, qid, [(BUYERS[0], ALIASES[0])])
        async with sessions.begin() as s:
            await s.execute(update(QueueItem).where(QueueItem.id == qid).values(spool_path=path))
    claimed = await claim(sessions, "node-a", 10, 60)
    mine = ["qlocal", "qrow"] if dbtest.on_postgres() else ["qlocal", "qremote", "qrow"]
    assert sorted(c.id for c in claimed) == mine


async def test_a_host_name_with_like_wildcards_claims_only_its_own_spool(tmp_path, sessions, monkeypatch):
    # The claim matches the spool prefix with LIKE: "_" and "%" in the host name are literal.
    # The due-items statement is checked on either database with the node's own prefix; the claim
    # itself uses it on PostgreSQL (SQLite has one node: every spool file is its own, above).
    from sqlalchemy import update

    from bsm_relay.relay import queue, spool
    from bsm_relay.relay.models import QueueItem
    from bsm_relay.relay.queue import claim
    monkeypatch.setattr(spool, "_HOST", "node_1%")
    for qid, path in (("qmine", "spool/node_1%/a.eml"), ("qwild", "spool/nodeX1yz/b.eml"),
                      ("qwild2", "spool/node_1%x/c.eml")):
        await enqueue(sessions, qid, [(BUYERS[0], ALIASES[0])])
        async with sessions.begin() as s:
            await s.execute(update(QueueItem).where(QueueItem.id == qid).values(spool_path=path))
    async with sessions() as s:
        due = [i for (i,) in await s.execute(queue._due(10), queue._due_params(time.time() + 1, False))]
    assert due == ["qmine"]
    claimed = await claim(sessions, "node-a", 10, 60)
    assert [c.id for c in claimed] == (["qmine"] if dbtest.on_postgres() else ["qmine", "qwild", "qwild2"])


def test_queue_ids_sort_by_acceptance_time_and_do_not_repeat():
    # Time-ordered ids put each message's rows at the right-hand edge of the queue-id indexes.
    from bsm_relay.relay.queue import new_queue_id
    earlier = [new_queue_id() for _ in range(2000)]
    time.sleep(0.002)
    later = new_queue_id()
    assert len(set(earlier)) == 2000
    assert all(len(q) == 20 and q[0] == "q" and int(q[1:], 16) >= 0 for q in earlier)
    assert max(earlier) < later                       # a later millisecond sorts after
    assert sorted(q[:12] for q in earlier) == [q[:12] for q in earlier]   # the time part never goes back


def test_minted_message_ids_sort_by_time_and_stay_unguessable():
    # The Message-ID map's primary key: minted ids go to its right-hand edge, not a random page.
    from bsm_relay.relay.queue import mint_message_id
    earlier = [mint_message_id("marketplace.example") for _ in range(2000)]
    time.sleep(0.002)
    later = mint_message_id("marketplace.example")
    local = [m.partition("@")[0] for m in earlier]
    assert len(set(earlier)) == 2000 and all(m.endswith("@marketplace.example") for m in earlier)
    assert all(len(x) == 35 and int(x, 16) >= 0 for x in local)       # 11 hex of time, 96 random bits
    assert max(earlier) < later
    assert sorted(x[:11] for x in local) == [x[:11] for x in local]
    assert len({x[11:] for x in local}) == 2000                          # the random part differs
