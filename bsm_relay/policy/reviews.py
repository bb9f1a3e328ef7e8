"""Review requests: the marketplace's one request per order, in its window, and emails asking for one.

``bsm-relay review-request ORDER_ID`` sends the marketplace's fixed request; it
is allowed from ``window_start_days`` to ``window_end_days`` after delivery
(both days included, counted as in :mod:`.orders`), once per order, never to an
opted-out buyer.  Once it has been sent, a seller-started email that asks for a
review is refused too.  Pure, stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .content import html_text, is_html
from .decision import ACCEPT, Decision, refuse
from .facts import MessageFacts, Order, OrderStatus
from .orders import days_since


@dataclass(frozen=True, slots=True)
class ReviewRules:
    window_start_days: int = 5
    window_end_days: int = 30


# Phrases in English, German, French and Spanish.  Words are joined by any whitespace so
# line breaks and double spaces do not hide them; whitespace is matched
# possessively so a long run of spaces cannot make the search quadratic.
_PHRASES: tuple[str, ...] = (
    # English
    r"(?:leave|write|post|give|submit|share)\s++(?:(?:us|me)\s++)?(?:(?:a|an|your|some)\s++)?"
    r"(?:quick\s++|short\s++|honest\s++|positive\s++|5[\s-]star\s++|five[\s-]star\s++)?"
    r"(?:review|feedback|rating)",
    r"leave\s++(?:us\s++|me\s++)?(?:positive\s++|some\s++)?feedback",
    r"rate\s++(?:your|the|this)\s++(?:purchase|order|item|product|experience)",
    r"review\s++(?:your|the|this)\s++(?:purchase|order|item|product)",
    r"rate\s++us\b",
    # German
    r"bewertung\s++(?:abgeben|hinterlassen|schreiben)",
    r"(?:eine|ihre|deine)\s++bewertung",
    r"bewerten\s++sie",
    r"(?:rezension|feedback)\s++(?:schreiben|hinterlassen|abgeben)",
    # French
    r"(?:laisser|laissez|laisse|donner|donnez|écrire|écrivez|partager|partagez)\s++"
    r"(?:un|une|votre|ton)\s++(?:avis|évaluation|commentaire|note)",
    r"(?:évaluer|évaluez|notez|noter)\s++(?:votre|ton|cet|cette|le|la)\s++"
    r"(?:achat|commande|article|produit)",
    # Spanish
    r"(?:dejar|deje|deja|dejarnos|déjenos|déjanos|escribir|escriba|escribe)\s++"
    r"(?:una|su|tu)\s++(?:reseña|opinión|valoración|calificación|evaluación)",
    r"(?:valorar|valore|valora|calificar|califique|califica|evaluar|evalúe)\s++"
    r"(?:su|tu|el|la|este|esta)\s++(?:compra|pedido|producto|artículo)",
)
_REVIEW_ASK_RE = re.compile(r"\b(?:" + "|".join(_PHRASES) + r")", re.IGNORECASE)


def email_asks_for_review(text: str) -> bool:
    """Whether a subject or body text asks the buyer for a review or feedback."""
    return _REVIEW_ASK_RE.search(text) is not None


def review_request_decision(facts: MessageFacts, order: Order | None, rules: ReviewRules) -> Decision:
    """May the marketplace's review request be sent for this order now?

    ``order`` is the bound order (``facts.order`` from the command); the checks
    run from the one the seller can never fix to the one time will fix.
    """
    if order is None:
        return refuse("review.no_order")
    if order.status is OrderStatus.CANCELED:
        return refuse("order.canceled", order_id=order.order_id)
    if order.review_request_sent:
        return refuse("review.already_sent", order_id=order.order_id)
    if facts.buyer_opted_out:
        return refuse("review.opted_out", order_id=order.order_id)
    if order.delivered_at is None or order.status is not OrderStatus.DELIVERED:
        return refuse("review.not_delivered", order_id=order.order_id, start=rules.window_start_days)
    day = days_since(order.delivered_at, facts.now)
    if day < rules.window_start_days:
        return refuse("review.too_early", order_id=order.order_id, start=rules.window_start_days,
                      end=rules.window_end_days)
    if day > rules.window_end_days:
        return refuse("review.too_late", order_id=order.order_id, start=rules.window_start_days,
                      end=rules.window_end_days)
    return ACCEPT


def review_ask_decision(facts: MessageFacts, order: Order | None) -> Decision:
    """A seller-started email asking for a review after the request was sent is refused."""
    if order is None or not order.review_request_sent or not facts.seller_started:
        return ACCEPT
    texts = [facts.subject]
    texts.extend(html_text(p.text) if is_html(p) else p.text for p in facts.text_parts)
    if any(email_asks_for_review(t) for t in texts):
        return refuse("review.ask_after_request", order_id=order.order_id)
    return ACCEPT
