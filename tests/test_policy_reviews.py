"""Review requests: window, once per order, opt-out, and emails asking for one (policy/reviews.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bsm_relay.policy.facts import Direction, MessageFacts, Order, OrderStatus, TextPart
from bsm_relay.policy.reviews import ReviewRules, email_asks_for_review, review_ask_decision, review_request_decision

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)
RULES = ReviewRules()
OID = "111-1111111-1111111"


def delivered(ago: timedelta | None, *, status: OrderStatus = OrderStatus.DELIVERED,
              sent: bool = False) -> Order:
    return Order(OID, status, placed_at=NOW - 90 * DAY,
                 delivered_at=NOW - ago if ago is not None else None, review_request_sent=sent)


def facts(**kw: object) -> MessageFacts:
    base: dict[str, object] = {"direction": Direction.SELLER_TO_BUYER, "now": NOW,
                               "contact_reason": "review_request"}
    base.update(kw)
    return MessageFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("since, reason", [
    (4 * DAY, "review.too_early"),
    (5 * DAY - SECOND, "review.too_early"),     # last second of day 4
    (5 * DAY, None),                            # day 5 begins
    (20 * DAY, None),
    (30 * DAY, None),
    (31 * DAY - SECOND, None),                  # last second of day 30
    (31 * DAY, "review.too_late"),              # day 31
    (60 * DAY, "review.too_late"),
])
def test_window_default(since: timedelta, reason: str | None) -> None:
    order = delivered(since)
    assert review_request_decision(facts(order=order), order, RULES).reason == reason


@pytest.mark.parametrize("since, reason", [
    (1 * DAY, None),
    (1 * DAY - SECOND, "review.too_early"),
    (10 * DAY + 23 * 3600 * SECOND, None),
    (11 * DAY, "review.too_late"),
])
def test_window_configured(since: timedelta, reason: str | None) -> None:
    rules = ReviewRules(window_start_days=1, window_end_days=10)
    order = delivered(since)
    assert review_request_decision(facts(order=order), order, rules).reason == reason


@pytest.mark.parametrize("order, opted_out, reason", [
    (None, False, "review.no_order"),
    (delivered(10 * DAY, sent=True), False, "review.already_sent"),
    (delivered(10 * DAY), True, "review.opted_out"),
    (delivered(10 * DAY, sent=True), True, "review.already_sent"),
    (delivered(None, status=OrderStatus.SHIPPED), False, "review.not_delivered"),
    (delivered(None, status=OrderStatus.UNSHIPPED), False, "review.not_delivered"),
    (delivered(10 * DAY, status=OrderStatus.CANCELED), False, "order.canceled"),
    (delivered(10 * DAY), False, None),
])
def test_once_and_opt_out(order: Order | None, opted_out: bool, reason: str | None) -> None:
    decision = review_request_decision(facts(order=order, buyer_opted_out=opted_out), order, RULES)
    assert decision.reason == reason


@pytest.mark.parametrize("text", [
    "Would you leave a review?",
    "Please WRITE A REVIEW for us",
    "could you leave us a quick review",
    "Please leave feedback",
    "leave us some positive feedback",
    "Please leave\n  a   review",
    "give us a 5-star rating",
    "rate your purchase",
    "Please review your order on the site",
    "Bitte eine Bewertung abgeben",
    "Bitte Bewertung hinterlassen",
    "Bewerten Sie uns",
    "Schreiben Sie eine Bewertung",
    "Merci de laisser un avis",
    "Laissez votre avis",
    "Pourriez-vous évaluer votre achat ?",
    "Por favor, deje una reseña",
    "¿Puede dejar su opinión?",
    "Valore su compra, por favor",
])
def test_asks_for_review(text: str) -> None:
    assert email_asks_for_review(text)


@pytest.mark.parametrize("text", [
    "Your parcel was shipped today.",
    "We will review the return request.",
    "Please confirm the delivery address.",
    "I previewed your order and it is fine.",
    "Thank you for your feedback about the colour.",
    "Ihre Bestellung wurde versandt.",
    "Votre commande a été expédiée.",
    "Su pedido ha sido enviado.",
    "",
])
def test_does_not_ask_for_review(text: str) -> None:
    assert not email_asks_for_review(text)


def test_review_phrase_search_is_linear() -> None:
    assert not email_asks_for_review("leave" + " " * 1_000_000 + "x")
    assert email_asks_for_review("leave" + " " * 1_000_000 + "a review")


@pytest.mark.parametrize("sent, reply, subject, body, ctype, reason", [
    (True, False, "Leave a review?", "", "text/plain", "review.ask_after_request"),
    (True, False, "Hi", "please leave a review", "text/plain", "review.ask_after_request"),
    (True, False, "Hi", "<p>please <b>leave</b> a <i>review</i></p>", "text/html",
     "review.ask_after_request"),
    (True, False, "Hi", "your parcel is on its way", "text/plain", None),
    (False, False, "Leave a review?", "", "text/plain", None),   # no request sent yet
    (True, True, "Leave a review?", "", "text/plain", None),     # a reply to the buyer
])
def test_email_asking_after_request(sent: bool, reply: bool, subject: str, body: str, ctype: str,
                                    reason: str | None) -> None:
    order = delivered(10 * DAY, sent=sent)
    f = facts(order=order, contact_reason=None, is_reply_to_buyer_thread=reply, subject=subject,
              text_parts=(TextPart(ctype, body),))
    assert review_ask_decision(f, order).reason == reason
