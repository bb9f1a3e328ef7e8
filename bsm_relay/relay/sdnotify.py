"""systemd's readiness protocol (sd_notify) in a few lines, without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, an AF_UNIX datagram socket
(a path, or ``@name`` in the abstract namespace); a datagram ``READY=1`` says the
service is up, ``STOPPING=1`` that it is shutting down, ``WATCHDOG=1`` that it is
alive (every half ``$WATCHDOG_USEC``).  Outside systemd every call is a no-op.
A ``serve --workers N`` parent sets ``$NOTIFY_SOCKET`` of its children to its own
socket and speaks to systemd for them (see ``supervisor``).
"""

from __future__ import annotations

import os
import socket


def _address(value: str) -> str | bytes:
    return b"\0" + value[1:].encode() if value.startswith("@") else value


def notify(*fields: str, env: dict[str, str] | None = None) -> bool:
    """Send ``fields`` (``"READY=1"``, ...) as one datagram; False when not under systemd or it failed.

    One non-blocking ``sendto`` on a local socket: cheap enough to call on the event loop.
    """
    target = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not target or not fields:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(fields).encode(), _address(target))
        return True
    except OSError:
        return False


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when no watchdog is set
    for this process (``$WATCHDOG_PID``, when present, must be ours)."""
    env = env if env is not None else dict(os.environ)
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
