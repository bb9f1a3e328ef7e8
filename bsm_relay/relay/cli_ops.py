"""The operator's commands: ``trace``, ``stats`` and ``check``.

* ``trace ID`` (a queue id, a minted Message-ID or an SMTP session id) tells the story of
  one message from the message log and its events: the session, the decision and its
  reason, the rewrite (aliases, minted Message-ID, bounce address), the upstream delay,
  each delivery attempt, the DSN it caused or the bounce that came back.
* ``stats [--since 1h]``: accepted, refused by reason, delivered, deferred, bounced,
  queue depth and oldest age, and the distribution of upstream delays.
* ``check``: configuration, database, keys, and the alias domain's MX, SPF and DKIM
  records as the configured resolver sees them, one line each, with what to publish
  where something is missing; exit 0 only when all is well.

Real addresses are shown as the log shows them (keyed digests unless
``[logging] redact = false``); the history itself holds aliases only.
Registered from :func:`bsm_relay.relay.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select

from ..aliases import keys as keyring
from ..aliases.codec import Direction
from ..config import settings as config
from ..policy.reasons import REASONS
from . import db
from . import dns as dnsq
from .dkim import txt_record_name
from .metrics import queue_summary
from .models import MessageEvent, MessageLog, QueueItem, QueueRecipient
from .server import StartupError, load_signer, open_relay


def _fail(message: str) -> None:
    from .cli import CommandError  # cli imports this module: import at call time
    raise CommandError(message)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if args.json else text)


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else "-"


def human_duration(seconds: float) -> str:
    """40 minutes, 3 seconds, 2.5 hours, 1.2 days: what an operator says to a seller."""
    if seconds < 90:
        n = round(seconds)
        return f"{n} second{'s' if n != 1 else ''}"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} minutes"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def upstream_sentence(delay: float | None) -> str:
    if delay is None:
        return "unknown (no usable Date or Received timestamp)"
    if delay < 60:
        return f"{human_duration(delay)}: it reached us as soon as it was sent"
    return (f"{human_duration(delay)}: the sender's side (their mail client or provider) held it for "
            f"{human_duration(delay)} before it reached us")


# -- trace ------------------------------------------------------------------------------

async def gather_trace(relay: Any, ident: str) -> dict[str, Any]:
    """Everything known about the message(s) ``ident`` names (queue id, Message-ID, session)."""
    key = ident.strip().strip("<>")
    async with relay.sessions() as s:
        logs = list((await s.execute(select(MessageLog).where(or_(
            MessageLog.queue_id == key, MessageLog.message_id == key, MessageLog.session_id == key))
            .order_by(MessageLog.at, MessageLog.id))).scalars())
        matched = ("queue_id" if any(r.queue_id == key for r in logs) else
                   "message_id" if any(r.message_id == key for r in logs) else "session" if logs else None)
        qids = [r.queue_id for r in logs if r.queue_id]
        if not logs and await s.get(QueueItem, key) is not None:   # a notice (DSN) has no log row
            qids, matched = [key], "queue_id"
        messages = [await _message(relay, s, row, row.queue_id) for row in logs]
        if not logs and qids:
            messages = [await _message(relay, s, None, key)]
    if matched is None:
        _fail(f"nothing known by {ident!r} (a queue id, a Message-ID or a session id)")
    sessions = sorted({m["session"] for m in messages if m.get("session")})
    return {"query": ident, "matched_by": matched, "sessions": sessions, "messages": messages}


async def _message(relay: Any, s: Any, row: MessageLog | None, qid: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"queue_id": qid}
    if row is not None:
        reason = REASONS.get(row.reason or "")
        out.update(session=row.session_id, at=row.at, decision=row.decision, reason=row.reason,
                   reply=f"{reason.code} {reason.status}" if reason else None, size=row.size,
                   order=row.order_ext_id, contact_reason=row.contact_reason, upstream_delay=row.upstream_delay)
        if row.seller_id is not None and row.buyer_id is not None:
            seller = await relay.store.seller(id=row.seller_id)
            buyer = await relay.store.buyer(id=row.buyer_id)
            out.update(seller=seller.ext_id if seller else row.seller_id,
                       buyer=buyer.ext_id if buyer else row.buyer_id,
                       direction="to buyer" if row.direction == int(Direction.TO_BUYER) else "to seller")
    if qid is None:
        return out
    item = (await s.execute(select(QueueItem.kind, QueueItem.status, QueueItem.attempts, QueueItem.envelope_from,
                                   QueueItem.created_at, QueueItem.session_id)
                            .where(QueueItem.id == qid))).first()
    rcpts = (await s.execute(select(QueueRecipient.address, QueueRecipient.alias, QueueRecipient.status)
                             .where(QueueRecipient.queue_id == qid).order_by(QueueRecipient.id))).all()
    if item is not None:
        out.update(kind=item.kind, status=item.status, attempts=item.attempts)
        out.setdefault("session", item.session_id)
        out.setdefault("at", item.created_at)
        # A notice's recipient is the original sender: its "alias" is that real address.
        rewrite: dict[str, Any] = {"envelope_from": relay.redactor.text(item.envelope_from) or "<>",
                                   "recipients": [{"alias": r.alias if r.alias != r.address else "(the sender)",
                                                   "delivered_to": relay.redactor.address(r.address),
                                                   "status": r.status} for r in rcpts]}
        if row is not None and row.message_id:
            rewrite["message_id"] = f"<{row.message_id}>"
        if row is not None and row.seller_id is not None and row.buyer_id is not None and row.direction is not None:
            writer = Direction.TO_SELLER if row.direction == int(Direction.TO_BUYER) else Direction.TO_BUYER
            rewrite["from_alias"] = relay.alias(writer, row.seller_id, row.buyer_id)
        out["rewrite"] = rewrite
    out["history"] = await _history(s, qid)
    notices = [h["notice"] for h in out["history"] if h.get("notice")]
    out["notices"] = [await _message(relay, s, None, n) for n in dict.fromkeys(notices)]
    return out


async def _history(s: Any, qid: str) -> list[dict[str, Any]]:
    rows = (await s.execute(select(MessageEvent).where(MessageEvent.queue_id == qid)
                            .order_by(MessageEvent.at, MessageEvent.id))).scalars()
    return [{"at": r.at, "event": r.event, **(json.loads(r.detail) if r.detail else {})} for r in rows]


def render_trace(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for m in data["messages"]:
        lines.extend(_render_message(m, ""))
    return "\n".join(lines)


def _render_message(m: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    who = f"queue id {m['queue_id']}" if m.get("queue_id") else "no queue id"
    kind = f" ({m['kind']})" if m.get("kind") and m.get("kind") != "forward" else ""
    lines.append(f"{indent}message {who}{kind}, session {m.get('session') or '-'}")
    pad = indent + "  "
    if m.get("decision"):
        pair = ""
        if m.get("seller") is not None:
            pair = (f", seller {m['seller']} -> buyer {m['buyer']}" if m.get("direction") == "to buyer"
                    else f", buyer {m['buyer']} -> seller {m['seller']}")
        order = f", order {m['order']}" if m.get("order") else ""
        if m["decision"] == "refused":
            lines.append(f"{pad}{_iso(m['at'])}  refused: {m['reason']} ({m.get('reply') or '?'}){pair}{order}")
        else:
            lines.append(f"{pad}{_iso(m['at'])}  accepted, {m.get('size', 0)} bytes{pair}{order}")
            lines.append(f"{pad}upstream delay: {upstream_sentence(m.get('upstream_delay'))}")
    elif m.get("at"):
        lines.append(f"{pad}{_iso(m['at'])}  queued")
    rw = m.get("rewrite")
    if rw and m.get("decision") != "refused":
        for r in rw["recipients"]:
            lines.append(f"{pad}rewrite: to {r['alias']} -> {r['delivered_to']} ({r['status']})")
        if rw.get("from_alias"):
            lines.append(f"{pad}rewrite: From and Reply-To {rw['from_alias']}")
        if rw.get("message_id"):
            lines.append(f"{pad}rewrite: Message-ID {rw['message_id']}")
        lines.append(f"{pad}envelope sender {rw['envelope_from']}")
    for h in m.get("history", []):
        lines.append(f"{pad}{_iso(h['at'])}  {_render_event(h)}")
    if m.get("status"):
        attempts = m.get("attempts", 0)
        lines.append(f"{pad}status: {m['status']}, {attempts} attempt{'s' if attempts != 1 else ''}")
    for n in m.get("notices", []):
        lines.extend(_render_message(n, pad))
    return lines


def _render_event(h: dict[str, Any]) -> str:
    event = h["event"]
    if event == "delivery.attempt":
        parts = []
        for r in h.get("recipients", []):
            text = f"{r['outcome']} {r['alias']}"
            if r.get("reply"):
                text += f": {r['reply']}"
            parts.append(text)
        tail = ""
        if h.get("next_attempt_at"):
            tail = f" (next attempt {_iso(h['next_attempt_at'])})"
        elif any(r["outcome"] == "delivered" for r in h.get("recipients", [])) and h.get("latency") is not None:
            tail = f" ({human_duration(h['latency'])} after acceptance)"
        return f"attempt {h.get('attempt')}: {'; '.join(parts)}{tail}"
    if event == "dsn.queued":
        return f"DSN ({h.get('action')}) queued to the sender as {h.get('notice')}"
    if event == "bounce.received":
        return f"bounce received from downstream ({h.get('error')}); DSN queued as {h.get('notice')}"
    if event == "delivery.error":
        return f"processing error ({h.get('error')}), {h.get('errors')} so far, now {h.get('status')}"
    return f"{event} {json.dumps({k: v for k, v in h.items() if k not in ('at', 'event')}, sort_keys=True)}"


async def cmd_trace(s: config.Settings, args: argparse.Namespace) -> None:
    relay = await open_relay(s)
    try:
        data = await gather_trace(relay, args.id)
    finally:
        await relay.engine.dispose()
    _print(args, data, render_trace(data))


# -- stats ------------------------------------------------------------------------------

_SINCE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> float:
    m = _SINCE.fullmatch(text)
    if m is None:
        _fail(f"--since {text!r}: a number and a unit, s m h or d (e.g. 90m, 1h, 7d)")
        raise AssertionError  # unreachable
    return float(m.group(1)) * _UNIT[m.group(2).lower()]


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (not empty)."""
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


async def gather_stats(relay: Any, window: float, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    since = now - window
    async with relay.sessions() as s:
        decisions = (await s.execute(select(MessageLog.decision, MessageLog.reason, MessageLog.upstream_delay)
                                     .where(MessageLog.at >= since))).all()
        events = (await s.execute(select(MessageEvent.event, MessageEvent.detail)
                                  .where(MessageEvent.at >= since))).all()
    refused = Counter(r.reason or "unknown" for r in decisions if r.decision == "refused")
    delays = sorted(r.upstream_delay for r in decisions if r.decision == "accepted" and r.upstream_delay is not None)
    outcomes: Counter[str] = Counter()
    delivered_by_kind: Counter[str] = Counter()
    inbound_bounces = dsns = 0
    for event, detail in events:
        fields = json.loads(detail) if detail else {}
        if event == "delivery.attempt":
            for r in fields.get("recipients", []):
                outcomes[r["outcome"]] += 1
                if r["outcome"] == "delivered":
                    delivered_by_kind[fields.get("kind", "forward")] += 1
        elif event == "bounce.received":
            inbound_bounces += 1
        elif event == "dsn.queued":
            dsns += 1
    queue = await queue_summary(relay.sessions, now)
    return {
        "since": since, "window_seconds": window,
        "accepted": sum(1 for r in decisions if r.decision == "accepted"),
        "refused": sum(refused.values()), "refused_by_reason": dict(sorted(refused.items())),
        "delivered": outcomes["delivered"], "delivered_by_kind": dict(sorted(delivered_by_kind.items())),
        "deferred": outcomes["deferred"],
        # Failed at delivery (5xx, expiry) plus reports that came back later from downstream.
        "bounced": outcomes["failed"] + inbound_bounces, "failed": outcomes["failed"],
        "bounces_received": inbound_bounces, "dsns_queued": dsns,
        "queue": {"depth": queue.depth, "by_status": queue.by_status, "oldest_age": queue.oldest_age},
        "upstream_delay": {"count": len(delays),
                           "p50": percentile(delays, 50) if delays else None,
                           "p90": percentile(delays, 90) if delays else None,
                           "max": delays[-1] if delays else None},
    }


def render_stats(d: dict[str, Any], since_text: str) -> str:
    lines = [f"since {_iso(d['since'])} (last {since_text})",
             f"accepted   {d['accepted']}",
             f"refused    {d['refused']}" + (" (after DATA; refusals at RCPT are in the log and metrics)"
                                             if d["refused"] else "")]
    lines += [f"  {reason:28} {n}" for reason, n in d["refused_by_reason"].items()]
    by_kind = ", ".join(f"{k} {n}" for k, n in d["delivered_by_kind"].items())
    lines += [f"delivered  {d['delivered']}" + (f" ({by_kind})" if by_kind else ""),
              f"deferred   {d['deferred']}",
              f"bounced    {d['bounced']} ({d['failed']} failed at delivery, {d['bounces_received']} "
              f"bounced back later; {d['dsns_queued']} DSNs to senders)"]
    q = d["queue"]
    oldest = f", oldest {human_duration(q['oldest_age'])}" if q["oldest_age"] is not None else ""
    held = f", {q['by_status'].get('hold', 0)} on hold" if q["by_status"].get("hold") else ""
    lines.append(f"queue      {q['depth']} waiting{held}{oldest}")
    u = d["upstream_delay"]
    if u["count"]:
        lines.append(f"upstream delay over {u['count']} messages: p50 {human_duration(u['p50'])}, "
                     f"p90 {human_duration(u['p90'])}, max {human_duration(u['max'])}")
    else:
        lines.append("upstream delay: no messages with a usable Date or Received")
    return "\n".join(lines)


async def cmd_stats(s: config.Settings, args: argparse.Namespace) -> None:
    window = parse_since(args.since)
    relay = await open_relay(s)
    try:
        data = await gather_stats(relay, window)
    finally:
        await relay.engine.dispose()
    _print(args, data, render_stats(data, args.since))


# -- check ------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    publish: str | None = None      # the DNS record to publish, when one is missing or wrong

    @property
    def label(self) -> str:
        return "ok" if self.ok else ("MISSING" if self.publish else "FAIL")


async def run_checks(s: config.Settings) -> list[Check]:
    checks = [Check("config", True, f"{s.source} loads")]
    state = Path(s.state_dir)
    try:
        ring = keyring.load(state)
        checks.append(Check("alias keys", True, f"{len(ring.alias_keys)} key(s), current id {ring.current}"))
    except keyring.KeyError_ as exc:
        checks.append(Check("alias keys", False, f"{exc}; run 'bsm-relay init'"))
    signer = None
    try:
        signer = load_signer(s)
        checks.append(Check("dkim key", True, f"selector {s.dkim.selector}, {signer.algorithm}"))
    except StartupError as exc:
        checks.append(Check("dkim key", False, str(exc)))
    checks.append(await _check_database(s))
    checks += await _check_dns(s, signer.txt_record() if signer else None)
    return checks


async def _check_database(s: config.Settings) -> Check:
    try:
        engine = db.make_engine(s.database_url)
    except Exception as exc:  # a URL the driver refuses
        return Check("database", False, f"cannot use the database URL: {type(exc).__name__}: {exc}")
    try:
        current = await db.schema_is_current(engine)
    except Exception as exc:  # unreachable server, unreadable file, ...
        return Check("database", False, f"cannot open the database: {type(exc).__name__}")
    finally:
        await engine.dispose()
    if not current:
        return Check("database", False, "the schema is not current (migrations pending); run 'bsm-relay init'")
    return Check("database", True, "reachable, migrations current")


def _tags(record: str) -> dict[str, str]:
    tags = {}
    for part in record.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            tags[k.strip().lower()] = "".join(v.split())
    return tags


async def _check_dns(s: config.Settings, dkim_txt: str | None) -> list[Check]:
    domain = s.aliases.domain.rstrip(".")
    resolver = dnsq.make_resolver(s.dns.nameservers, s.dns.timeout)
    via = ", ".join(s.dns.nameservers) or "the system resolver"
    out: list[Check] = []
    try:
        mx = await dnsq.mx(resolver, domain)
        hosts = sorted(mx)
        if not hosts:
            out.append(Check("dns mx", False, f"{domain} has no MX record (asked {via})",
                             f"{domain}. MX 10 {s.smtp.hostname}."))
        elif any(host == "." for _, host in hosts):
            out.append(Check("dns mx", False, f"{domain} publishes a null MX: it accepts no mail, so no reply "
                                              "or bounce can reach the relay", f"{domain}. MX 10 {s.smtp.hostname}."))
        else:
            out.append(Check("dns mx", True, f"{domain} MX " + ", ".join(f"{p} {h}" for p, h in hosts)))
    except dnsq.DnsTempError as exc:
        out.append(Check("dns mx", False, f"could not check: {exc} (asked {via})"))
    spf_hint = f'{domain}. TXT "v=spf1 mx a:{s.smtp.hostname} -all"'
    if s.delivery.mode == "smarthost":
        spf_hint += " (add the smarthost's sending hosts, e.g. include:...)"
    try:
        spf = [t for t in await dnsq.txt(resolver, domain) if t.lower().startswith("v=spf1")]
        if not spf:
            out.append(Check("dns spf", False, f"{domain} has no SPF record; the relay's bounce addresses are "
                                               "in this domain", spf_hint))
        elif len(spf) > 1:
            out.append(Check("dns spf", False, f"{domain} has {len(spf)} SPF records; receivers treat that as a "
                                               "permanent error: merge them into one", spf_hint))
        else:
            out.append(Check("dns spf", True, f"{domain} TXT \"{spf[0]}\""))
    except dnsq.DnsTempError as exc:
        out.append(Check("dns spf", False, f"could not check: {exc} (asked {via})"))
    name = txt_record_name(s.dkim.selector, domain)
    if dkim_txt is None:
        out.append(Check("dns dkim", False, f"not checked: no usable DKIM key for selector {s.dkim.selector}"))
        return out
    publish = f'{name}. TXT "{dkim_txt}"'
    try:
        records = [t for t in await dnsq.txt(resolver, name) if "p=" in t]
        ours = _tags(dkim_txt).get("p")
        if not records:
            out.append(Check("dns dkim", False, f"no DKIM key published at {name}", publish))
        elif any(_tags(t).get("p") == ours for t in records):
            out.append(Check("dns dkim", True, f"{name} publishes the key the relay signs with"))
        else:
            out.append(Check("dns dkim", False, f"{name} publishes a different key than the relay signs with "
                                                "(a key rotated without publishing?)", publish))
    except dnsq.DnsTempError as exc:
        out.append(Check("dns dkim", False, f"could not check: {exc} (asked {via})"))
    return out


def render_checks(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{c.label:8} {c.name:11} {c.detail}")
        if c.publish:
            lines.append(f"{'':8} {'':11} publish: {c.publish}")
    return "\n".join(lines)


async def cmd_check(s: config.Settings, args: argparse.Namespace) -> None:
    checks = await run_checks(s)
    bad = [c for c in checks if not c.ok]
    _print(args, {"ok": not bad, "checks": [asdict(c) | {"status": c.label} for c in checks]}, render_checks(checks))
    if bad:
        _fail(f"{len(bad)} of {len(checks)} checks failed: {', '.join(c.name for c in bad)}")


# -- registration -----------------------------------------------------------------------

def register(sub: Any, cmd: Any) -> None:
    """Add the commands to ``bsm-relay``'s subparsers, with cli's ``cmd`` helper."""
    sp = cmd(sub, "trace", cmd_trace, "the whole story of one message: session, decision, rewrite, "
             "upstream delay, each delivery attempt, bounce")
    sp.add_argument("id", metavar="ID", help="a queue id, the Message-ID the relay minted, or an SMTP session id")
    sp = cmd(sub, "stats", cmd_stats, "accepted, refused by reason, delivered, deferred, bounced, queue depth "
             "and age, upstream delay distribution")
    sp.add_argument("--since", default="24h", help="time window: a number and s, m, h or d (default: 24h)")
    cmd(sub, "check", cmd_check, "check the configuration, database, keys and the alias domain's MX, SPF and "
        "DKIM records; exit 0 only if all is well")
