"""The proactive volume cap: how many messages a seller may start per day.

``cap = base + per_order_factor * (orders over the last window_days / window_days)``,
rounded down; by default ``5 x average daily orders over 30 days + 600``.  The
count is of seller-started messages already accepted today, *not* including the
one being decided: with a cap of 600 the 600th message of the day passes
(599 before it) and the 601st gets ``450 4.7.1`` until the next day.  Replies on
buyer-started threads are neither limited nor counted.  Pure, stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decision import ACCEPT, Decision, refuse
from .facts import MessageFacts


@dataclass(frozen=True, slots=True)
class VolumeRules:
    base: int = 600
    per_order_factor: int = 5
    window_days: int = 30


def daily_cap(orders_in_window: int, rules: VolumeRules) -> int:
    # Integer arithmetic: no float rounding at the boundary.
    return rules.base + (rules.per_order_factor * max(orders_in_window, 0)) // rules.window_days


def counts_toward_cap(facts: MessageFacts) -> bool:
    """Whether the relay should count this message, once accepted, in the seller's day."""
    return facts.seller_started


def volume_decision(facts: MessageFacts, rules: VolumeRules) -> Decision:
    if not counts_toward_cap(facts):
        return ACCEPT
    cap = daily_cap(facts.seller_orders_30d, rules)
    if facts.seller_messages_today < cap:
        return ACCEPT
    return refuse("volume.daily_cap", cap=cap)
