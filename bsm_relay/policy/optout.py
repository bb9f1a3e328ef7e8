"""Buyer opt-out: an opted-out buyer gets only answers and critical messages.

A buyer who opted out of unsolicited messages still receives replies on threads
the buyer started and seller messages whose contact reason is *critical* (sent
through the Contact Buyer page or ``bsm-relay send --reason``); anything else a
seller starts is refused, and the sentence tells the seller how to send a
critical message.  Pure, stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decision import ACCEPT, Decision, refuse
from .facts import MessageFacts, Order


@dataclass(frozen=True, slots=True)
class OptOutRules:
    critical_reasons: tuple[str, ...] = ("customization", "delivery_scheduling", "shipping_address")


def optout_decision(facts: MessageFacts, order: Order | None, rules: OptOutRules) -> Decision:
    if not facts.buyer_opted_out or not facts.seller_started:
        return ACCEPT
    if facts.contact_reason is not None and facts.contact_reason in rules.critical_reasons:
        return ACCEPT
    return refuse("optout.refused",
                  order_id=order.order_id if order is not None else "ORDER_ID",
                  critical=", ".join(rules.critical_reasons))
