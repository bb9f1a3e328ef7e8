"""Order rules: which order a seller message is about, its status, contact reasons, the window.

A seller-started message must concern an order of the seller-buyer pair: the
order id is searched in the subject and the first lines of the text body, and
when there is none the pair's only open order is used.  Cancelled orders go
through the marketplace's customer service; the contact reasons offered depend
on the order status and the product category; and the seller may start a
conversation only from order placement until a number of days after delivery.

Day counting, used by every window here and in :mod:`.reviews`: "day N after
delivery" is the N-th whole 24-hour period since ``delivered_at``
(:func:`days_since`), so with a 30-day window a message 30 days 23 hours after
delivery passes and one 31 days after is refused.  Pure, stdlib only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType

from .decision import ACCEPT, Decision, refuse
from .facts import MessageFacts, Order, OrderStatus, TextPart

BEFORE_SHIPMENT = "before_shipment"
AFTER_SHIPMENT = "after_shipment"

STATUS_GROUPS: Mapping[OrderStatus, str] = MappingProxyType({
    OrderStatus.PENDING: BEFORE_SHIPMENT,
    OrderStatus.UNSHIPPED: BEFORE_SHIPMENT,
    OrderStatus.SHIPPED: AFTER_SHIPMENT,
    OrderStatus.DELIVERED: AFTER_SHIPMENT,
})

REVIEW_REQUEST = "review_request"
"""The contact reason of the marketplace's review request; never in the table below."""

DEFAULT_REASON_LABELS: Mapping[str, str] = MappingProxyType({
    "additional_info": "Additional information needed to fulfil the order",
    "customization": "Customization details",
    "unexpected_problem": "Unexpected problem with the order",
    "delivery_scheduling": "Delivery scheduling",
    "shipping_address": "Shipping address problem",
    "return_refund": "Return or refund",
    "invoice": "Invoice",
})

DEFAULT_REASONS_BY_GROUP: Mapping[str, tuple[str, ...]] = MappingProxyType({
    BEFORE_SHIPMENT: ("additional_info", "customization", "unexpected_problem"),
    AFTER_SHIPMENT: ("delivery_scheduling", "shipping_address", "unexpected_problem",
                     "return_refund", "invoice"),
})


def _empty() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class OrderRules:
    order_id_pattern: str = r"\d{3}-\d{7}-\d{7}"
    # Shown to the seller in the "no order number" sentence; keep it matching the pattern.
    order_id_example: str = "123-1234567-1234567"
    body_lines_searched: int = 20
    # Days after delivery during which the seller may start a conversation (day 30 included).
    proactive_window_days: int = 30
    # Replies on a buyer-started thread about a cancelled order pass by default:
    # the buyer asked, and refusing the answer would help nobody.
    canceled_refuses_replies: bool = False
    reason_labels: Mapping[str, str] = field(default_factory=lambda: DEFAULT_REASON_LABELS)
    reasons_by_group: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: DEFAULT_REASONS_BY_GROUP)
    # Product category -> reasons added to (or removed from) every status group.
    category_adds: Mapping[str, tuple[str, ...]] = field(default_factory=_empty)
    category_removes: Mapping[str, tuple[str, ...]] = field(default_factory=_empty)
    _order_id_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_order_id_re", re.compile(self.order_id_pattern))

    @property
    def order_id_re(self) -> re.Pattern[str]:
        return self._order_id_re


@dataclass(frozen=True, slots=True)
class ContactReason:
    id: str
    label: str


# -- day counting -----------------------------------------------------------------

_DAY = timedelta(days=1)


def days_since(then: datetime, now: datetime) -> int:
    """Whole 24-hour periods from ``then`` to ``now`` (negative if ``now`` is earlier)."""
    return (now - then) // _DAY


def in_proactive_window(order: Order, now: datetime, rules: OrderRules) -> bool:
    """From placement until ``proactive_window_days`` after delivery, that last day included.

    An order not yet delivered is always inside the window.  ``now`` before
    ``placed_at`` can only be clock skew between the store and the relay, so it
    is not held against the seller.
    """
    if order.delivered_at is None:
        return True
    return days_since(order.delivered_at, now) <= rules.proactive_window_days


def is_open(order: Order, now: datetime, rules: OrderRules) -> bool:
    return order.status is not OrderStatus.CANCELED and in_proactive_window(order, now, rules)


def open_orders(orders: Iterable[Order], now: datetime, rules: OrderRules) -> list[Order]:
    return [o for o in orders if is_open(o, now, rules)]


# -- order binding ------------------------------------------------------------------

def find_order_ids(subject: str, text_parts: Iterable[TextPart], rules: OrderRules) -> list[str]:
    """Order ids in the subject, then in the first lines of each text part, in order, no repeats.

    HTML parts are searched as they are: an order id inside markup is still an
    order id, and tags do not contain digits in that shape.
    """
    found: list[str] = []
    pattern = rules.order_id_re
    sources = [subject]
    for part in text_parts:
        lines = part.text.split("\n", rules.body_lines_searched)[: rules.body_lines_searched]
        sources.append("\n".join(lines))
    for source in sources:
        for match in pattern.finditer(source):
            if match.group(0) not in found:
                found.append(match.group(0))
    return found


@dataclass(frozen=True, slots=True)
class Binding:
    """The result of order binding: the order, or the refusal."""

    order: Order | None
    decision: Decision = ACCEPT


def bind_order(facts: MessageFacts, rules: OrderRules) -> Binding:
    """Find the order a message is about.

    Precedence: the order the relay already knows (``send``, thread), an order
    id found in the text that belongs to the pair, the pair's only open order.
    A reply on a buyer-started thread always passes, with or without an order.
    """
    if facts.order is not None:
        return Binding(facts.order)
    ids = find_order_ids(facts.subject, facts.text_parts, rules)
    by_id = {o.order_id: o for o in facts.pair_orders}
    for order_id in ids:
        if order_id in by_id:
            return Binding(by_id[order_id])
    if facts.is_reply_to_buyer_thread:
        return Binding(None)
    if ids:
        return Binding(None, refuse("order.unknown", order_id=ids[0]))
    candidates = open_orders(facts.pair_orders, facts.now, rules)
    if len(candidates) == 1:
        return Binding(candidates[0])
    return Binding(None, refuse("order.missing", example=rules.order_id_example))


def status_decision(order: Order, facts: MessageFacts, rules: OrderRules) -> Decision:
    if order.status is not OrderStatus.CANCELED:
        return ACCEPT
    if facts.is_reply_to_buyer_thread and not rules.canceled_refuses_replies:
        return ACCEPT
    return refuse("order.canceled", order_id=order.order_id)


# -- contact reasons --------------------------------------------------------------

def reasons_for(order: Order, rules: OrderRules) -> list[ContactReason]:
    """The contact reasons a seller may use for this order now (the ``reasons`` command).

    Listed in the order of the label table; none for a cancelled order.
    """
    group = STATUS_GROUPS.get(order.status)
    if group is None:
        return []
    ids = set(rules.reasons_by_group.get(group, ()))
    if order.category is not None:
        ids.update(rules.category_adds.get(order.category, ()))
        ids.difference_update(rules.category_removes.get(order.category, ()))
    return [ContactReason(rid, label) for rid, label in rules.reason_labels.items() if rid in ids]


_REASON_ID_RE = re.compile(r"[a-z0-9_]{1,40}")


def contact_reason_decision(order: Order | None, reason: str | None, rules: OrderRules) -> Decision:
    """An explicit contact reason must exist and be available for the order now.

    A plain email carries no reason ("unspecified") and passes this rule.
    """
    if reason is None:
        return ACCEPT
    if reason not in rules.reason_labels:
        # Echo the seller's input only when it looks like a reason id.
        shown = reason if _REASON_ID_RE.fullmatch(reason) else "(not a reason id)"
        return refuse("order.reason_unknown", contact_reason=shown,
                      known=", ".join(rules.reason_labels))
    if order is None:
        return refuse("order.missing", example=rules.order_id_example)
    available = reasons_for(order, rules)
    if any(r.id == reason for r in available):
        return ACCEPT
    return refuse("order.reason_unavailable", contact_reason=reason, order_id=order.order_id,
                  status=order.status.value,
                  available=", ".join(r.id for r in available) or "none")


def window_decision(order: Order, now: datetime, rules: OrderRules) -> Decision:
    if in_proactive_window(order, now, rules):
        return ACCEPT
    return refuse("order.window_closed", order_id=order.order_id, days=rules.proactive_window_days)
