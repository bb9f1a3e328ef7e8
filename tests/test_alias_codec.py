"""The alias codec: round trip, tampering, case folding, key rotation, the 64-octet limit."""

from __future__ import annotations

import secrets

import pytest

from bsm_relay.aliases import keys as keyring
from bsm_relay.aliases.codec import AliasCodec, AliasRef, Direction
from bsm_relay.aliases.routing import Kind, route


@pytest.fixture
def codec() -> AliasCodec:
    return AliasCodec({1: secrets.token_bytes(64)}, 1)


@pytest.mark.parametrize("seller,buyer", [(0, 0), (1, 1), (7, 123456), (2**32, 2**40), (2**64 - 1, 2**64 - 1)])
@pytest.mark.parametrize("direction", list(Direction))
def test_round_trip_and_limit(codec, direction, seller, buyer):
    token = codec.encode(direction, seller, buyer)
    assert len(token) <= 64
    assert token == token.lower() and token.isalnum()
    ref = codec.decode(token)
    assert ref is not None
    assert (ref.direction, ref.seller_id, ref.buyer_id) == (direction, seller, buyer)


def test_stable_for_a_pair_and_unlinkable(codec):
    a = codec.encode(Direction.TO_BUYER, 1, 5)
    assert a == codec.encode(Direction.TO_BUYER, 1, 5)
    # The same buyer with two sellers, and the two directions of one pair, share no visible part.
    b = codec.encode(Direction.TO_BUYER, 2, 5)
    c = codec.encode(Direction.TO_SELLER, 1, 5)
    for other in (b, c):
        assert a[2:] != other[2:]
        common_prefix = next(i for i, (x, y) in enumerate(zip(a[2:], other[2:], strict=False)) if x != y)
        assert common_prefix < 4


def test_case_folding(codec):
    token = codec.encode(Direction.TO_SELLER, 3, 4)
    assert codec.decode(token.upper()) == codec.decode(token)


def test_every_single_bit_flip_is_refused(codec):
    token = codec.encode(Direction.TO_BUYER, 42, 43)
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    for i, ch in enumerate(token):
        for repl in alphabet:
            if repl != ch:
                assert codec.decode(token[:i] + repl + token[i + 1:]) is None


@pytest.mark.parametrize("bad", ["", "a", "a" * 65, "0" * 40, "aaaa-bbbb", "é" * 32, "="])
def test_garbage_is_refused(codec, bad):
    assert codec.decode(bad) is None


def test_truncated_and_extended_tokens_refused(codec):
    token = codec.encode(Direction.TO_BUYER, 1, 1)
    assert codec.decode(token[:-1]) is None
    assert codec.decode(token + "a") is None


def test_other_key_refuses(codec):
    token = codec.encode(Direction.TO_BUYER, 1, 1)
    other = AliasCodec({1: secrets.token_bytes(64)}, 1)
    assert other.decode(token) is None


def test_rotation_keeps_old_aliases_resolving(tmp_path):
    ring, created = keyring.ensure(tmp_path)
    assert created
    old = ring.codec().encode(Direction.TO_BUYER, 9, 10)
    rotated = keyring.rotate(tmp_path)
    assert rotated.current == 2 and sorted(rotated.alias_keys) == [1, 2]
    new = rotated.codec().encode(Direction.TO_BUYER, 9, 10)
    assert new != old
    for token in (old, new):
        ref = keyring.load(tmp_path).codec().decode(token)
        assert ref is not None and (ref.seller_id, ref.buyer_id) == (9, 10)
    assert (tmp_path / keyring.KEYS_FILE).stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("address,kind", [
    ("postmaster", Kind.POSTMASTER),
    ("PostMaster@Marketplace.Example", Kind.POSTMASTER),
    ("abc234@marketplace.example", Kind.ALIAS),
    ("ABC234@MARKETPLACE.EXAMPLE.", Kind.ALIAS),
    ("b-abc@marketplace.example", Kind.BOUNCE),
    ("x@victim.example", Kind.FOREIGN),
    ("evil%victim@marketplace.example", Kind.INVALID),
    ("victim!evil@marketplace.example", Kind.INVALID),
    ('"evil@victim"@marketplace.example', Kind.INVALID),
    ("evil@victim@marketplace.example", Kind.INVALID),
    ("@marketplace.example:evil@victim", Kind.FOREIGN),
    ("victim!evil", Kind.FOREIGN),
    ("a.b@marketplace.example", Kind.INVALID),
    ("abc@mx.relay.test", Kind.INVALID),
    ("", Kind.FOREIGN),
])
def test_routing(address, kind):
    assert route(address, "marketplace.example", frozenset({"mx.relay.test"})).kind is kind


def test_kept_tokens_answer_as_the_cipher_does_and_forged_ones_are_not_kept(monkeypatch):
    # encode/decode keep what they computed (AES-SIV is deterministic): the kept answers must be
    # the cipher's, a full store starts again, and a forged token is never kept.
    import bsm_relay.aliases.codec as codec_module
    monkeypatch.setattr(codec_module, "_KEPT", 50)
    key = secrets.token_bytes(64)
    codec = AliasCodec({1: key}, 1)
    for _ in range(3):
        for seller in range(1, 80):
            token = codec.encode(Direction.TO_BUYER, seller, seller + 7)
            fresh = AliasCodec({1: key}, 1)       # nothing kept: the cipher's own answer
            assert token == fresh.encode(Direction.TO_BUYER, seller, seller + 7)
            assert codec.decode(token) == AliasCodec({1: key}, 1).decode(token) == \
                AliasRef(Direction.TO_BUYER, seller, seller + 7, 1)
        assert len(codec._encoded) <= 50 and len(codec._decoded) <= 50
    token = codec.encode(Direction.TO_SELLER, 5, 6)
    kept = len(codec._decoded)
    forged = token[:-1] + ("a" if token[-1] != "a" else "b")
    assert codec.decode(forged) is None and codec.decode(forged) is None
    assert forged not in codec._decoded and len(codec._decoded) == kept
