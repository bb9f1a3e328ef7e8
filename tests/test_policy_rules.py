"""evaluate(): the rules in order, the config defaults, the catalogue, purity (policy/rules.py)."""

from __future__ import annotations

import ast
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import bsm_relay.policy as policy_pkg
from bsm_relay.policy.attachments import Kind
from bsm_relay.policy.content import Action
from bsm_relay.policy.facts import Attachment, Direction, MessageFacts, Order, OrderStatus, Parties, TextPart
from bsm_relay.policy.reasons import REASONS
from bsm_relay.policy.rules import PolicyConfig, assess, evaluate

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
CONFIG = PolicyConfig()
A = "111-1111111-1111111"
B = "222-2222222-2222222"
BUYER = "jane.buyer@mail.example"
PARTIES = Parties(("shop@seller.example",), (BUYER,))
EXE = Attachment("invoice.pdf", "application/pdf", b"MZ\x90\x00" + b"\x00" * 60)


def order(oid: str = A, status: OrderStatus = OrderStatus.UNSHIPPED, *, delivered_ago: timedelta | None = None,
          sent: bool = False) -> Order:
    if delivered_ago is not None:
        status = OrderStatus.DELIVERED
    return Order(oid, status, placed_at=NOW - 40 * DAY,
                 delivered_at=NOW - delivered_ago if delivered_ago is not None else None,
                 review_request_sent=sent)


def facts(**kw: object) -> MessageFacts:
    base: dict[str, object] = {"direction": Direction.SELLER_TO_BUYER, "now": NOW,
                               "subject": f"Your order {A}", "pair_orders": (order(),),
                               "text_parts": (TextPart("text/plain", "Hello"),), "parties": PARTIES}
    base.update(kw)
    return MessageFacts(**base)  # type: ignore[arg-type]


def test_defaults_match_the_issue() -> None:
    c = PolicyConfig()
    assert c.orders.order_id_pattern == r"\d{3}-\d{7}-\d{7}"
    assert c.orders.proactive_window_days == 30
    assert c.optout.critical_reasons == ("customization", "delivery_scheduling", "shipping_address")
    assert (c.attachments.max_count, c.attachments.max_total_bytes) == (5, 10 * 1024 * 1024)
    assert c.attachments.allowed == {Kind.PDF, Kind.JPEG, Kind.PNG, Kind.GIF, Kind.TIFF, Kind.BMP,
                                     Kind.TEXT, Kind.DOCX}
    assert (c.content.emails, c.content.phones, c.content.links, c.content.remote_images) == \
        (Action.MASK, Action.MASK, Action.REFUSE, Action.MASK)
    assert c.content.link_schemes == ("https",) and "amazon.com" not in c.content.link_hosts
    assert c.content.max_text_chars == 100_000
    assert (c.reviews.window_start_days, c.reviews.window_end_days) == (5, 30)
    assert (c.volume.base, c.volume.per_order_factor, c.volume.window_days) == (600, 5, 30)


def test_a_custom_order_id_format_is_never_masked_as_a_phone() -> None:
    from bsm_relay.policy.content import mask_text
    from bsm_relay.policy.orders import OrderRules
    config = PolicyConfig(orders=OrderRules(order_id_pattern=r"\d{2}-\d{3}-\d{4}"))
    assert mask_text("order 12-345-6789", config.content)[0] == "order 12-345-6789"


@pytest.mark.parametrize("kw, reason", [
    ({}, None),
    ({"subject": "Hello", "pair_orders": (order(), order(B))}, "order.missing"),
    ({"pair_orders": (order(status=OrderStatus.CANCELED),)}, "order.canceled"),
    ({"contact_reason": "invoice"}, "order.reason_unavailable"),
    ({"pair_orders": (order(delivered_ago=31 * DAY),)}, "order.window_closed"),
    ({"buyer_opted_out": True}, "optout.refused"),
    ({"buyer_opted_out": True, "contact_reason": "customization"}, None),
    ({"buyer_opted_out": True, "is_reply_to_buyer_thread": True, "subject": "Re: hi"}, None),
    ({"attachments": (EXE,)}, "attach.type"),
    ({"text_parts": (TextPart("text/plain", "see https://evil.example/"),)}, "content.link"),
    ({"seller_messages_today": 600}, "volume.daily_cap"),
    ({"seller_messages_today": 599}, None),
    ({"is_reply_to_buyer_thread": True, "seller_messages_today": 600}, None),
    ({"pair_orders": (order(delivered_ago=10 * DAY, sent=True),), "subject": f"{A}: leave a review"},
     "review.ask_after_request"),
    # the review-request command path
    ({"contact_reason": "review_request", "order": order(delivered_ago=10 * DAY)}, None),
    ({"contact_reason": "review_request", "order": order(delivered_ago=10 * DAY, sent=True)},
     "review.already_sent"),
    ({"contact_reason": "review_request", "order": order(delivered_ago=2 * DAY)}, "review.too_early"),
    ({"contact_reason": "review_request", "order": order(delivered_ago=10 * DAY),
      "buyer_opted_out": True}, "review.opted_out"),
    # a cancelled order's thread: the seller may still answer the buyer
    ({"is_reply_to_buyer_thread": True, "order": order(status=OrderStatus.CANCELED)}, None),
])
def test_evaluate_seller_to_buyer(kw: dict[str, object], reason: str | None) -> None:
    assert evaluate(facts(**kw), CONFIG).reason == reason


@pytest.mark.parametrize("kw, reason", [
    # permanent problems win over the volume cap, the window over opt-out, binding over all
    ({"seller_messages_today": 600, "attachments": (EXE,)}, "attach.type"),
    ({"pair_orders": (order(delivered_ago=31 * DAY),), "buyer_opted_out": True}, "order.window_closed"),
    ({"subject": "Hello", "pair_orders": (), "attachments": (EXE,)}, "order.missing"),
    ({"buyer_opted_out": True, "attachments": (EXE,)}, "optout.refused"),
])
def test_evaluate_order_of_rules(kw: dict[str, object], reason: str) -> None:
    assert evaluate(facts(**kw), CONFIG).reason == reason


@pytest.mark.parametrize("kw, reason", [
    ({}, None),
    ({"subject": "no order", "pair_orders": (), "buyer_opted_out": True,
      "seller_messages_today": 10**6}, None),
    ({"attachments": (EXE,)}, "attach.type"),
    ({"attachments": (Attachment("a.pdf", "application/pdf", b"%PDF-1.4"),) * 6}, "attach.too_many"),
    ({"text_parts": (TextPart("text/plain", "https://evil.example/"),)}, "content.link"),
])
def test_buyer_to_seller_only_attachments_and_content(kw: dict[str, object], reason: str | None) -> None:
    assert evaluate(facts(direction=Direction.BUYER_TO_SELLER, **kw), CONFIG).reason == reason


def test_assess_reports_the_bound_order() -> None:
    result = assess(facts(subject="Hello", pair_orders=(order(B),)), CONFIG)
    assert result.decision.accepted and result.order is not None and result.order.order_id == B


def test_configured_variants_flow_through_evaluate() -> None:
    config = replace(CONFIG, content=replace(CONFIG.content, links=Action.ALLOW))
    f = facts(text_parts=(TextPart("text/plain", "see https://evil.example/"),))
    assert evaluate(f, config).accepted


# -- the catalogue ---------------------------------------------------------------------------

USED = ["order.missing", "order.unknown", "order.canceled", "order.reason_unknown",
        "order.reason_unavailable", "order.window_closed", "optout.refused", "attach.too_many",
        "attach.too_big", "attach.type", "content.email", "content.phone", "content.link",
        "content.remote_image", "content.too_long", "review.no_order", "review.already_sent",
        "review.opted_out", "review.not_delivered", "review.too_early", "review.too_late",
        "review.ask_after_request", "volume.daily_cap"]


@pytest.mark.parametrize("code", USED)
def test_every_reason_is_in_the_catalogue(code: str) -> None:
    reason = REASONS[code]
    if code == "volume.daily_cap":
        assert (reason.code, reason.status) == (450, "4.7.1")
    else:
        assert (reason.code, reason.status) in {(550, "5.7.1"), (554, "5.6.0")}
    assert len(reason.reply({})) < 400


def test_every_reason_code_in_the_source_is_catalogued() -> None:
    import re
    root = Path(policy_pkg.__file__).parent
    codes = set()
    for path in (root / f"{name}.py" for name in NEW_MODULES):
        codes.update(re.findall(r'"((?:order|optout|attach|content|review|volume)\.[a-z_]+)"',
                                path.read_text()))
    assert codes <= set(REASONS)
    assert codes == set(USED)


def test_sentences_never_carry_the_buyers_address() -> None:
    # Put the buyer's address everywhere a seller could: subject, body, filenames.
    tricky = facts(subject=f"{BUYER} {A}", buyer_opted_out=True,
                   attachments=(Attachment(BUYER + ".exe", "x", b"MZ"),),
                   text_parts=(TextPart("text/plain", f"https://{BUYER.split('@')[1]}@evil.example"),))
    variants = [tricky, replace(tricky, buyer_opted_out=False),
                replace(tricky, buyer_opted_out=False, attachments=()),
                replace(tricky, subject="x", pair_orders=())]
    for f in variants:
        decision = evaluate(f, CONFIG)
        assert not decision.accepted
        assert BUYER not in REASONS[decision.reason or ""].reply(decision.params)


# -- purity --------------------------------------------------------------------------------

NEW_MODULES = ["facts", "orders", "optout", "attachments", "content", "reviews", "volume", "rules"]


BANNED_MODULES = {"os", "socket", "subprocess", "time", "pathlib", "shutil", "asyncio", "sqlite3",
                  "http", "random", "secrets", "logging", "bsm_relay"}


@pytest.mark.parametrize("name", NEW_MODULES)
def test_policy_is_pure(name: str) -> None:
    """Stdlib only, no I/O modules, no clock reads, no open()."""
    source = (Path(policy_pkg.__file__).parent / f"{name}.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:          # relative: inside policy/
                continue
            modules = [node.module or ""]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open", name
            continue
        elif isinstance(node, ast.Attribute):
            # facts.now is the clock; datetime.now() and friends are not.
            assert node.attr not in {"utcnow", "today", "monotonic", "time_ns"}, (name, node.attr)
            assert not (node.attr == "now" and isinstance(node.value, ast.Name)
                        and node.value.id in {"datetime", "date"}), name
            continue
        else:
            continue
        for module in modules:
            root = module.split(".")[0]
            assert root in sys.stdlib_module_names or root == "__future__", (name, module)
            assert root not in BANNED_MODULES and module != "urllib.request", (name, module)
