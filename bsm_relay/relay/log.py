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
from typing import Any

import structlog

EVENTS = frozenset({
    "relay.starting", "relay.started", "relay.stopping", "relay.stopped",
    "smtp.connected", "smtp.disconnected", "smtp.rejected", "smtp.error",
    "message.accepted",
    "delivery.delivered", "delivery.deferred", "delivery.failed", "delivery.error",
    "queue.held", "bounce.received", "bounce.ignored", "store.error", "auth.disabled",
})

_ADDRESS = re.compile(r"[^\s<>\"'(),;:@]+@[A-Za-z0-9.-]+\.?", re.ASCII)


class Redactor:
    def __init__(self, key: bytes, alias_domain: str, enabled: bool = True) -> None:
        self._key = key
        self._keep = "@" + alias_domain.lower()
        self.enabled = enabled

    def address(self, value: str) -> str:
        if not self.enabled or value.lower().rstrip(".").endswith(self._keep):
            return value
        digest = hmac.new(self._key, value.lower().encode(), hashlib.sha256).hexdigest()[:10]
        return f"addr:{digest}"

    def text(self, value: str) -> str:
        if "@" not in value:
            return value
        return _ADDRESS.sub(lambda m: self.address(m.group(0)), value)

    def __call__(self, _logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            return event
        for key, value in event.items():
            if isinstance(value, str) and "@" in value:
                event[key] = self.text(value)
        return event


def configure(fmt: str = "auto", level: str = "info", redactor: Redactor | None = None,
              stream: Any = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    if redactor is not None:
        processors.append(redactor)
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get() -> Any:
    return structlog.get_logger()
