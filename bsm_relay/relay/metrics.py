"""Prometheus metrics, counted from the log's decision events and served over HTTP.

Off unless ``[metrics] listen`` is set.  The hot modules know nothing of metrics: a log
observer (``log.observe``) counts the events as they are logged: ``smtp.connected``
(sessions), ``message.accepted`` (its ``accept_wait`` and ``upstream_delay``), ``smtp.rejected`` (by reason
code and stage), ``delivery.delivered`` / ``deferred`` / ``failed`` (and each delivery's
``latency``), ``bounce.received``.  Queue depth and the oldest item's age come from a
periodic async query on the event loop; the group commit's totals are read from the writer's
``CommitStats`` at each scrape.  prometheus-client's HTTP server answers scrapes
from a thread of its own: it only reads the counters, it does no database work.

The metrics live in a registry of their own (never the library's global one), so a test
or a second relay in the same process does not share counters.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..config.settings import Settings, split_host_port
from . import log
from .models import QueueItem
from .queue import CommitStats

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

DEFAULT_PORT = 9125
# From "delivered at once" to "the queue's 5-day lifetime".
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400, 432000)
# End of DATA -> 250: a millisecond when idle, tens under load, seconds when the disk stalls.
ACCEPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Sender-side delays worth telling apart: seconds, minutes, "your provider held it for an hour".
UPSTREAM_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)


@dataclass(frozen=True)
class QueueSummary:
    """What waits for delivery (items not done), by status, and the oldest one's age."""

    by_status: dict[str, int]
    oldest_age: float | None

    @property
    def depth(self) -> int:
        return sum(self.by_status.values())


async def queue_summary(sessions: async_sessionmaker[AsyncSession], now: float | None = None) -> QueueSummary:
    now = time.time() if now is None else now
    async with sessions() as s:
        rows = (await s.execute(select(QueueItem.status, func.count(), func.min(QueueItem.created_at))
                                .where(QueueItem.status != "done").group_by(QueueItem.status))).all()
    oldest = min((r[2] for r in rows if r[2] is not None), default=None)
    return QueueSummary({r[0]: int(r[1]) for r in rows}, None if oldest is None else max(0.0, now - oldest))


class RelayMetrics:
    """The relay's metrics and the log observer that moves them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Imported here: every bsm-relay command imports this module, only serve needs the library.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions = Counter("bsm_relay_smtp_sessions", "SMTP connections accepted", registry=r)
        self.accepted = Counter("bsm_relay_messages_accepted", "Messages accepted and queued (one per queue item)",
                                registry=r)
        self.refused = Counter("bsm_relay_messages_refused", "Refusals in the SMTP session, by reason code and stage",
                               ["reason", "stage"], registry=r)
        self.deliveries = Counter("bsm_relay_deliveries", "Delivery outcomes, one per recipient and attempt",
                                  ["outcome", "kind"], registry=r)
        self.bounces = Counter("bsm_relay_bounces_received", "Reports that came back to a signed bounce address",
                               registry=r)
        self.errors = Counter("bsm_relay_errors", "Internal errors, by log event", ["event"], registry=r)
        self.latency = Histogram("bsm_relay_delivery_latency_seconds", "Seconds from acceptance to delivery",
                                 ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.accept_wait = Histogram("bsm_relay_accept_wait_seconds",
                                     "Seconds from a message's final dot to its 250, the group commit included",
                                     buckets=ACCEPT_BUCKETS, registry=r)
        self.upstream = Histogram("bsm_relay_upstream_delay_seconds",
                                  "Seconds the sender's side held a message before it reached the relay",
                                  buckets=UPSTREAM_BUCKETS, registry=r)
        self.queue_depth = Gauge("bsm_relay_queue_depth", "Queue items waiting for delivery, by status",
                                 ["status"], registry=r)
        self.queue_oldest = Gauge("bsm_relay_queue_oldest_age_seconds",
                                  "Age of the oldest item waiting for delivery (0 when the queue is empty)",
                                  registry=r)
        for status in ("queued", "hold"):
            self.queue_depth.labels(status=status).set(0)
        self.commit_stats: CommitStats | None = None
        r.register(_CommitCollector(self))
        self.task: asyncio.Task[None] | None = None   # the queue poller, held so it is not collected
        self._stopping = asyncio.Event()

    # -- the log observer --------------------------------------------------------------

    def observe(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        if name == "smtp.connected":
            self.sessions.inc()
        elif name == "message.accepted":
            self.accepted.inc()
            wait = event.get("accept_wait")
            if isinstance(wait, (int, float)):
                self.accept_wait.observe(wait)
            delay = event.get("upstream_delay")
            if isinstance(delay, (int, float)):
                self.upstream.observe(delay)
        elif name == "smtp.rejected":
            self.refused.labels(reason=str(event.get("reason") or "unknown"),
                                stage=str(event.get("stage") or "unknown")).inc()
        elif name in ("delivery.delivered", "delivery.deferred", "delivery.failed"):
            kind = str(event.get("kind") or "forward")
            self.deliveries.labels(outcome=name.partition(".")[2], kind=kind).inc()
            latency = event.get("latency")
            if name == "delivery.delivered" and isinstance(latency, (int, float)):
                self.latency.labels(kind=kind).observe(latency)
        elif name == "bounce.received":
            self.bounces.inc()
        elif name in ("store.error", "smtp.error", "delivery.error", "queue.held"):
            self.errors.labels(event=name).inc()

    # -- the queue gauges -----------------------------------------------------------------

    def set_queue(self, summary: QueueSummary) -> None:
        for status in set(summary.by_status) | {"queued", "hold"}:
            self.queue_depth.labels(status=status).set(summary.by_status.get(status, 0))
        self.queue_oldest.set(summary.oldest_age or 0.0)

    async def poll_queue(self, sessions: async_sessionmaker[AsyncSession], interval: float) -> None:
        """Until :meth:`stop`: a count of the queue every ``interval`` seconds.  Stopped between
        two counts, never inside one (a cancel there would cut its connection's rollback off)."""
        logger = log.get()
        while not self._stopping.is_set():
            try:
                self.set_queue(await queue_summary(sessions))
            except Exception as exc:  # database trouble: the gauges keep their last value
                logger.error("metrics.error", stage="queue", error_type=type(exc).__name__)
            try:
                await asyncio.wait_for(self._stopping.wait(), interval)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stopping.set()
        if self.task is not None:
            await self.task


class _CommitCollector:
    """The writer's group commit totals, read when scraped.  ``rate(..._seconds_total)`` near 1
    means this process's writer is always in a transaction or waiting for the write lock: the
    database (its disk's fsync, or the other ``--workers`` processes) is the bottleneck."""

    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []                      # no sample read at registration (the stats come later)

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        stats = self._metrics.commit_stats
        if stats is None:
            return
        yield CounterMetricFamily("bsm_relay_queue_commits", "Group commits of this process's writer",
                                  value=stats.groups)
        yield CounterMetricFamily("bsm_relay_queue_commit_entries",
                                  "Entries in those commits (accepted messages, delivery outcomes, claims)",
                                  value=stats.entries)
        yield CounterMetricFamily("bsm_relay_queue_commit_seconds",
                                  "Seconds inside the group commits' transactions, fsync included",
                                  value=stats.transaction)
        yield CounterMetricFamily("bsm_relay_queue_write_lock_wait_seconds",
                                  "Seconds the writer waited for another serve process's commit",
                                  value=stats.lock_wait)


def start(settings: Settings, relay: Any) -> RelayMetrics | None:
    """Called once by ``serve`` after ``relay.started``: count from now on, serve the endpoint.

    A port already taken (another process of ``serve --workers N`` serves it) is logged and
    the relay goes on without an endpoint of its own: mail matters more than metrics.
    """
    if not settings.metrics.listen:
        return None
    metrics = RelayMetrics()
    metrics.commit_stats = relay.enqueuer.stats
    log.observe(metrics.observe)
    logger = log.get()
    host, port = split_host_port(settings.metrics.listen, DEFAULT_PORT)
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        logger.error("metrics.error", stage="listen", listen=f"{host}:{port}",
                     error=exc.strerror or type(exc).__name__)
        return metrics
    metrics.task = asyncio.get_running_loop().create_task(
        metrics.poll_queue(relay.sessions, settings.metrics.queue_interval), name="metrics-queue")
    logger.info("metrics.started", listen=f"{host}:{port}", path="/metrics")
    return metrics
