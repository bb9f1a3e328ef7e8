"""Order binding, status, contact reasons and the proactive window (policy/orders.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import pytest

from bsm_relay.policy.facts import Direction, MessageFacts, Order, OrderStatus, TextPart
from bsm_relay.policy.orders import (
    ContactReason,
    OrderRules,
    bind_order,
    contact_reason_decision,
    days_since,
    find_order_ids,
    in_proactive_window,
    open_orders,
    reasons_for,
    status_decision,
    window_decision,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
RULES = OrderRules()
A = "111-1111111-1111111"
B = "222-2222222-2222222"
C = "333-3333333-3333333"


def order(order_id: str = A, status: OrderStatus = OrderStatus.SHIPPED, *,
          delivered_days_ago: float | None = None, category: str | None = None) -> Order:
    delivered = NOW - timedelta(days=delivered_days_ago) if delivered_days_ago is not None else None
    if delivered is not None and status is OrderStatus.SHIPPED:
        status = OrderStatus.DELIVERED
    return Order(order_id, status, placed_at=NOW - timedelta(days=60), delivered_at=delivered,
                 category=category)


def facts(**kw: object) -> MessageFacts:
    base: dict[str, object] = {"direction": Direction.SELLER_TO_BUYER, "now": NOW}
    base.update(kw)
    return MessageFacts(**base)  # type: ignore[arg-type]


# -- finding order ids ------------------------------------------------------------------

@pytest.mark.parametrize("subject, body, expected", [
    (f"Your order {A}", "", [A]),
    ("Hello", f"About {A}\nthanks", [A]),
    (f"Re {A}", f"and {B}", [A, B]),
    (f"{A} {A}", A, [A]),
    ("Hello", "\n" * 19 + A, [A]),            # line 20 is searched
    ("Hello", "\n" * 20 + A, []),             # line 21 is not
    ("Hello", "11-1111111-1111111", []),      # too short for the marketplace format
    ("no id", "", []),
])
def test_find_order_ids(subject: str, body: str, expected: list[str]) -> None:
    assert find_order_ids(subject, [TextPart("text/plain", body)], RULES) == expected


def test_find_order_ids_configured_pattern_and_lines() -> None:
    rules = OrderRules(order_id_pattern=r"\bORD-\d{6}\b", body_lines_searched=2)
    parts = [TextPart("text/plain", "hi\nORD-123456\nORD-654321")]
    assert find_order_ids("", parts, rules) == ["ORD-123456"]
    assert find_order_ids("ORD-000001", [], rules) == ["ORD-000001"]


# -- binding -------------------------------------------------------------------------------

def test_explicit_order_wins() -> None:
    explicit = order(C)
    binding = bind_order(facts(order=explicit, subject=A, pair_orders=(order(A),)), RULES)
    assert binding.order == explicit and binding.decision.accepted


@pytest.mark.parametrize("subject, pair, reply, expected_id, reason", [
    (f"About {A}", (order(A), order(B)), False, A, None),
    (f"About {C} and {B}", (order(A), order(B)), False, B, None),    # first id of the pair
    (f"About {C}", (order(A),), False, None, "order.unknown"),
    ("Hello", (order(A),), False, A, None),                          # the only open order
    ("Hello", (order(A), order(B)), False, None, "order.missing"),
    ("Hello", (), False, None, "order.missing"),
    ("Hello", (order(A), order(B, OrderStatus.CANCELED)), False, A, None),
    ("Hello", (order(A), order(B, delivered_days_ago=31)), False, A, None),
    ("Hello", (order(A, delivered_days_ago=31),), False, None, "order.missing"),
    # Replies on a buyer-started thread always pass binding.
    ("Hello", (order(A), order(B)), True, None, None),
    (f"About {C}", (), True, None, None),
    (f"About {A}", (order(A),), True, A, None),
])
def test_bind_order(subject: str, pair: tuple[Order, ...], reply: bool,
                    expected_id: str | None, reason: str | None) -> None:
    binding = bind_order(facts(subject=subject, pair_orders=pair, is_reply_to_buyer_thread=reply), RULES)
    assert binding.decision.reason == reason
    assert (binding.order.order_id if binding.order else None) == expected_id


def test_unknown_order_sentence_names_the_id_and_missing_gives_example() -> None:
    assert bind_order(facts(subject=C), RULES).decision.params == {"order_id": C}
    assert bind_order(facts(), RULES).decision.params == {"example": "123-1234567-1234567"}


# -- status -------------------------------------------------------------------------------

@pytest.mark.parametrize("status, reply, refuses_replies, reason", [
    (OrderStatus.PENDING, False, False, None),
    (OrderStatus.UNSHIPPED, False, False, None),
    (OrderStatus.SHIPPED, False, False, None),
    (OrderStatus.DELIVERED, False, False, None),
    (OrderStatus.CANCELED, False, False, "order.canceled"),
    (OrderStatus.CANCELED, True, False, None),
    (OrderStatus.CANCELED, True, True, "order.canceled"),
])
def test_status(status: OrderStatus, reply: bool, refuses_replies: bool, reason: str | None) -> None:
    rules = OrderRules(canceled_refuses_replies=refuses_replies)
    decision = status_decision(order(status=status), facts(is_reply_to_buyer_thread=reply), rules)
    assert decision.reason == reason


# -- contact reasons ----------------------------------------------------------------------

BEFORE = ["additional_info", "customization", "unexpected_problem"]
AFTER = ["unexpected_problem", "delivery_scheduling", "shipping_address", "return_refund", "invoice"]


@pytest.mark.parametrize("status, expected", [
    (OrderStatus.PENDING, BEFORE),
    (OrderStatus.UNSHIPPED, BEFORE),
    (OrderStatus.SHIPPED, AFTER),
    (OrderStatus.DELIVERED, AFTER),
    (OrderStatus.CANCELED, []),
])
def test_reasons_for_each_status(status: OrderStatus, expected: list[str]) -> None:
    reasons = reasons_for(order(status=status), RULES)
    # Listed in the order of the label table.
    assert [r.id for r in reasons] == [r for r in RULES.reason_labels if r in expected]
    assert all(isinstance(r, ContactReason) and r.label for r in reasons)


def test_reasons_for_category_add_and_remove() -> None:
    rules = OrderRules(category_adds=MappingProxyType({"furniture": ("delivery_scheduling",)}),
                       category_removes=MappingProxyType({"furniture": ("customization",),
                                                          "digital": ("shipping_address",)}))
    furniture = reasons_for(order(status=OrderStatus.UNSHIPPED, category="furniture"), rules)
    assert [r.id for r in furniture] == ["additional_info", "unexpected_problem", "delivery_scheduling"]
    digital = reasons_for(order(status=OrderStatus.SHIPPED, category="digital"), rules)
    assert "shipping_address" not in [r.id for r in digital]
    other = reasons_for(order(status=OrderStatus.UNSHIPPED, category="books"), rules)
    assert [r.id for r in other] == BEFORE


def test_reasons_for_configured_table() -> None:
    rules = OrderRules(reason_labels=MappingProxyType({"x": "X", "y": "Y"}),
                       reasons_by_group=MappingProxyType({"before_shipment": ("x",),
                                                          "after_shipment": ("x", "y")}))
    assert reasons_for(order(status=OrderStatus.PENDING), rules) == [ContactReason("x", "X")]
    assert [r.id for r in reasons_for(order(status=OrderStatus.DELIVERED), rules)] == ["x", "y"]


@pytest.mark.parametrize("status, reason, expected", [
    (OrderStatus.UNSHIPPED, None, None),                        # a plain email: unspecified
    (OrderStatus.UNSHIPPED, "customization", None),
    (OrderStatus.UNSHIPPED, "invoice", "order.reason_unavailable"),
    (OrderStatus.DELIVERED, "invoice", None),
    (OrderStatus.DELIVERED, "customization", "order.reason_unavailable"),
    (OrderStatus.DELIVERED, "bogus", "order.reason_unknown"),
    (OrderStatus.CANCELED, "unexpected_problem", "order.reason_unavailable"),
])
def test_contact_reason_decision(status: OrderStatus, reason: str | None, expected: str | None) -> None:
    assert contact_reason_decision(order(status=status), reason, RULES).reason == expected


def test_contact_reason_without_order_asks_for_it() -> None:
    assert contact_reason_decision(None, "invoice", RULES).reason == "order.missing"
    assert contact_reason_decision(None, None, RULES).accepted


# -- the proactive window -------------------------------------------------------------------

DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)


@pytest.mark.parametrize("since_delivery, window, inside", [
    (None, 30, True),                         # not delivered yet
    (timedelta(0), 30, True),
    (30 * DAY, 30, True),                     # day 30 begins: inside
    (31 * DAY - SECOND, 30, True),            # last second of day 30
    (31 * DAY, 30, False),                    # day 31: outside
    (40 * DAY, 30, False),
    (7 * DAY + 23 * timedelta(hours=1), 7, True),
    (8 * DAY, 7, False),
    (0 * DAY, 0, True),
    (1 * DAY, 0, False),
])
def test_window_boundaries(since_delivery: timedelta | None, window: int, inside: bool) -> None:
    delivered = NOW - since_delivery if since_delivery is not None else None
    status = OrderStatus.DELIVERED if delivered else OrderStatus.SHIPPED
    o = Order(A, status, placed_at=NOW - 90 * DAY, delivered_at=delivered)
    rules = OrderRules(proactive_window_days=window)
    assert in_proactive_window(o, NOW, rules) is inside
    decision = window_decision(o, NOW, rules)
    assert decision.accepted is inside
    if not inside:
        assert decision.reason == "order.window_closed"
        assert decision.params == {"order_id": A, "days": str(window)}


def test_window_right_after_placement_and_clock_skew() -> None:
    fresh = Order(A, OrderStatus.PENDING, placed_at=NOW + timedelta(minutes=2))
    assert window_decision(fresh, NOW, RULES).accepted


def test_days_since() -> None:
    then = NOW - 5 * DAY
    assert days_since(then, NOW) == 5
    assert days_since(then, NOW - SECOND) == 4
    assert days_since(NOW, NOW - SECOND) == -1


def test_open_orders() -> None:
    orders = [order(A), order(B, OrderStatus.CANCELED), order(C, delivered_days_ago=31),
              replace(order(C, delivered_days_ago=30), order_id="444-4444444-4444444")]
    assert [o.order_id for o in open_orders(orders, NOW, RULES)] == [A, "444-4444444-4444444"]


def test_unknown_reason_is_echoed_only_when_it_looks_like_an_id() -> None:
    assert contact_reason_decision(order(), "gift_wrap", RULES).params["contact_reason"] == "gift_wrap"
    odd = contact_reason_decision(order(), "jane@mail.example", RULES)
    assert odd.reason == "order.reason_unknown"
    assert odd.params["contact_reason"] == "(not a reason id)"
