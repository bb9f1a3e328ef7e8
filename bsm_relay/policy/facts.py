"""The facts the relay gathers about one message before asking the policy.

The relay (smtpd, the ``send`` and ``review-request`` commands) fills one
:class:`MessageFacts` from the alias, the store and the parsed message, then
calls :func:`bsm_relay.policy.rules.evaluate`.  Everything here is a frozen
value: the policy never reads a clock, a database or the raw message.

Datetimes must be timezone-aware (UTC is simplest); the policy only subtracts
them, so any one zone works as long as all facts use aware values.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Direction(StrEnum):
    SELLER_TO_BUYER = "seller_to_buyer"
    BUYER_TO_SELLER = "buyer_to_seller"


class OrderStatus(StrEnum):
    PENDING = "pending"
    UNSHIPPED = "unshipped"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    CANCELED = "canceled"


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    status: OrderStatus
    placed_at: datetime
    delivered_at: datetime | None = None
    category: str | None = None
    # The marketplace's review request for this order has already been sent.
    review_request_sent: bool = False


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment as sent: the type is decided from ``data`` alone.

    ``filename`` and ``declared_type`` are kept for the refusal sentence and the
    log; they are never trusted.
    """

    filename: str
    declared_type: str
    data: bytes                 # the content, or its first bytes when it is large
    size: int = -1              # its size when ``data`` holds only the first bytes

    @property
    def length(self) -> int:
        return self.size if self.size >= 0 else len(self.data)


@dataclass(frozen=True, slots=True)
class TextPart:
    """A decoded ``text/plain`` or ``text/html`` body part (not an attachment)."""

    content_type: str
    text: str


@dataclass(frozen=True, slots=True)
class Parties:
    """The real addresses of both sides: always masked out of the body."""

    seller_addresses: tuple[str, ...] = ()
    buyer_addresses: tuple[str, ...] = ()

    def all(self) -> tuple[str, ...]:
        return self.seller_addresses + self.buyer_addresses


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What the relay knows about one message when it asks for a decision.

    Order facts:
      * ``order`` -- the order the message is about when the relay knows it
        without reading the text: the ``send``/``review-request`` command's
        ORDER_ID, or the order of the thread a reply belongs to.  ``None`` for a
        plain seller email; the policy then finds the order id in the subject
        and first body lines (:func:`bsm_relay.policy.orders.find_order_ids`).
      * ``pair_orders`` -- the orders of this seller-buyer pair the relay loaded:
        at least every order whose id ``find_order_ids`` returns for this
        message, plus all the pair's orders that are not canceled and not
        delivered more than the proactive window ago.  The policy decides which
        of them are "open".

    Counters (``seller_messages_today``, ``seller_orders_30d``) are read by the
    relay from its log before this message is counted: the message being
    decided is *not* included.
    """

    direction: Direction
    now: datetime
    is_reply_to_buyer_thread: bool = False
    order: Order | None = None
    pair_orders: tuple[Order, ...] = ()
    buyer_opted_out: bool = False
    contact_reason: str | None = None
    subject: str = ""
    text_parts: tuple[TextPart, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    parties: Parties = Parties()
    seller_messages_today: int = 0
    seller_orders_30d: int = 0

    @property
    def seller_started(self) -> bool:
        """A seller message that is not a reply on a thread the buyer started."""
        return self.direction is Direction.SELLER_TO_BUYER and not self.is_reply_to_buyer_thread
