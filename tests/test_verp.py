"""Signed bounce addresses (relay/verp.py)."""

from __future__ import annotations

import pytest

from bsm_relay.relay.verp import BOUNCE_PREFIX, BounceAddressCodec, is_bounce_address

KEY = bytes(range(32))
DOMAIN = "marketplace.example"
NOW = 1_767_225_600
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


@pytest.fixture
def codec() -> BounceAddressCodec:
    return BounceAddressCodec(KEY, DOMAIN)


@pytest.mark.parametrize("queue_id", ["q4f9c2a1b7e", "Q", "a" * 20, "MixedCase0123", "0"])
def test_round_trip(codec: BounceAddressCodec, queue_id: str) -> None:
    address = codec.encode(queue_id, now=NOW)
    local, domain = address.split("@")
    assert domain == DOMAIN and local.startswith(BOUNCE_PREFIX)
    assert local == local.lower() and set(local[2:]) <= set(BASE32)
    assert len(local) <= 64
    assert codec.decode(address, now=NOW) == queue_id
    assert codec.decode(address, now=NOW + 29 * 86400) == queue_id


def test_longest_queue_id_fits_the_local_part_limit(codec: BounceAddressCodec) -> None:
    local = codec.encode("Z" * 20, now=NOW).split("@")[0]
    assert len(local) == 58


def test_case_folding_and_trailing_dot_survive(codec: BounceAddressCodec) -> None:
    address = codec.encode("q4f9c2a1b7e", now=NOW)
    assert codec.decode(address.upper(), now=NOW) == "q4f9c2a1b7e"
    assert codec.decode(address.title(), now=NOW) == "q4f9c2a1b7e"
    assert codec.decode(address + ".", now=NOW) == "q4f9c2a1b7e"


def test_every_substituted_character_is_rejected(codec: BounceAddressCodec) -> None:
    address = codec.encode("q4f9c2a1b7e", now=NOW)
    local = address.split("@")[0]
    for position in range(len(BOUNCE_PREFIX), len(local)):
        for replacement in BASE32:
            if replacement == local[position]:
                continue
            forged = local[:position] + replacement + local[position + 1 :] + "@" + DOMAIN
            assert codec.decode(forged, now=NOW) is None, (position, replacement)


def test_every_bit_flip_of_the_payload_is_rejected(codec: BounceAddressCodec) -> None:
    import base64

    local = codec.encode("q4f9c2a1b7e", now=NOW).split("@")[0]
    text = local[len(BOUNCE_PREFIX) :]
    payload = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    for bit in range(len(payload) * 8):
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 1 << (bit % 8)
        forged = BOUNCE_PREFIX + base64.b32encode(bytes(flipped)).decode().rstrip("=").lower()
        assert codec.decode(f"{forged}@{DOMAIN}", now=NOW) is None, bit


def test_truncated_extended_and_malformed_are_rejected(codec: BounceAddressCodec) -> None:
    address = codec.encode("q4f9c2a1b7e", now=NOW)
    local = address.split("@")[0]
    bad = [
        local[:-1] + "@" + DOMAIN,
        local + "a@" + DOMAIN,
        local[:-8] + "@" + DOMAIN,
        "b-@" + DOMAIN,
        "b-" + "a" * 8 + "@" + DOMAIN,
        local[2:] + "@" + DOMAIN,  # no prefix
        "x-" + local[2:] + "@" + DOMAIN,
        local.replace("b-", "b-1", 1) + "@" + DOMAIN,  # not base32
        local + "=@" + DOMAIN,
        local,  # no domain
        "",
        "@" + DOMAIN,
        "b-" + "a" * 70 + "@" + DOMAIN,
        local + "@" + DOMAIN + "@" + DOMAIN,
        "b-\u00e4bc@" + DOMAIN,
    ]
    for address in bad:
        assert codec.decode(address, now=NOW) is None, address


def test_expired_and_future_stamps(codec: BounceAddressCodec) -> None:
    address = codec.encode("q1", now=NOW)
    assert codec.decode(address, now=NOW + 30 * 86400) == "q1"
    assert codec.decode(address, now=NOW + 30 * 86400 + 3600) is None
    assert codec.decode(address, now=NOW - 3600) == "q1"  # a node whose clock is a little behind
    assert codec.decode(address, now=NOW - 3 * 3600) is None
    short = BounceAddressCodec(KEY, DOMAIN, max_age=2 * 3600)
    assert short.decode(short.encode("q1", now=NOW), now=NOW + 2 * 3600) == "q1"
    assert short.decode(short.encode("q1", now=NOW), now=NOW + 3 * 3600) is None


def test_wrong_domain(codec: BounceAddressCodec) -> None:
    address = codec.encode("q1", now=NOW)
    local = address.split("@")[0]
    assert codec.decode(local + "@other.example", now=NOW) is None
    assert codec.decode(local + "@sub." + DOMAIN, now=NOW) is None
    # The domain is inside the MAC too: the same key on another domain does not accept it.
    other = BounceAddressCodec(KEY, "other.example")
    assert other.decode(local + "@other.example", now=NOW) is None


def test_wrong_key_and_rotation(codec: BounceAddressCodec) -> None:
    address = codec.encode("q1", now=NOW)
    new_key = b"\x01" * 32
    assert BounceAddressCodec(new_key, DOMAIN).decode(address, now=NOW) is None
    rotated = BounceAddressCodec(new_key, DOMAIN, old_keys=[KEY])
    assert rotated.decode(address, now=NOW) == "q1"
    assert codec.decode(rotated.encode("q2", now=NOW), now=NOW) is None


@pytest.mark.parametrize("queue_id", ["", "a" * 21, "q-1", "q 1", "q\u00e41", "q1\n"])
def test_encode_rejects_bad_queue_ids(codec: BounceAddressCodec, queue_id: str) -> None:
    with pytest.raises(ValueError):
        codec.encode(queue_id, now=NOW)


def test_short_key_is_refused() -> None:
    with pytest.raises(ValueError):
        BounceAddressCodec(b"short", DOMAIN)


def test_is_bounce_address() -> None:
    assert is_bounce_address("b-abc")
    assert is_bounce_address("B-ABC")
    assert not is_bounce_address("abc")
    assert not is_bounce_address("b")
    assert not is_bounce_address("")
    assert not is_bounce_address("bb-abc")
