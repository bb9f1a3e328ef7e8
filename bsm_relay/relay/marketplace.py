"""The policy stage: gather the facts of one message, ask ``policy.rules``, mask the body.

Intake calls :func:`check` once per aliased recipient, after sender approval and
before the rewrite.  This module does the I/O the pure rules must not do: it reads
the pair's orders, the buyer's opt-out, the seller's counters and the thread the
message belongs to from the store, walks the body with :mod:`.mime`, builds the
:class:`~bsm_relay.policy.rules.PolicyConfig` from ``[policy]`` and returns the
decision with the (masked) message to forward and the fields the message log
records.  The ``send`` and ``review-request`` commands go through the same call
with the contact reason and the order already known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.header import Header as EmailHeader
from types import MappingProxyType
from typing import Any

from ..aliases.codec import Direction as AliasDirection
from ..config.settings import PolicySettings, Settings
from ..policy import content as content_rules
from ..policy.attachments import AttachmentRules
from ..policy.content import Action, ContentRules
from ..policy.decision import Decision, refuse
from ..policy.facts import Direction, MessageFacts, Order, OrderStatus, Parties
from ..policy.optout import OptOutRules
from ..policy.orders import AFTER_SHIPMENT, BEFORE_SHIPMENT, OrderRules
from ..policy.reviews import ReviewRules
from ..policy.rules import PolicyConfig, assess
from ..policy.volume import VolumeRules, counts_toward_cap, daily_cap
from . import mime
from .headers import Header, get_all
from .models import Order as OrderRow

__all__ = ["PolicyOutcome", "check", "policy_config", "policy_order"]


@dataclass(frozen=True)
class PolicyOutcome:
    """The decision; on acceptance the message to forward and what the log records."""

    decision: Decision
    content: bytes                     # the whole message (header block + body), masked
    order_ext_id: str | None = None
    contact_reason: str | None = None
    proactive: bool = False

    @property
    def log_fields(self) -> dict[str, Any]:
        return {"order_ext_id": self.order_ext_id, "contact_reason": self.contact_reason,
                "proactive": self.proactive}


_CONFIG: list[tuple[Settings, PolicyConfig]] = []     # the last settings seen and their rules


def policy_config(settings: Settings) -> PolicyConfig:
    """The rules' settings from ``[policy]`` (built once per settings object: a SIGHUP reload
    makes a new one)."""
    if _CONFIG and _CONFIG[0][0] is settings:
        return _CONFIG[0][1]
    config = _policy_config(settings)
    _CONFIG[:] = [(settings, config)]
    return config


def _policy_config(settings: Settings) -> PolicyConfig:
    """The rules' settings from ``[policy]``; a key not in the settings keeps the rules' default."""
    p: PolicySettings = settings.policy
    adds: dict[str, list[str]] = {}
    removes: dict[str, list[str]] = {}
    for entries, table in ((p.category_add_reasons, adds), (p.category_remove_reasons, removes)):
        for entry in entries:
            category, _, reason = entry.partition(":")
            table.setdefault(category.strip(), []).append(reason.strip())
    orders = OrderRules(
        order_id_pattern=p.order_id_pattern,
        proactive_window_days=p.proactive_window_days,
        reasons_by_group=MappingProxyType({BEFORE_SHIPMENT: tuple(p.reasons_before_shipment),
                                           AFTER_SHIPMENT: tuple(p.reasons_after_shipment)}),
        category_adds=MappingProxyType({k: tuple(v) for k, v in adds.items()}),
        category_removes=MappingProxyType({k: tuple(v) for k, v in removes.items()}))
    hosts = tuple(p.link_allowlist) or content_rules.DEFAULT_LINK_HOSTS
    domain = settings.aliases.domain.lower()
    if domain not in hosts:
        hosts = (domain, *hosts)
    content = ContentRules(emails=Action(p.emails), phones=Action(p.phones), links=Action(p.links),
                           remote_images=Action(p.remote_images), max_text_chars=p.max_text_chars,
                           link_hosts=hosts)
    return PolicyConfig(
        orders=orders,
        optout=OptOutRules(critical_reasons=tuple(p.critical_reasons)),
        attachments=AttachmentRules(max_count=p.max_attachments, max_total_bytes=p.max_attachment_bytes),
        content=content,
        reviews=ReviewRules(window_start_days=p.review_min_days, window_end_days=p.review_max_days),
        volume=VolumeRules(base=p.volume_base, per_order_factor=p.volume_per_order_factor,
                           window_days=p.volume_window_days))


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


def policy_order(row: OrderRow) -> Order:
    """A stored order as the rules see it."""
    return Order(order_id=row.ext_id, status=OrderStatus(row.status),
                 placed_at=datetime.fromtimestamp(row.placed_at, UTC), delivered_at=_dt(row.delivered_at),
                 category=row.category, review_request_sent=row.review_requested_at is not None)


def _utc_midnight(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


async def check(relay: Any, tx: Any, rcpt: Any, headers: list[Header], body: bytes, sender_address: str,
                thread_refs: Any, contact_reason: str | None = None,
                order_hint: Order | None = None, body_start: int = 0) -> PolicyOutcome:
    """Decide on one message for one aliased recipient (``rcpt`` as resolved at RCPT).

    ``body_start``: ``body`` is the whole message and its body begins there (intake passes the
    message as received, so a large body is never copied to be read)."""
    assert rcpt.ref is not None and rcpt.seller is not None and rcpt.buyer is not None
    store = relay.store
    header_block = b"".join(h.raw for h in headers)
    original = tx.content
    # The MIME walk reads only the Content-* fields (what the stdlib parser would take from the
    # whole block: intake refused any block that is not a clean list of fields): about a quarter
    # of the walk's time at 2 KB went to parsing every other field again.
    try:
        parsed = mime.parse(b"".join(h.raw for h in headers if h.name[:8].lower() == "content-"), body, body_start)
    except mime.MalformedMime:
        return PolicyOutcome(refuse("msg.malformed"), original, contact_reason=contact_reason)
    config = policy_config(relay.settings)
    seller, buyer, ref = rcpt.seller, rcpt.buyer, rcpt.ref
    now = datetime.now(UTC)
    window = config.volume.window_days
    pair_facts = await store.policy_facts(ref.seller_id, ref.buyer_id, _utc_midnight(now).timestamp(),
                                          (now - timedelta(days=window)).timestamp(),
                                          lambda orders: daily_cap(orders, config.volume))
    seller_addresses = (seller.email, sender_address, *pair_facts.seller_addresses)
    parties = Parties(tuple(dict.fromkeys(a for a in seller_addresses if a)), (buyer.email,))
    subject_fields = get_all(headers, "Subject")
    subject = subject_fields[0].value if subject_fields else ""

    if ref.direction is AliasDirection.TO_BUYER:
        started = await _thread_started_by(store, ref.seller_id, ref.buyer_id,
                                           list(thread_refs.in_reply_to) + list(thread_refs.references))
        pair = tuple(policy_order(o) for o in pair_facts.orders)
        facts = MessageFacts(
            direction=Direction.SELLER_TO_BUYER, now=now,
            is_reply_to_buyer_thread=started == int(AliasDirection.TO_SELLER),
            order=order_hint, pair_orders=pair, buyer_opted_out=bool(buyer.opt_out),
            contact_reason=contact_reason, subject=subject, text_parts=parsed.text_parts,
            attachments=parsed.attachments, parties=parties,
            seller_messages_today=pair_facts.proactive_today,
            seller_orders_30d=pair_facts.seller_orders_recent)
    else:
        facts = MessageFacts(direction=Direction.BUYER_TO_SELLER, now=now, subject=subject,
                             text_parts=parsed.text_parts, attachments=parsed.attachments,
                             parties=parties)
    assessment = assess(facts, config)
    order_id = assessment.order.order_id if assessment.order is not None else None
    proactive = counts_toward_cap(facts)
    if not assessment.decision.accepted:
        return PolicyOutcome(assessment.decision, original, order_id, contact_reason, proactive)

    def masked(part: Any) -> str:
        return content_rules.mask_part(part, config.content, parties)[0].text

    try:
        rewritten = mime.rewrite_texts(parsed, masked)
    except mime.MalformedMime:      # a re-encoded part that is not CRLF lines: never queued
        return PolicyOutcome(refuse("msg.malformed"), original, order_id, contact_reason, proactive)
    fields = dict(rewritten.headers or {}) if rewritten.changed else {}
    safe_subject = content_rules.mask_subject(subject, parties.all())
    if safe_subject != subject:
        # The Subject passes through the rewrite: the two parties' real addresses never do.
        fields["Subject"] = _encode_header(safe_subject)
    content = original
    if fields or rewritten.changed:
        block = mime.replace_header_lines(header_block, fields) if fields else header_block
        content = block + b"\r\n" + (rewritten.body if rewritten.changed else body[body_start:])
    return PolicyOutcome(assessment.decision, content, order_id, contact_reason, proactive)


def _encode_header(text: str) -> str:
    # Text that looks like an encoded word is encoded too, so a reader shows it as it is.
    if text.isascii() and "=?" not in text:
        return text
    return EmailHeader(text, "utf-8").encode(maxlinelen=900).replace("\n", "")


async def _thread_started_by(store: Any, seller_id: int, buyer_id: int, ids: Sequence[str]) -> int | None:
    """Who wrote the earliest known message of the thread these ids point into.

    The writer's client lists our minted ids (of messages it received) and its own
    originals (of messages it sent); both lead to minted ids in the store.
    """
    if not ids:
        return None
    mapping = await store.map_thread_ids(seller_id, buyer_id, ids)
    candidates = list(dict.fromkeys([*ids, *mapping.values()]))
    return await store.thread_started_by(seller_id, buyer_id, candidates)  # type: ignore[no-any-return]

