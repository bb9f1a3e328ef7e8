"""Signed bounce addresses: the envelope sender of every forwarded message (VERP style).

relay/delivery sends each message with ``MAIL FROM:<b-<payload>@<alias domain>>``; a downstream
bounce then comes back to our own domain, relay/smtpd recognises the prefix at RCPT
(:func:`is_bounce_address`) and :meth:`BounceAddressCodec.decode` gives back the queue id, so the
bounce can be turned into our DSN to the original sender in aliases (relay/bounce).

The payload is ``hours since the epoch (3 bytes) || queue id (1-20 bytes) || MAC (12 bytes)``,
lowercase base32 without padding, so it survives MTAs that fold the case of local parts, and the
longest (20-byte id) fits in 2 + 56 = 58 of the 64 octets a local part may have. The MAC is
HMAC-SHA256 over a fixed label, the domain and the rest of the payload, truncated to 96 bits:
forging a bounce address is as hard as guessing it. Nothing here is secret, only unforgeable; the
queue id is visible to the downstream, which is fine as it says nothing about either party.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Sequence

__all__ = ["BOUNCE_PREFIX", "BounceAddressCodec", "is_bounce_address"]

BOUNCE_PREFIX = "b-"  # alias tokens are bare base32, so they never contain "-"

_MAC_LEN = 12
_STAMP_LEN = 3  # hours since 1970 fit three bytes until the year 3883
_MAX_QUEUE_ID = 20
_MAX_LOCAL_PART = 64
_CLOCK_SKEW_HOURS = 1  # stamps this far in the future are accepted (clocks of several nodes)
_QUEUE_ID = re.compile(rf"[A-Za-z0-9]{{1,{_MAX_QUEUE_ID}}}")
_BASE32 = re.compile(r"[a-z2-7]+")
_LABEL = b"bsm-relay bounce address v1\0"


def is_bounce_address(local_part: str) -> bool:
    """Whether RCPT to this local part is meant for the bounce handler (case-insensitive)."""
    return local_part[: len(BOUNCE_PREFIX)].lower() == BOUNCE_PREFIX


class BounceAddressCodec:
    """Makes and checks bounce addresses for one alias domain.

    ``old_keys`` are still accepted by :meth:`decode` (never used to encode), so a key can be
    rotated without losing the bounces of messages sent in the last ``max_age`` seconds.
    """

    def __init__(self, key: bytes, domain: str, max_age: int = 30 * 86400, *, old_keys: Sequence[bytes] = ()) -> None:
        if len(key) < 16:
            raise ValueError("bounce address key must be at least 16 bytes")
        self._keys = (key, *old_keys)
        self.domain = domain.rstrip(".").lower()
        self._domain_bytes = self.domain.encode("idna")
        self.max_age = max_age

    def _mac(self, key: bytes, signed: bytes) -> bytes:
        return hmac.new(key, _LABEL + self._domain_bytes + b"\0" + signed, hashlib.sha256).digest()[:_MAC_LEN]

    def encode(self, queue_id: str, now: int | None = None) -> str:
        """The envelope sender address for a message of this queue item."""
        if not _QUEUE_ID.fullmatch(queue_id):
            raise ValueError(f"queue id must be 1-{_MAX_QUEUE_ID} ASCII letters or digits: {queue_id!r}")
        hours = int(time.time() if now is None else now) // 3600
        signed = hours.to_bytes(_STAMP_LEN, "big") + queue_id.encode("ascii")
        payload = signed + self._mac(self._keys[0], signed)
        local = BOUNCE_PREFIX + base64.b32encode(payload).decode("ascii").rstrip("=").lower()
        assert len(local) <= _MAX_LOCAL_PART
        return f"{local}@{self.domain}"

    def decode(self, address: str, now: int | None = None) -> str | None:
        """The queue id of a valid bounce address; None if malformed, forged, expired or foreign."""
        local, at, domain = address.rpartition("@")
        if not at or domain.rstrip(".").lower() != self.domain or len(local) > _MAX_LOCAL_PART:
            return None
        if not is_bounce_address(local):
            return None
        text = local[len(BOUNCE_PREFIX) :].lower()
        if not _BASE32.fullmatch(text):
            return None
        try:
            payload = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
        except binascii.Error:
            return None
        # base32 leaves unused low bits in the last character; insisting on the one canonical
        # spelling means no two addresses decode to the same payload.
        if base64.b32encode(payload).decode("ascii").rstrip("=").lower() != text:
            return None
        if len(payload) < _STAMP_LEN + 1 + _MAC_LEN:
            return None
        signed, mac = payload[:-_MAC_LEN], payload[-_MAC_LEN:]
        # Every key is tried even after a match, so the time taken says nothing about which one.
        valid = False
        for key in self._keys:
            valid |= hmac.compare_digest(mac, self._mac(key, signed))
        if not valid:
            return None
        hours = int.from_bytes(signed[:_STAMP_LEN], "big")
        now_hours = int(time.time() if now is None else now) // 3600
        if hours > now_hours + _CLOCK_SKEW_HOURS or (now_hours - hours) * 3600 > self.max_age:
            return None
        queue_id = signed[_STAMP_LEN:].decode("ascii", "replace")
        return queue_id if _QUEUE_ID.fullmatch(queue_id) else None
