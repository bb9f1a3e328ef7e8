"""The retry schedule, Postfix-like: pure functions of the attempt count and the clock.

First retry after ``min_backoff`` seconds, doubling up to ``max_backoff``; give up after
``max_lifetime``; a delay notice once an item has waited ``delay_warning`` seconds.
"""

from __future__ import annotations

import re

from ..config.settings import QueueSettings

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def backoff(attempts: int, q: QueueSettings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
    if attempts < 1:
        return 0.0
    return float(min(q.max_backoff, q.min_backoff * 2 ** min(attempts - 1, 32)))


def expired(created_at: float, now: float, q: QueueSettings) -> bool:
    return now - created_at >= q.max_lifetime


def delay_notice_due(created_at: float, now: float, already_sent: bool, q: QueueSettings) -> bool:
    return q.delay_warning > 0 and not already_sent and now - created_at >= q.delay_warning


def enhanced_status(reply: str, permanent: bool) -> str:
    """The RFC 3463 status in a reply text, or a generic one of the right class."""
    m = _ENHANCED.search(reply)
    if m and (m.group(1) == "5") == permanent:
        return m.group(0)
    if reply[:1] in ("4", "5") and (reply[:1] == "5") == permanent:
        return f"{reply[0]}.0.0"
    return "5.0.0" if permanent else "4.0.0"
