"""The proactive daily volume cap (policy/volume.py) and opt-out (policy/optout.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bsm_relay.policy.facts import Direction, MessageFacts, Order, OrderStatus
from bsm_relay.policy.optout import OptOutRules, optout_decision
from bsm_relay.policy.reasons import REASONS
from bsm_relay.policy.volume import VolumeRules, counts_toward_cap, daily_cap, volume_decision

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def facts(**kw: object) -> MessageFacts:
    base: dict[str, object] = {"direction": Direction.SELLER_TO_BUYER, "now": NOW}
    base.update(kw)
    return MessageFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("orders_30d, rules, cap", [
    (0, VolumeRules(), 600),
    (30, VolumeRules(), 605),          # 1 order a day on average
    (29, VolumeRules(), 604),          # 4.83 rounds down
    (3000, VolumeRules(), 1100),
    (-5, VolumeRules(), 600),
    (300, VolumeRules(base=100, per_order_factor=2, window_days=10), 160),
])
def test_daily_cap(orders_30d: int, rules: VolumeRules, cap: int) -> None:
    assert daily_cap(orders_30d, rules) == cap


@pytest.mark.parametrize("today, orders, reason", [
    (0, 0, None),
    (599, 0, None),                 # this is the 600th message: allowed
    (600, 0, "volume.daily_cap"),   # the 601st
    (10_000, 0, "volume.daily_cap"),
    (604, 30, None),
    (605, 30, "volume.daily_cap"),
])
def test_cap_boundary(today: int, orders: int, reason: str | None) -> None:
    decision = volume_decision(facts(seller_messages_today=today, seller_orders_30d=orders), VolumeRules())
    assert decision.reason == reason


def test_cap_reply_code_is_temporary() -> None:
    decision = volume_decision(facts(seller_messages_today=600), VolumeRules())
    assert decision.params == {"cap": "600"}
    reason = REASONS["volume.daily_cap"]
    assert (reason.code, reason.status) == (450, "4.7.1")


@pytest.mark.parametrize("direction, reply, counted", [
    (Direction.SELLER_TO_BUYER, False, True),
    (Direction.SELLER_TO_BUYER, True, False),
    (Direction.BUYER_TO_SELLER, False, False),
])
def test_replies_not_counted_nor_limited(direction: Direction, reply: bool, counted: bool) -> None:
    f = facts(direction=direction, is_reply_to_buyer_thread=reply, seller_messages_today=10**6)
    assert counts_toward_cap(f) is counted
    assert volume_decision(f, VolumeRules()).accepted is not counted


# -- opt-out ------------------------------------------------------------------------------

ORDER = Order("111-1111111-1111111", OrderStatus.UNSHIPPED, placed_at=NOW)


@pytest.mark.parametrize("opted_out, reply, reason, expected", [
    (False, False, None, None),
    (True, False, None, "optout.refused"),
    (True, False, "additional_info", "optout.refused"),
    (True, False, "customization", None),
    (True, False, "delivery_scheduling", None),
    (True, False, "shipping_address", None),
    (True, True, None, None),                       # reply on the buyer's thread
])
def test_optout_default(opted_out: bool, reply: bool, reason: str | None, expected: str | None) -> None:
    f = facts(buyer_opted_out=opted_out, is_reply_to_buyer_thread=reply, contact_reason=reason)
    assert optout_decision(f, ORDER, OptOutRules()).reason == expected


def test_optout_configured_and_sentence() -> None:
    rules = OptOutRules(critical_reasons=("invoice",))
    f = facts(buyer_opted_out=True, contact_reason="customization")
    decision = optout_decision(f, ORDER, rules)
    assert decision.params == {"order_id": ORDER.order_id, "critical": "invoice"}
    assert optout_decision(facts(buyer_opted_out=True, contact_reason="invoice"), ORDER, rules).accepted
    text = REASONS["optout.refused"].reply(decision.params)
    assert "bsm-relay send 111-1111111-1111111 --reason" in text and "Contact Buyer" in text


def test_optout_does_not_apply_to_the_buyer_writing() -> None:
    f = facts(direction=Direction.BUYER_TO_SELLER, buyer_opted_out=True)
    assert optout_decision(f, None, OptOutRules()).accepted
