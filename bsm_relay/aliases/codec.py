"""The alias codec: token <-> (direction, seller, buyer), with no table.

A token is ``base32(key_id || AES-SIV(direction || varint(seller) || varint(buyer)))``
in lower case without padding.  AES-SIV is deterministic authenticated encryption:
the same pair always gets the same alias (stable for the life of the pair), any
altered or forged token fails authentication, and two pairs' tokens share nothing
visible, so a buyer's aliases for two sellers cannot be linked.

The ids are the store's internal integer ids, so a token is at most
``1 + 16 + 1 + 10 + 10`` bytes -> 61 base32 characters: it always fits the 64-octet
local-part limit.  Old key ids keep resolving after a new key is added.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

_AAD = [b"bsm-relay alias v1"]
MAX_LOCAL_PART = 64


class Direction(enum.IntEnum):
    """Who the alias is written *to*."""

    TO_BUYER = 1    # the buyer alias: the seller writes to it
    TO_SELLER = 2   # the seller alias: the buyer writes (replies) to it


@dataclass(frozen=True, slots=True)
class AliasRef:
    direction: Direction
    seller_id: int
    buyer_id: int
    key_id: int


def _varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("ids are non-negative")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift <= 63:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


_KEPT = 20_000     # tokens each way a codec keeps (dropped all at once when full): a few MB


class AliasCodec:
    """Encode with the current key; decode with any known key."""

    def __init__(self, keys: Mapping[int, bytes], current: int) -> None:
        if current not in keys:
            raise ValueError("the current alias key id is not among the keys")
        for kid, key in keys.items():
            if not 0 <= kid <= 255:
                raise ValueError("alias key ids are 0..255")
            if len(key) not in (32, 48, 64):
                raise ValueError("AES-SIV keys are 32, 48 or 64 bytes")
        self._ciphers = {kid: AESSIV(key) for kid, key in keys.items()}
        self._current = current
        # AES-SIV is deterministic and the keys of a codec never change: both directions are pure
        # functions, kept for the pairs in use (each costs a cipher call and base32 per message).
        # Only tokens that resolved are kept, so forged ones cannot crowd them out.
        self._encoded: dict[tuple[int, int, int], str] = {}
        self._decoded: dict[str, AliasRef] = {}

    def encode(self, direction: Direction, seller_id: int, buyer_id: int) -> str:
        key = (int(direction), seller_id, buyer_id)
        token = self._encoded.get(key)
        if token is None:
            plain = bytes([direction]) + _varint(seller_id) + _varint(buyer_id)
            sealed = self._ciphers[self._current].encrypt(plain, _AAD)
            raw = bytes([self._current]) + sealed
            token = base64.b32encode(raw).decode("ascii").rstrip("=").lower()
            if len(self._encoded) >= _KEPT:
                self._encoded.clear()
            self._encoded[key] = token
        return token

    def decode(self, token: str) -> AliasRef | None:
        """The pair behind ``token``, or None for anything forged, altered or unknown."""
        ref = self._decoded.get(token)
        if ref is None:
            ref = self._decode(token)
            if ref is not None:
                if len(self._decoded) >= _KEPT:
                    self._decoded.clear()
                self._decoded[token] = ref
        return ref

    def _decode(self, token: str) -> AliasRef | None:
        if not 28 <= len(token) <= MAX_LOCAL_PART or not token.isascii():
            return None
        text = token.upper()
        text += "=" * (-len(text) % 8)
        try:
            raw = base64.b32decode(text)
        except (binascii.Error, ValueError):
            return None
        cipher = self._ciphers.get(raw[0])
        if cipher is None:
            return None
        try:
            plain = cipher.decrypt(raw[1:], _AAD)
        except (InvalidTag, ValueError):
            return None
        try:
            direction = Direction(plain[0])
            seller_id, pos = _read_varint(plain, 1)
            buyer_id, pos = _read_varint(plain, pos)
        except (ValueError, IndexError):
            return None
        if pos != len(plain):
            return None
        # Only the canonical spelling resolves: no alternative encodings of one token.
        if base64.b32encode(raw).decode("ascii").rstrip("=") != token.upper():
            return None
        return AliasRef(direction, seller_id, buyer_id, raw[0])
