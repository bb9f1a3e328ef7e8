"""The relay's key ring: alias keys (with ids, for rotation) and a MAC secret.

Kept in ``<state_dir>/keys/relay-keys.json`` (mode 0600).  The MAC secret feeds the
signed bounce addresses and the keyed digests that stand in for real addresses in
the log.  ``bsm-relay init`` creates the file; ``bsm-relay alias-key rotate`` adds a
new alias key and makes it current while the old ones keep resolving.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .codec import AliasCodec

KEYS_FILE = Path("keys") / "relay-keys.json"


class KeyError_(RuntimeError):
    """The key file is missing or unreadable."""


@dataclass(frozen=True)
class KeyRing:
    alias_keys: dict[int, bytes]
    current: int
    secret: bytes

    def codec(self) -> AliasCodec:
        return AliasCodec(self.alias_keys, self.current)

    def derive(self, purpose: str) -> bytes:
        """An independent sub-key for one purpose (bounce addresses, log digests, ...)."""
        return hmac.new(self.secret, purpose.encode(), hashlib.sha256).digest()


def _path(state_dir: Path) -> Path:
    return state_dir / KEYS_FILE


def _write(path: Path, ring: KeyRing) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {
        "current": ring.current,
        "alias_keys": {str(k): v.hex() for k, v in ring.alias_keys.items()},
        "secret": ring.secret.hex(),
    }
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(state_dir: Path) -> KeyRing:
    path = _path(state_dir)
    try:
        data = json.loads(path.read_text())
        keys = {int(k): bytes.fromhex(v) for k, v in data["alias_keys"].items()}
        return KeyRing(keys, int(data["current"]), bytes.fromhex(data["secret"]))
    except FileNotFoundError:
        raise KeyError_(f"no key file at {path}; run 'bsm-relay init' first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyError_(f"the key file {path} is unreadable: {exc}") from None


def ensure(state_dir: Path) -> tuple[KeyRing, bool]:
    """Load the key ring, creating it if missing. Returns (ring, created)."""
    path = _path(state_dir)
    if path.exists():
        return load(state_dir), False
    ring = KeyRing({1: secrets.token_bytes(64)}, 1, secrets.token_bytes(32))
    _write(path, ring)
    return ring, True


def rotate(state_dir: Path) -> KeyRing:
    old = load(state_dir)
    new_id = max(old.alias_keys) + 1
    if new_id > 255:
        raise KeyError_("no alias key id left (255 keys); retire old ones first")
    keys = dict(old.alias_keys)
    keys[new_id] = secrets.token_bytes(64)
    ring = KeyRing(keys, new_id, old.secret)
    _write(_path(state_dir), ring)
    return ring
