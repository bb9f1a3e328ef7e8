"""Structured logging: one event per decision, real addresses redacted.

Events are the closed vocabulary listed in ``EVENTS``; each carries the queue id,
the session id, aliases and internal ids where there are some.  Any value that
looks like an email address outside the alias domain is replaced by a keyed
digest (``addr:3fa9c1d2e0``), stable for one installation, so an operator can
correlate lines without the log ever holding a real address.
JSON lines when stdout is not a terminal, console rendering on a terminal.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

import structlog

EVENTS = frozenset({
    "relay.starting", "relay.started", "relay.stopping", "relay.stopped",
    "smtp.connected", "smtp.disconnected", "smtp.rejected", "smtp.error",
    "message.accepted",
    "delivery.delivered", "delivery.deferred", "delivery.failed", "delivery.error",
    "queue.held", "bounce.received", "bounce.ignored", "store.error", "auth.disabled",
    # process, drain, reload, limits (issue 6)
    "relay.draining", "smtp.timeout", "config.reloaded", "config.reload_failed",
    "worker.started", "worker.exited", "worker.unresponsive",
    # metrics endpoint (issue 6, relay/metrics.py)
    "metrics.started", "metrics.error",
    # queue backpressure (issue 7, relay/backpressure.py): state="on" past [queue] max_depth, "off" again
    "queue.backpressure",
    # a warning or error a library wrote through the standard ``logging`` module (``_Bridge``)
    "library.log",
    # history older than [storage] history_days deleted (relay/history.py)
    "history.purged",
})

_ADDRESS = re.compile(r"[^\s<>\"'(),;:@]+@[A-Za-z0-9.-]+\.?", re.ASCII)


class Redactor:
    def __init__(self, key: bytes, alias_domain: str, enabled: bool = True) -> None:
        self._key = key
        self._keep = "@" + alias_domain.lower()
        self._enabled = enabled
        # The same few addresses come back event after event (a seller, a smarthost's
        # recipients): their digests are kept, a bounded number of them.
        self._digests: dict[str, str] = {}
        self._texts: dict[str, str] = {}     # field value -> its redacted text, as bounded

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:   # a reload: what was kept no longer holds
        self._enabled = value
        self._digests.clear()
        self._texts.clear()

    def address(self, value: str) -> str:
        if not self.enabled or value.lower().rstrip(".").endswith(self._keep):
            return value
        found = self._digests.get(value)
        if found is None:
            if len(self._digests) >= _DIGESTS_KEPT:
                self._digests.clear()
            digest = hmac.new(self._key, value.lower().encode(), hashlib.sha256).hexdigest()[:10]
            found = self._digests[value] = f"addr:{digest}"
        return found

    def text(self, value: str) -> str:
        if "@" not in value:
            return value
        found = self._texts.get(value)
        if found is None:
            found = _ADDRESS.sub(lambda m: self.address(m.group(0)), value)
            if len(value) <= _TEXT_KEPT_CHARS:     # an address, an alias; not a long error text
                if len(self._texts) >= _DIGESTS_KEPT:
                    self._texts.clear()
                self._texts[value] = found
        return found

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            return event
        for key, value in event.items():
            if isinstance(value, str) and "@" in value:
                event[key] = self.text(value)
        return event


class _Watch:
    """First processor of the chain: shows each event to the observers (``relay/metrics``
    counts decisions from them), then drops what is below the configured level.  While
    there are observers the bound logger lets info events through even at level warning,
    so the counts do not depend on what the log writes."""

    def __init__(self, level: int, observers: list[Callable[[dict[str, Any]], None]]) -> None:
        self.level = level
        self.observers = observers

    def __call__(self, _logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
        for observer in self.observers:
            observer(event)
        if _level(name) < self.level:
            raise structlog.DropEvent
        return event


def _level(name: str) -> int:
    return logging.ERROR if name == "exception" else _LEVELS.get(name.upper(), logging.INFO)


_LEVELS = logging.getLevelNamesMapping()     # (a new copy of the mapping on every call)
_DIGESTS_KEPT = 4096
_TEXT_KEPT_CHARS = 320


def _current_watch() -> _Watch | None:
    found = [p for p in structlog.get_config().get("processors", []) if isinstance(p, _Watch)]
    return found[0] if found else None


def observe(observer: Callable[[dict[str, Any]], None]) -> None:
    """Show every event (its dict, before rendering and redaction) to ``observer`` from now on;
    kept when ``configure`` runs again (a reload)."""
    watch = _current_watch()
    if watch is None:
        configure()
        watch = _current_watch()
        assert watch is not None
    watch.observers.append(observer)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(min(watch.level, logging.INFO)))


def configure(fmt: str = "auto", level: str = "info", redactor: Redactor | None = None,
              stream: Any = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    previous = _current_watch()
    watch = _Watch(threshold, previous.observers if previous else [])
    processors: list[Any] = [
        watch,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        # A traceback becomes text before the redactor reads the event: exception messages (a
        # database error's parameters, say) can hold addresses.
        structlog.processors.format_exc_info,
    ]
    if redactor is not None:
        processors.append(redactor)
    processors.append(structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            min(threshold, logging.INFO) if watch.observers else threshold),
        # One write per event, line and newline together: ``print`` writes them separately, and
        # ``serve --workers N`` processes sharing one log file then interleave ("}{" lines).
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _bridge_stdlib_logging()


class _Bridge(logging.Handler):
    """The standard ``logging`` records of the libraries (SQLAlchemy's pool, asyncio, aiosmtpd)
    as ``library.log`` events: the same JSON lines, redacted like ours, instead of plain text
    on stderr that a log shipper cannot parse and the redactor never sees."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info and record.exc_info[1] is not None:
                fields["exc_info"] = record.exc_info
            structlog.get_logger().log(record.levelno, "library.log", **fields)
        except Exception:  # a log line must never break what was being logged
            self.handleError(record)


def _bridge_stdlib_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _Bridge) for h in root.handlers):
        root.addHandler(_Bridge(logging.WARNING))
    root.setLevel(logging.WARNING)
    # aiosmtpd warns for each unknown verb and for the session it then drops; the relay logs
    # that drop itself (smtp.rejected, conn.too_many_junk), so only its errors come through.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def error_line(error: BaseException) -> str:
    """What went wrong, for the log: the driver's message ("database or disk is full") without
    the statement and parameters SQLAlchemy appends on the next lines (they hold message data)."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def get() -> Any:
    return structlog.get_logger()
