"""The relay's tables (SQLAlchemy 2 declarative models).

Times are UNIX seconds as floats: the same comparisons work on SQLite and
PostgreSQL, and the queue's claim query stays one portable UPDATE.
Schema changes go through Alembic (``relay/migrations``), never ``create_all``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Seller(Base):
    __tablename__ = "sellers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ext_id: Mapped[str] = mapped_column(String(128), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    email: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[float] = mapped_column(Float)


class SellerAddress(Base):
    """Messaging Permissions: the seller's other addresses and their status."""

    __tablename__ = "seller_addresses"
    __table_args__ = (UniqueConstraint("seller_id", "address"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seller_id: Mapped[int] = mapped_column(ForeignKey("sellers.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16))          # approved | pending | blocked
    first_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float)


class Buyer(Base):
    __tablename__ = "buyers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ext_id: Mapped[str] = mapped_column(String(128), unique=True)
    email: Mapped[str] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    opt_out: Mapped[bool] = mapped_column(Boolean, default=False)
    locale: Mapped[str] = mapped_column(String(16), default="en")
    created_at: Mapped[float] = mapped_column(Float)


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_pair", "seller_id", "buyer_id"),
                      Index("ix_orders_seller_placed", "seller_id", "placed_at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ext_id: Mapped[str] = mapped_column(String(64), unique=True)
    seller_id: Mapped[int] = mapped_column(ForeignKey("sellers.id", ondelete="CASCADE"))
    buyer_id: Mapped[int] = mapped_column(ForeignKey("buyers.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    category: Mapped[str | None] = mapped_column(String(64), nullable=True)
    placed_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    review_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)


class RevokedAlias(Base):
    __tablename__ = "revoked_aliases"
    token: Mapped[str] = mapped_column(String(64), primary_key=True)
    revoked_at: Mapped[float] = mapped_column(Float)


class ThreadId(Base):
    """Message-ID mapping: the id we minted <-> the id the writer's client made.

    Lets In-Reply-To/References be mapped both ways so threads hold in both clients
    without either side ever seeing the other's host names.
    """

    __tablename__ = "thread_ids"
    __table_args__ = (Index("ix_thread_ids_original", "seller_id", "buyer_id", "original"),)
    minted: Mapped[str] = mapped_column(String(255), primary_key=True)
    original: Mapped[str] = mapped_column(String(255))
    seller_id: Mapped[int] = mapped_column(Integer)
    buyer_id: Mapped[int] = mapped_column(Integer)
    direction: Mapped[int] = mapped_column(Integer)          # codec.Direction of the message
    created_at: Mapped[float] = mapped_column(Float)


class MessageLog(Base):
    """One row per decision on a message: accepted or refused, and why."""

    __tablename__ = "message_log"
    __table_args__ = (Index("ix_message_log_at", "at"), Index("ix_message_log_seller_at", "seller_id", "at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float)
    session_id: Mapped[str] = mapped_column(String(32))
    queue_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    direction: Mapped[int | None] = mapped_column(Integer, nullable=True)
    seller_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    buyer_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    order_ext_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    decision: Mapped[str] = mapped_column(String(16))        # accepted | refused
    reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    size: Mapped[int] = mapped_column(Integer, default=0)
    message_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    proactive: Mapped[bool] = mapped_column(Boolean, default=False)   # seller-started: counts toward the cap
    contact_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    upstream_delay: Mapped[float | None] = mapped_column(Float, nullable=True)   # seconds, see intake


class QueueItem(Base):
    """One outbound message (one rendering) waiting for delivery."""

    __tablename__ = "queue"
    __table_args__ = (Index("ix_queue_due", "status", "next_attempt_at"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))            # forward | postmaster | notice
    envelope_from: Mapped[str] = mapped_column(String(320))  # "" is the null sender
    origin_sender: Mapped[str | None] = mapped_column(String(320), nullable=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))          # queued | hold | done
    errors: Mapped[int] = mapped_column(Integer, default=0)  # processing failures (not delivery failures)
    delay_notified: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    session_id: Mapped[str | None] = mapped_column(String(32), nullable=True)   # the SMTP session it came in
    # A large message lives in this file (relative to the state directory); body is its header block.
    spool_path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Set when spool_path is a segment of several messages: this one is ``size`` bytes from here.
    spool_offset: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class QueueRecipient(Base):
    __tablename__ = "queue_recipients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue_id: Mapped[str] = mapped_column(ForeignKey("queue.id", ondelete="CASCADE"), index=True)
    address: Mapped[str] = mapped_column(String(320))        # the real recipient
    alias: Mapped[str] = mapped_column(String(320))          # what the sender wrote to
    status: Mapped[str] = mapped_column(String(16))          # pending | delivered | failed
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class MessageEvent(Base):
    """What happened to a queued message after acceptance, for ``bsm-relay trace`` and ``stats``.

    Written in the transaction that records it (``queue.record_attempt`` and friends);
    ``detail`` is JSON text with aliases and reply codes only, never a real address.
    """

    __tablename__ = "message_events"
    __table_args__ = (Index("ix_message_events_queue_id", "queue_id"), Index("ix_message_events_at", "at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[float] = mapped_column(Float)
    event: Mapped[str] = mapped_column(String(32))   # delivery.attempt | delivery.error | dsn.queued | bounce.received
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class FactsGeneration(Base):
    """One row: a counter the database's triggers bump whenever a cached fact changes
    (migration 0004; read by ``relay/factcache.py``)."""

    __tablename__ = "facts_generation"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
