"""The marketplace's messaging rules, in the order the relay applies them.

:func:`evaluate` takes the :class:`~bsm_relay.policy.facts.MessageFacts` the
relay gathered and a :class:`PolicyConfig`, and returns the first refusal or
:data:`~bsm_relay.policy.decision.ACCEPT`.  The order is chosen so the seller
hears first about what can never pass and last about what only needs time:

1. order binding (seller messages) -- which order is this about;
2. order status (cancelled), contact reason, or the review-request rules;
3. an email asking for a review after the request was sent, the proactive window;
4. buyer opt-out;
5. attachments, then content (both directions);
6. the daily volume cap (seller-started only): a ``450`` that a retry tomorrow
   fixes comes last, so a message that would be refused anyway is refused now.

Buyer messages to the seller pass only steps 5.  Pure, stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from .attachments import AttachmentRules, attachments_decision
from .content import ContentRules, content_decision
from .decision import ACCEPT, Decision
from .facts import Direction, MessageFacts, Order
from .optout import OptOutRules, optout_decision
from .orders import REVIEW_REQUEST, OrderRules, bind_order, contact_reason_decision, status_decision, window_decision
from .reviews import ReviewRules, review_ask_decision, review_request_decision
from .volume import VolumeRules, volume_decision


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Every rule's settings; the defaults are the marketplace defaults of the issue."""

    orders: OrderRules = field(default_factory=OrderRules)
    optout: OptOutRules = field(default_factory=OptOutRules)
    attachments: AttachmentRules = field(default_factory=AttachmentRules)
    content: ContentRules = field(default_factory=ContentRules)
    reviews: ReviewRules = field(default_factory=ReviewRules)
    volume: VolumeRules = field(default_factory=VolumeRules)

    def __post_init__(self) -> None:
        # An order id must never be masked as a phone number, whatever its format.
        pattern = self.orders.order_id_pattern
        if pattern not in self.content.protected_patterns:
            content = replace(self.content,
                              protected_patterns=(pattern, *self.content.protected_patterns))
            object.__setattr__(self, "content", content)


@dataclass(frozen=True, slots=True)
class Assessment:
    """The decision, and the order the message was bound to (for the message log)."""

    decision: Decision
    order: Order | None


def assess(facts: MessageFacts, config: PolicyConfig) -> Assessment:
    order: Order | None = facts.order
    if facts.direction is Direction.SELLER_TO_BUYER:
        binding = bind_order(facts, config.orders)
        order = binding.order
        if not binding.decision.accepted:
            return Assessment(binding.decision, order)
    for decision in _checks(facts, order, config):
        if not decision.accepted:
            return Assessment(decision, order)
    return Assessment(ACCEPT, order)


def evaluate(facts: MessageFacts, config: PolicyConfig) -> Decision:
    return assess(facts, config).decision


def _checks(facts: MessageFacts, order: Order | None, config: PolicyConfig) -> Iterator[Decision]:
    """The rules after binding, lazily: evaluation stops at the first refusal."""
    if facts.direction is Direction.SELLER_TO_BUYER:
        if facts.contact_reason == REVIEW_REQUEST:
            yield review_request_decision(facts, order, config.reviews)
        else:
            if order is not None:
                yield status_decision(order, facts, config.orders)
            yield contact_reason_decision(order, facts.contact_reason, config.orders)
            if order is not None and facts.seller_started:
                yield review_ask_decision(facts, order)
                yield window_decision(order, facts.now, config.orders)
            yield optout_decision(facts, order, config.optout)
    yield attachments_decision(facts.attachments, config.attachments)
    yield content_decision(facts.text_parts, config.content, facts.parties)
    if facts.direction is Direction.SELLER_TO_BUYER:
        yield volume_decision(facts, config.volume)
