"""Queries on the marketplace's facts: sellers, their addresses, buyers, orders,
revoked aliases and the Message-ID map.  Every function is async and runs through
the async engine, so no database work ever blocks the event loop.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, CursorResult, Table, bindparam, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..policy.senders import SenderStatus
from .factcache import FactsCache
from .models import Buyer, MessageLog, Order, RevokedAlias, Seller, SellerAddress, ThreadId
from .queue import execute_rows, insert_of

T = TypeVar("T")
_DAY = 86400.0
_COUNT_FRESH = 0.5       # seconds a proactive count read from the database is used (far from the cap)


_SENDERS = cast(Table, SellerAddress.__table__)
_COUNT_ATTEMPT = (_SENDERS.update().where(_SENDERS.c.seller_id == bindparam("b_seller"),
                                          func.lower(_SENDERS.c.address) == bindparam("b_address"))
                  .values(attempts=_SENDERS.c.attempts + 1, last_seen=bindparam("b_now")))


def _count_margin(cap: int) -> int:
    return max(10, cap // 10)


_FULL_RECOUNT = 60.0      # seconds between two whole-day proactive counts (in between: new rows only)


@dataclass(slots=True)
class _DayCount:
    """A seller's proactive count of the day as read from the database, and this process's own
    acceptances since (``noted``: committed here, not yet read back)."""
    since: float
    counted: int
    last_id: int          # the highest message_log id the count has seen
    full_at: float        # monotonic time of the last whole-day count
    read_at: float
    noted: int = 0

    @property
    def total(self) -> int:
        return self.counted + self.noted


def _proactive_count(seller_id: int, since: float, cap: int | None, after_id: int | None = None) -> Any:
    """(count, highest id) of the seller's proactive acceptances since ``since``: at most
    ``cap + 1`` of them (what the rule needs), or those after ``after_id``."""
    log = MessageLog.__table__.c
    rows = select(log.id).where(log.seller_id == seller_id, log.at >= since,
                                log.proactive.is_(True), log.decision == "accepted")
    if after_id is not None:
        rows = rows.where(log.id > after_id)
    if cap is not None:
        rows = rows.limit(cap + 1)
    bounded = rows.subquery()
    return select(func.count(), func.max(bounded.c.id))

ORDER_STATUSES = ("pending", "unshipped", "shipped", "delivered", "canceled")
ADDRESS_STATUSES = ("approved", "pending", "blocked")


class StoreError(ValueError):
    """A refused change (unknown seller, duplicate id, ...); the message is for the operator."""


@dataclass(frozen=True)
class SellerRow:
    id: int
    ext_id: str
    name: str
    email: str


@dataclass(frozen=True)
class BuyerRow:
    id: int
    ext_id: str
    email: str
    name: str | None
    opt_out: bool
    locale: str


def normalize_address(address: str) -> str:
    local, _, domain = address.strip().rpartition("@")
    return f"{local}@{domain.lower().rstrip('.')}" if local else address.strip().lower()


class Store:
    """``cache``: the serving relay's :class:`FactsCache` (None: every read goes to the database)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], cache: FactsCache | None = None) -> None:
        self.sessions = sessions
        self.cache = cache
        self._proactive: dict[int, _DayCount] = {}       # seller -> the day's proactive count
        self._counting: dict[int, asyncio.Future[int]] = {}   # seller -> the count being read

    async def _cached(self, key: tuple[Any, ...], load: Callable[[], Awaitable[T]]) -> T:
        return await (self.cache.get(key, load) if self.cache is not None else load())

    # -- sellers -----------------------------------------------------------------
    async def add_seller(self, ext_id: str, name: str, email: str) -> SellerRow:
        async with self.sessions.begin() as s:
            row = Seller(ext_id=ext_id, name=name, email=normalize_address(email), created_at=time.time())
            s.add(row)
            try:
                await s.flush()
            except IntegrityError:
                raise StoreError(f"seller {ext_id} already exists") from None
            return _seller(row)

    async def seller(self, *, id: int | None = None, ext_id: str | None = None) -> SellerRow | None:
        async with self.sessions() as s:
            stmt = select(Seller).where(Seller.id == id if id is not None else Seller.ext_id == ext_id)
            row = (await s.execute(stmt)).scalar_one_or_none()
            return _seller(row) if row else None

    async def require_seller(self, ext_id: str) -> SellerRow:
        row = await self.seller(ext_id=ext_id)
        if row is None:
            raise StoreError(f"no seller {ext_id}")
        return row

    # -- Messaging Permissions -------------------------------------------------
    async def sender_status(self, seller: SellerRow, address: str) -> SenderStatus:
        address = normalize_address(address)
        if address.lower() == seller.email.lower():
            return SenderStatus.PRIMARY

        async def load() -> SenderStatus:
            async with self.sessions() as s:
                stmt = select(SellerAddress.status).where(
                    SellerAddress.seller_id == seller.id, func.lower(SellerAddress.address) == address.lower())
                status = (await s.execute(stmt)).scalar_one_or_none()
            return SenderStatus(status) if status else SenderStatus.UNKNOWN
        return await self._cached(("status", seller.id, address.lower()), load)

    def attempt_recorder(self, seller_id: int, address: str) -> Callable[[Connection], None]:
        """An unapproved address tried to send: record it as pending (or count the try), as work
        for a transaction someone else runs (the relay's writer, with the refusal's log row)."""
        address = normalize_address(address)

        def work(conn: Connection) -> None:
            now = time.time()
            known = [{"b_seller": seller_id, "b_address": address.lower(), "b_now": now}]
            if not execute_rows(conn, _COUNT_ATTEMPT, known):
                values = {"seller_id": seller_id, "address": address, "status": "pending", "first_seen": now,
                          "last_seen": now, "attempts": 1, "updated_at": now}
                execute_rows(conn, insert_of(_SENDERS), [values], frozenset(values))
        return work

    async def set_sender_status(self, seller_ext_id: str, address: str, status: str, *,
                                max_approved: int = 0) -> None:
        """Approve or block an address (new or known); ``max_approved`` > 0 caps approved addresses.

        Only the seller decides ``approved``/``blocked``; ``pending`` is what the relay records
        for an unknown address that tried to send, so it cannot be set by hand.
        """
        if status not in ("approved", "blocked"):
            raise StoreError("an address can only be approved or blocked (pending is set by the relay)")
        seller = await self.require_seller(seller_ext_id)
        address = normalize_address(address)
        if "@" not in address:
            raise StoreError(f"{address!r} is not an email address")
        if address.lower() == seller.email.lower():
            raise StoreError("the primary address is always approved")
        now = time.time()
        async with self.sessions.begin() as s:
            if status == "approved" and max_approved > 0:
                # Checked in the same transaction as the change; re-approving an approved address is free.
                others = (await s.execute(select(func.count()).select_from(SellerAddress).where(
                    SellerAddress.seller_id == seller.id, SellerAddress.status == "approved",
                    func.lower(SellerAddress.address) != address.lower()))).scalar_one()
                if others >= max_approved:
                    raise StoreError(
                        f"seller {seller_ext_id} already has {others} approved addresses besides the primary "
                        f"address, the limit ([auth] max_approved_senders = {max_approved}); block one "
                        "of them first")
            updated = await s.execute(
                update(SellerAddress)
                .where(SellerAddress.seller_id == seller.id,
                       func.lower(SellerAddress.address) == address.lower())
                .values(status=status, updated_at=now))
            if cast(CursorResult[Any], updated).rowcount == 0:
                s.add(SellerAddress(seller_id=seller.id, address=address, status=status,
                                    first_seen=None, last_seen=None, attempts=0, updated_at=now))

    async def delete_sender(self, seller_ext_id: str, address: str) -> None:
        """Forget a pending address.  Approved and blocked ones stay: a decision the seller made
        is only ever switched (approve <-> block), so a blocked address cannot come back as new."""
        seller = await self.require_seller(seller_ext_id)
        address = normalize_address(address)
        if address.lower() == seller.email.lower():
            raise StoreError("the primary address is always approved and cannot be deleted")
        match = (SellerAddress.seller_id == seller.id, func.lower(SellerAddress.address) == address.lower())
        async with self.sessions.begin() as s:
            deleted = await s.execute(delete(SellerAddress).where(*match, SellerAddress.status == "pending"))
            if cast(CursorResult[Any], deleted).rowcount:
                return
            status = (await s.execute(select(SellerAddress.status).where(*match))).scalar_one_or_none()
        if status is None:
            raise StoreError(f"seller {seller_ext_id} has no address {address}")
        other, verb = ("blocked", "block") if status == "approved" else ("approved", "approve")
        raise StoreError(
            f"{address} is {status} and cannot be deleted: only pending addresses can be deleted. "
            f"Switch it to {other} instead (bsm-relay sender {verb} {seller_ext_id} {address})")

    async def list_senders(self, seller_ext_id: str, status: str | None = None) -> list[dict[str, object]]:
        seller = await self.require_seller(seller_ext_id)
        rows: list[dict[str, object]] = []
        if status in (None, "approved"):
            rows.append({"address": seller.email, "status": "approved", "primary": True,
                         "first_seen": None, "last_seen": None, "attempts": 0})
        async with self.sessions() as s:
            stmt = select(SellerAddress).where(SellerAddress.seller_id == seller.id)
            if status:
                stmt = stmt.where(SellerAddress.status == status)
            for a in (await s.execute(stmt.order_by(SellerAddress.address))).scalars():
                rows.append({"address": a.address, "status": a.status, "primary": False,
                             "first_seen": a.first_seen, "last_seen": a.last_seen, "attempts": a.attempts})
        return rows

    # -- buyers and orders -----------------------------------------------------
    async def add_buyer(self, ext_id: str, email: str, name: str | None = None,
                        opt_out: bool = False, locale: str = "en") -> BuyerRow:
        async with self.sessions.begin() as s:
            row = Buyer(ext_id=ext_id, email=normalize_address(email), name=name, opt_out=opt_out,
                        locale=locale, created_at=time.time())
            s.add(row)
            try:
                await s.flush()
            except IntegrityError:
                raise StoreError(f"buyer {ext_id} already exists") from None
            return _buyer(row)

    async def buyer(self, *, id: int | None = None, ext_id: str | None = None) -> BuyerRow | None:
        async with self.sessions() as s:
            stmt = select(Buyer).where(Buyer.id == id if id is not None else Buyer.ext_id == ext_id)
            row = (await s.execute(stmt)).scalar_one_or_none()
            return _buyer(row) if row else None

    async def require_buyer(self, ext_id: str) -> BuyerRow:
        row = await self.buyer(ext_id=ext_id)
        if row is None:
            raise StoreError(f"no buyer {ext_id}")
        return row

    async def add_order(self, ext_id: str, seller_ext_id: str, buyer_ext_id: str, status: str,
                        category: str | None = None, placed_at: float | None = None,
                        delivered_at: float | None = None) -> None:
        if status not in ORDER_STATUSES:
            raise StoreError(f"status must be one of {', '.join(ORDER_STATUSES)}")
        seller = await self.require_seller(seller_ext_id)
        buyer = await self.require_buyer(buyer_ext_id)
        now = time.time()
        async with self.sessions.begin() as s:
            s.add(Order(ext_id=ext_id, seller_id=seller.id, buyer_id=buyer.id, status=status,
                        category=category, placed_at=placed_at or now, delivered_at=delivered_at,
                        updated_at=now))
            try:
                await s.flush()
            except IntegrityError:
                raise StoreError(f"order {ext_id} already exists") from None

    async def set_order_status(self, ext_id: str, status: str, delivered_at: float | None = None) -> None:
        if status not in ORDER_STATUSES:
            raise StoreError(f"status must be one of {', '.join(ORDER_STATUSES)}")
        values: dict[str, object] = {"status": status, "updated_at": time.time()}
        if delivered_at is not None:
            values["delivered_at"] = delivered_at
        async with self.sessions.begin() as s:
            res = await s.execute(update(Order).where(Order.ext_id == ext_id).values(**values))
            if cast(CursorResult[Any], res).rowcount == 0:
                raise StoreError(f"no order {ext_id}")

    async def orders_of_pair(self, seller_id: int, buyer_id: int) -> Sequence[Order]:
        async with self.sessions() as s:
            stmt = (select(Order).where(Order.seller_id == seller_id, Order.buyer_id == buyer_id)
                    .order_by(Order.placed_at.desc()))
            return list((await s.execute(stmt)).scalars())

    async def is_empty(self) -> bool:
        async with self.sessions() as s:
            return (await s.execute(select(func.count()).select_from(Seller))).scalar_one() == 0

    async def resolve_pair(self, seller_id: int, buyer_id: int, token: str) -> tuple[SellerRow, BuyerRow] | None:
        """The pair behind an authenticated token, unless revoked: read at RCPT time, where the
        facts cache is refreshed for the message (one shared read of the change counter)."""
        async def load() -> tuple[SellerRow, BuyerRow] | None:
            async with self.sessions() as s:
                if await s.get(RevokedAlias, token.lower()) is not None:
                    return None
                seller = await s.get(Seller, seller_id)
                buyer = await s.get(Buyer, buyer_id)
                if seller is None or buyer is None:
                    return None
                return _seller(seller), _buyer(buyer)
        if self.cache is not None:
            await self.cache.refresh()
        return await self._cached(("pair", seller_id, buyer_id, token.lower()), load)

    # -- aliases ------------------------------------------------------------------
    async def is_revoked(self, token: str) -> bool:
        async with self.sessions() as s:
            return (await s.get(RevokedAlias, token.lower())) is not None

    async def revoke(self, token: str) -> None:
        async with self.sessions.begin() as s:
            if await s.get(RevokedAlias, token.lower()) is None:
                s.add(RevokedAlias(token=token.lower(), revoked_at=time.time()))

    # -- the Message-ID map ----------------------------------------------------------
    async def map_thread_ids(self, seller_id: int, buyer_id: int, ids: Sequence[str]) -> dict[str, str]:
        """For ids the writer's client put in In-Reply-To/References, the id the *reader* knows.

        An id we minted maps back to the original it stands for; an original we have
        seen (the writer's own earlier message) maps to the id we minted for it.
        Unknown ids are left out: they could carry a foreign host name.
        """
        if not ids:
            return {}
        found: dict[str, str] = {}
        async with self.sessions() as s:
            minted = await s.execute(select(ThreadId).where(
                ThreadId.minted.in_(ids), ThreadId.seller_id == seller_id, ThreadId.buyer_id == buyer_id))
            for row in minted.scalars():
                found[row.minted] = row.original
            rest = [i for i in ids if i not in found]
            if rest:
                originals = await s.execute(select(ThreadId).where(
                    ThreadId.original.in_(rest), ThreadId.seller_id == seller_id,
                    ThreadId.buyer_id == buyer_id))
                for row in originals.scalars():
                    found.setdefault(row.original, row.minted)
        return found

    async def thread_started_by(self, seller_id: int, buyer_id: int, minted_ids: Sequence[str]) -> int | None:
        """The direction of the earliest known message among ``minted_ids`` (who started the thread)."""
        if not minted_ids:
            return None
        async with self.sessions() as s:
            row = (await s.execute(select(ThreadId.direction).where(
                ThreadId.minted.in_(minted_ids), ThreadId.seller_id == seller_id,
                ThreadId.buyer_id == buyer_id).order_by(ThreadId.created_at).limit(1))).first()
        return row[0] if row else None

    # -- marketplace rules --------------------------------------------------------------
    # The facts policy/rules.py asks for, read per message by relay/marketplace.py and by
    # the send / review-request / reasons commands.
    async def order(self, ext_id: str) -> Order | None:
        async with self.sessions() as s:
            return (await s.execute(select(Order).where(Order.ext_id == ext_id))).scalar_one_or_none()

    async def seller_addresses(self, seller_id: int) -> list[str]:
        """Every address recorded for a seller, whatever its status (masked out of bodies)."""
        async with self.sessions() as s:
            rows = await s.execute(select(SellerAddress.address).where(SellerAddress.seller_id == seller_id))
            return [r[0] for r in rows]

    async def proactive_count_since(self, seller_id: int, since: float) -> int:
        """Seller-started messages accepted since ``since`` (the volume cap's count)."""
        async with self.sessions() as s:
            stmt = select(func.count()).select_from(MessageLog).where(
                MessageLog.seller_id == seller_id, MessageLog.at >= since,
                MessageLog.proactive.is_(True), MessageLog.decision == "accepted")
            return int((await s.execute(stmt)).scalar_one())

    async def seller_orders_since(self, seller_id: int, since: float) -> int:
        async with self.sessions() as s:
            stmt = select(func.count()).select_from(Order).where(
                Order.seller_id == seller_id, Order.placed_at >= since)
            return int((await s.execute(stmt)).scalar_one())

    async def policy_facts(self, seller_id: int, buyer_id: int, proactive_since: float,
                           orders_since: float, cap_for: Callable[[int], int]) -> PairFacts:
        """Everything the marketplace rules read about a pair: this runs for every message.

        Addresses, the pair's orders and the seller's recent orders come from the facts cache
        when the relay serves; the day's proactive count from :meth:`_proactive_today`.  That count
        goes only up to the cap plus one (``cap_for(orders in the window)``): all the rule needs,
        and its cost stays bounded for a busy seller."""
        async def addresses() -> list[str]:
            async with self.sessions() as s:
                return [r[0] for r in await s.execute(
                    select(SellerAddress.address).where(SellerAddress.seller_id == seller_id))]

        async def pair_orders() -> list[Order]:
            async with self.sessions() as s:
                return list((await s.execute(
                    select(Order).where(Order.seller_id == seller_id, Order.buyer_id == buyer_id)
                    .order_by(Order.placed_at.desc()))).scalars())

        address_list = await self._cached(("addresses", seller_id), addresses)
        orders = await self._cached(("orders", seller_id, buyer_id), pair_orders)
        recent = await self._recent_orders(seller_id, orders_since)
        proactive = await self._proactive_today(seller_id, proactive_since, cap_for(recent))
        return PairFacts(address_list, orders, proactive, recent)

    async def _proactive_today(self, seller_id: int, since: float, cap: int) -> int:
        """The seller's proactive messages accepted since ``since``, counted up to ``cap + 1``.

        Serving, a seller far below the cap is counted from the database at most every
        ``_COUNT_FRESH`` seconds, plus what this process accepted since (:meth:`note_proactive`);
        within ``_count_margin(cap)`` of the cap every message counts again.  A count reads only
        the rows after the last one it saw (their ids), and the whole day again every
        ``_FULL_RECOUNT`` seconds, so its cost follows the new rows, not the day's volume; one
        count per seller runs at a time, the messages that ask meanwhile share it.  Like the
        exact count, it cannot see messages other processes are accepting at the same instant."""
        if self.cache is None:            # a command: one exact count in its own session
            async with self.sessions.kw["bind"].connect() as conn:
                return int((await conn.execute(_proactive_count(seller_id, since, cap))).one()[0])
        known = self._proactive.get(seller_id)
        now = time.monotonic()
        if (known is not None and known.since == since and now - known.read_at < _COUNT_FRESH
                and known.total + _count_margin(cap) < cap):
            return known.total
        running = self._counting.get(seller_id)
        if running is None:
            running = asyncio.ensure_future(self._count_proactive(seller_id, since, cap, known, now))
            self._counting[seller_id] = running
            running.add_done_callback(lambda done: self._count_done(seller_id, done))
        return await asyncio.shield(running)

    def _count_done(self, seller_id: int, done: asyncio.Future[int]) -> None:
        self._counting.pop(seller_id, None)
        if not done.cancelled():
            done.exception()      # retrieved: the messages that asked raise it (or all went away)

    async def _count_proactive(self, seller_id: int, since: float, cap: int, known: _DayCount | None,
                               now: float) -> int:
        assert self.cache is not None
        if known is not None and known.since == since and now - known.full_at < _FULL_RECOUNT:
            added, top = tuple((await self.cache.reads.all(_proactive_count(seller_id, since, None, known.last_id)))[0])
            fresh = _DayCount(since, known.counted + int(added), top if top is not None else known.last_id,
                              known.full_at, now)
        else:
            counted, top = tuple((await self.cache.reads.all(_proactive_count(seller_id, since, cap)))[0])
            fresh = _DayCount(since, int(counted), top if top is not None else 0, now, now)
        if len(self._proactive) > 100_000:
            self._proactive.clear()
        self._proactive[seller_id] = fresh
        return fresh.total

    def note_proactive(self, seller_id: int, at: float) -> None:
        """A proactive message of the seller, accepted at ``at``, was just committed here."""
        known = self._proactive.get(seller_id)
        if known is not None and known.since <= at < known.since + _DAY:
            known.noted += 1

    async def _recent_orders(self, seller_id: int, since: float) -> int:
        """How many orders the seller received since ``since``.  Cached as the placing times of
        the seller's orders from a day before the window on, so the count stays exact as the
        window slides; a window reaching further back than what was read loads again."""
        async def load(start: float) -> tuple[float, list[float]]:
            async with self.sessions() as s:
                times = sorted(r[0] for r in await s.execute(select(Order.placed_at).where(
                    Order.seller_id == seller_id, Order.placed_at >= start)))
            return start, times

        start, times = await self._cached(("placed", seller_id), lambda: load(since - _DAY))
        if since < start:
            start, times = await load(since)
        return len(times) - bisect_left(times, since)

    async def claim_review_request(self, ext_id: str, at: float) -> bool:
        """Mark the order's review request as sent, unless it already was (one per order)."""
        async with self.sessions.begin() as s:
            res = await s.execute(update(Order).where(
                Order.ext_id == ext_id, Order.review_requested_at.is_(None)).values(review_requested_at=at))
            return bool(cast(CursorResult[Any], res).rowcount)

    async def release_review_request(self, ext_id: str, at: float) -> None:
        """Undo :meth:`claim_review_request` when the request was not sent after all."""
        async with self.sessions.begin() as s:
            await s.execute(update(Order).where(
                Order.ext_id == ext_id, Order.review_requested_at == at).values(review_requested_at=None))


@dataclass(frozen=True)
class PairFacts:
    seller_addresses: list[str]
    orders: list[Order]
    proactive_today: int
    seller_orders_recent: int


def _seller(row: Seller) -> SellerRow:
    return SellerRow(row.id, row.ext_id, row.name, row.email)


def _buyer(row: Buyer) -> BuyerRow:
    return BuyerRow(row.id, row.ext_id, row.email, row.name, row.opt_out, row.locale)


__all__ = ["Store", "StoreError", "SellerRow", "BuyerRow", "ORDER_STATUSES", "normalize_address"]
