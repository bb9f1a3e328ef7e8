"""Intake: from an accepted DATA to committed queue rows, or a refusal.

The thin middle of the pipeline.  It parses only the header block, gathers the
facts policy needs (sender status, the pair), asks ``policy`` for a decision,
has ``rewrite`` build the outgoing header block, and hands the rows to the queue's
group commit.  The body is never parsed here: ``marketplace.check`` (the policy
stage) alone reads it, and hands back the message to forward, masked if it must be.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import mktime_tz, parsedate_tz

from ..aliases.codec import AliasRef, Direction
from ..policy import senders
from ..policy.decision import ACCEPT, Decision, refuse
from ..policy.facts import Order as PolicyOrder
from . import auth, bounce_in, marketplace, spool
from .context import Relay
from .headers import (
    AmbiguousFrom,
    Header,
    MalformedHeader,
    MissingFrom,
    get_all,
    parse_from,
    parse_headers,
    parse_msg_ids,
    received_count,
    split_offsets,
)
from .models import MessageLog, QueueItem, QueueRecipient, ThreadId
from .queue import Accepted, mint_message_id, new_queue_id, row
from .rewrite import RewritePlan, date_text, format_received, render, render_head
from .scan import crlf_only
from .store import BuyerRow, SellerRow

MAX_HOPS = 50

# Our loop marker (catalogue L2): every forwarded message carries it, and a message that arrives
# with it is refused.  The value is a keyed digest of our host name: it says nothing, cannot be
# forged by a sender to get a stranger's mail refused, and differs per installation.
LOOP_HEADER = "X-BSM-Relay-Loop"


def _is_delivery_report(headers: list) -> bool:  # type: ignore[type-arg]
    """A DSN (RFC 3464: multipart/report; report-type=delivery-status) at the top level."""
    ctype = _first(headers, "Content-Type").lower()
    return ctype.strip().startswith("multipart/report") and "delivery-status" in ctype


@dataclass(frozen=True)
class Recipient:
    """A recipient accepted at RCPT: an alias with its pair, or the postmaster."""

    address: str                      # as routed (lower case)
    ref: AliasRef | None = None
    seller: SellerRow | None = None
    buyer: BuyerRow | None = None
    bounce_of: str | None = None      # a signed bounce address: the queue item it returns


@dataclass
class Outcome:
    decision: Decision
    queue_ids: list[str] = field(default_factory=list)
    log: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ThreadRefs:
    """The ids the writer's client put in In-Reply-To and References (originals or ours)."""

    in_reply_to: list[str]
    references: list[str]


@dataclass(frozen=True)
class Transaction:
    session_id: str
    mail_from: str
    recipients: list[Recipient]
    content: bytes
    client_ip: str = ""               # what SPF judges: the TCP peer, or the source a trusted proxy gave
    helo: str = ""
    # Set by the send / review-request commands: the contact reason and the order are known
    # without reading the message, and the seller was authenticated by the marketplace (local).
    contact_reason: str | None = None
    order_hint: PolicyOrder | None = None
    local: bool = False


async def process(relay: Relay, tx: Transaction) -> Outcome:
    """Decide on one message; on acceptance, return only after the rows are committed."""
    relay.in_intake += 1
    try:
        return await _process(relay, tx)
    finally:
        relay.in_intake -= 1


async def _process(relay: Relay, tx: Transaction) -> Outcome:
    if not crlf_only(tx.content):
        return Outcome(refuse("msg.bad_line_ending"))
    block_end, body_start = split_offsets(tx.content)     # offsets: a large body is not copied
    try:
        headers = parse_headers(tx.content[:block_end])
    except MalformedHeader:
        return Outcome(refuse("msg.malformed"))
    if received_count(headers) > MAX_HOPS:
        return Outcome(refuse("msg.loop"))
    marker = relay.loop_marker
    if any(hmac.compare_digest(h.value.strip().encode(), marker.encode()) for h in get_all(headers, LOOP_HEADER)):
        # We forwarded this message ourselves and it came back (an alias whose real address is
        # one of our aliases): refused once, and our refusal is not forwarded again (catalogue L2).
        return Outcome(refuse("msg.own_loop"))
    now = time.time()
    aliased = [r for r in tx.recipients if r.ref is not None]
    postmaster = [r for r in tx.recipients if r.ref is None and r.bounce_of is None]
    bounces = [r for r in tx.recipients if r.bounce_of is not None]
    acc = Accepted(items=[], recipients=[], extra=[])
    verdicts: list[marketplace.PolicyOutcome] = []
    queue_ids: list[str] = []
    first_log: dict[str, object] = {}
    if aliased and _is_delivery_report(headers):
        # A delivery report sent to an alias rather than to one of our bounce addresses answers
        # mail we never sent (forged or backscatter): accepted with 250 so nobody retries or
        # bounces it, and dropped, never forwarded (catalogue B4, docs/decisions/0008).
        first_log = {"bounce": "stray", "alias": aliased[0].address, **_ids(aliased[0])}
        aliased = []

    if aliased:
        try:
            sender = parse_from(headers)
        except MissingFrom:
            return Outcome(refuse("from.missing"))
        except AmbiguousFrom:
            return Outcome(refuse("from.ambiguous"))
        # Approval decides first, authenticity second: the approval's sentence (approve or unblock
        # this address) is the one the sender can act on, and an unknown address is still recorded
        # as pending for the seller to review.  Only a message every recipient's seller approved is
        # then checked for authenticity (SPF, DKIM: DNS and CPU a refusal does not need) and refused
        # as auth.failed when it is not authentic.
        for rcpt in aliased:
            decision, pending, new = await _approve(relay, rcpt, sender.address)
            if not decision.accepted:
                await _log_refusal(relay, tx, rcpt, decision, pending=pending, durable=new)
                return Outcome(decision, log={"alias": rcpt.address, **_ids(rcpt)})
        authentic, auth_results = await _authenticate(relay, tx, sender.address)
        if not authentic.accepted:
            await _log_refusal(relay, tx, aliased[0], authentic)
            return Outcome(authentic, log={"alias": aliased[0].address, **_ids(aliased[0])})
        original_ids = parse_msg_ids(_first(headers, "Message-ID"))
        thread_ids = ThreadRefs(parse_msg_ids(_first(headers, "In-Reply-To")),
                                parse_msg_ids(_first(headers, "References")))
        for rcpt in aliased:
            verdict = await marketplace.check(relay, tx, rcpt, headers, tx.content, sender.address, thread_ids,
                                              tx.contact_reason, tx.order_hint, body_start=body_start)
            if not verdict.decision.accepted:
                await _log_refusal(relay, tx, rcpt, verdict.decision, **verdict.log_fields)
                return Outcome(verdict.decision, log={"alias": rcpt.address, **_ids(rcpt), **verdict.log_fields})
            verdicts.append(verdict)
    # Past every refusal (a refusal does not need it): the delay the sender side added.
    upstream = upstream_delay(headers, now)
    if aliased:
        for rcpt, verdict in zip(aliased, verdicts, strict=True):
            # Headers parsed once: what intake read, unless the policy rewrote the message.
            parsed = headers if verdict.content is tx.content else None
            qid, rows = await _forward(relay, tx, rcpt, sender.address, verdict.content, parsed, now,
                                       original_ids[0] if original_ids else None, thread_ids,
                                       auth_results=auth_results, upstream_delay=upstream, **verdict.log_fields)
            queue_ids.append(qid)
            acc.items.append(rows[0])
            acc.recipients.append(rows[1])
            acc.extra.extend(rows[2:])
            first_log = first_log or {"alias": rcpt.address, **_ids(rcpt), "upstream_delay": upstream}
    if postmaster:
        qid = new_queue_id()
        received = format_received(relay.settings.smtp.hostname, qid, datetime.now(UTC))
        item = row(QueueItem, id=qid, kind="postmaster", envelope_from=tx.mail_from, origin_sender=None,
                   body=f"Received: {received}\r\n".encode() + tx.content, size=len(tx.content),
                   created_at=now, next_attempt_at=now, attempts=0, status="queued", session_id=tx.session_id)
        acc.items.append(item)
        acc.recipients.append(row(QueueRecipient, queue_id=qid, address=relay.settings.smtp.postmaster,
                                  alias=postmaster[0].address, status="pending"))
        acc.extra.append(row(MessageLog, at=now, session_id=tx.session_id, queue_id=qid, decision="accepted",
                             reason=None, size=len(tx.content), upstream_delay=upstream))
        first_log = first_log or {"upstream_delay": upstream}
        queue_ids.append(qid)
    for rcpt in bounces:
        assert rcpt.bounce_of is not None
        outcome = await bounce_in.handle(relay, rcpt.bounce_of, tx.mail_from, tx.content)
        first_log = first_log or {"bounce_of": rcpt.bounce_of, "bounce": outcome}
    if acc.items:
        if relay.hand_off is not None:
            # Delivered from memory once committed, if a worker is free (a small message only
            # when it is the only one being taken in: docs/decisions/0022).
            relay.hand_off(acc, relay.in_intake == 1)
        acc.alone = relay.in_intake == 1
        try:
            await relay.enqueuer.commit(acc)
        except BaseException:
            for item in acc.items:                 # not queued: its spool file is nobody's
                spool.remove(relay.settings.state_dir, item.values.get("spool_path"))
            raise
        for rcpt, verdict in zip(aliased, verdicts, strict=True):
            if verdict.proactive and rcpt.ref is not None:
                relay.store.note_proactive(rcpt.ref.seller_id, now)
    return Outcome(ACCEPT, queue_ids, first_log)


# A sender-side timestamp this far in our future is a wrong clock, not a delay: it is ignored.
_CLOCK_SKEW = 300.0


def upstream_delay(headers: list, now: float) -> float | None:  # type: ignore[type-arg]
    """Seconds between the sender side's first timestamp and our acceptance at ``now``.

    The earlier of the Date header (the writer's client) and the bottom-most Received
    (the first hop of the sender's provider; Received lines are prepended, so it is the
    oldest).  Sellers blame the relay for slowness their own provider caused: this is the
    figure that tells.  None when neither parses, or the result lies in the future.
    """
    received = get_all(headers, "Received")
    stamps = [_stamp(_first(headers, "Date"))]
    if received:
        stamps.append(_stamp(received[-1].value.rpartition(";")[2]))
    found = [t for t in stamps if t is not None and t <= now + _CLOCK_SKEW]
    return round(max(0.0, now - min(found)), 3) if found else None


def _stamp(text: str) -> float | None:
    if not text.strip():
        return None
    try:
        parsed = parsedate_tz(text)
        return float(mktime_tz(parsed)) if parsed else None
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _first(headers: list, name: str) -> str:  # type: ignore[type-arg]
    found = get_all(headers, name)
    return found[0].value if found else ""


def _ids(rcpt: Recipient) -> dict[str, object]:
    if rcpt.ref is None:
        return {}
    return {"seller_id": rcpt.ref.seller_id, "buyer_id": rcpt.ref.buyer_id,
            "direction": rcpt.ref.direction.name.lower()}


async def _approve(relay: Relay, rcpt: Recipient,
                   address: str) -> tuple[Decision, tuple[int, str] | None, bool]:
    """The approval decision, the (seller, address) to record as pending when refused, and
    whether that address is new (not recorded yet)."""
    assert rcpt.ref is not None and rcpt.seller is not None and rcpt.buyer is not None
    if rcpt.ref.direction is Direction.TO_BUYER:
        status = await relay.store.sender_status(rcpt.seller, address)
        decision = senders.seller_sender(address, status)
        if not decision.accepted and senders.records_as_pending(status):
            return decision, (rcpt.seller.id, address), status is senders.SenderStatus.UNKNOWN
        return decision, None, False
    return senders.buyer_sender(address, rcpt.buyer.email), None, False


async def _authenticate(relay: Relay, tx: Transaction, address: str) -> tuple[Decision, str | None]:
    """Is the From authentic (SPF or DKIM passing, aligned with its domain)?

    The decision, and the ``Authentication-Results`` value for the forwarded message
    (None when ``[auth] sender_authentication = "none"``, or for a message the relay's own
    commands composed (``tx.local``, no SMTP client to check): nothing was checked).
    """
    if relay.settings.auth.sender_authentication == "none" or tx.local:
        return ACCEPT, None
    domain = address.rpartition("@")[2].rstrip(".").lower()
    result = await auth.check_sender(resolver=relay.resolver, client_ip=tx.client_ip, helo=tx.helo,
                                     mail_from=tx.mail_from, from_domain=domain, message=tx.content,
                                     spf_outcomes=relay.spf_outcomes)
    if result.reason == "auth.failed":
        decision = refuse("auth.failed", address=address, domain=domain)
    else:
        decision = refuse(result.reason) if result.reason else ACCEPT
    # The reader must not learn the writer's domain either (it is half of a real address), so the
    # header records what was checked and the results, without the domains they were checked for.
    anonymous = dataclasses.replace(result, spf_domain="", from_domain="",
                                    dkim=tuple(("", outcome) for _, outcome in result.dkim))
    return decision, anonymous.authentication_results(relay.settings.smtp.hostname)


async def _log_refusal(relay: Relay, tx: Transaction, rcpt: Recipient, decision: Decision,
                       order_ext_id: str | None = None, contact_reason: str | None = None,
                       proactive: bool = False, pending: tuple[int, str] | None = None,
                       durable: bool = False) -> None:
    """The refusal in the message log and, for an unknown or pending sender, its attempt in
    Messaging Permissions: entries of the writer's next group.  The refusal waits for that commit
    only when ``durable``: a new address's pending record is what its seller approves it from, so
    a storage failure then answers 451 (try again) instead of the refusal (catalogue D3).  The
    rest (the log row, one more try of a pending address) is not waited for (``Enqueuer.record``)."""
    assert rcpt.ref is not None
    entry = row(MessageLog, at=time.time(), session_id=tx.session_id, queue_id=None,
                direction=int(rcpt.ref.direction), seller_id=rcpt.ref.seller_id, buyer_id=rcpt.ref.buyer_id,
                decision="refused", reason=decision.reason, size=len(tx.content), order_ext_id=order_ext_id,
                contact_reason=contact_reason, proactive=proactive)
    after = [] if pending is None else [relay.store.attempt_recorder(*pending)]
    rows = Accepted(items=[], recipients=[], extra=[entry], after=after)
    await (relay.enqueuer.commit(rows) if durable else relay.enqueuer.record(rows))


async def _forward(relay: Relay, tx: Transaction, rcpt: Recipient, sender: str, content: bytes,
                   headers: list[Header] | None, now: float, original_id: str | None, thread_ids: ThreadRefs, *,
                   auth_results: str | None = None, order_ext_id: str | None = None,
                   contact_reason: str | None = None, proactive: bool = False,
                   upstream_delay: float | None = None) -> tuple[str, list[object]]:
    assert rcpt.ref is not None and rcpt.seller is not None and rcpt.buyer is not None
    settings = relay.settings
    ref = rcpt.ref
    qid = new_queue_id()
    # The writer's side is the opposite direction's alias: what the reader replies to.
    reply_alias = relay.alias(Direction.TO_SELLER if ref.direction is Direction.TO_BUYER else Direction.TO_BUYER,
                              ref.seller_id, ref.buyer_id)
    if ref.direction is Direction.TO_BUYER:
        display, to_address = rcpt.seller.name, rcpt.buyer.email
    else:
        display, to_address = rcpt.buyer.name or "Buyer", rcpt.seller.email
    minted = mint_message_id(settings.aliases.domain)
    mapping = await relay.store.map_thread_ids(ref.seller_id, ref.buyer_id,
                                               thread_ids.in_reply_to + thread_ids.references)
    in_reply_to = [mapping[i] for i in thread_ids.in_reply_to[:1] if i in mapping]
    references = [mapping[i] for i in thread_ids.references if i in mapping]
    for parent in in_reply_to:  # RFC 5322 3.6.4: the parent's id ends References
        if parent not in references:
            references.append(parent)
    when = datetime.fromtimestamp(now, UTC)
    plan = RewritePlan(
        from_display=f"{display} via {settings.aliases.marketplace_name}",
        from_alias=reply_alias, to_address=to_address, reply_to=reply_alias,
        message_id=minted, in_reply_to=in_reply_to, references=list(dict.fromkeys(references)),
        received=format_received(settings.smtp.hostname, qid, when),
        extra=([("Authentication-Results", auth_results)] if auth_results else [])
        + [(LOOP_HEADER, relay.loop_marker)],
        date_if_missing=date_text(when))
    spool_path = None
    q = settings.queue
    if len(content) > q.spool_threshold and spool.enabled(q.spool_threshold):
        # A large message goes to a spool file, written from the bytes received (no rendered copy
        # in memory); the row keeps the new header block, for trace and DSNs.
        body, offset = render_head(content, plan)
        spool_path = await asyncio.to_thread(spool.write, settings.state_dir, qid, body, memoryview(content)[offset:])
        size = len(body) + len(content) - offset
    else:
        body = render(content, plan, headers)
        size = len(body)
    item = row(QueueItem, id=qid, kind="forward", envelope_from=relay.bounce_address(qid),
               origin_sender=sender, body=body, size=size, created_at=now, next_attempt_at=now,
               attempts=0, status="queued", session_id=tx.session_id, spool_path=spool_path)
    recipient = row(QueueRecipient, queue_id=qid, address=to_address, alias=rcpt.address, status="pending")
    thread = row(ThreadId, minted=minted, original=original_id or minted, seller_id=ref.seller_id,
                 buyer_id=ref.buyer_id, direction=int(ref.direction), created_at=now)
    log = row(MessageLog, at=now, session_id=tx.session_id, queue_id=qid, direction=int(ref.direction),
              seller_id=ref.seller_id, buyer_id=ref.buyer_id, decision="accepted", reason=None,
              size=len(content), message_id=minted, order_ext_id=order_ext_id,
              contact_reason=contact_reason, proactive=proactive, upstream_delay=upstream_delay)
    return qid, [item, recipient, thread, log]


