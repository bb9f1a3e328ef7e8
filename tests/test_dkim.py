"""DKIM signing (relay/dkim.py), checked by an independent verifier: dkimpy on a fake DNS."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dkim.canonicalization import Relaxed

from bsm_relay.relay.dkim import (
    DkimKeyError,
    DkimSigner,
    canonicalize_body_relaxed,
    canonicalize_header_relaxed,
    generate_key,
    txt_record_name,
)

DOMAIN = "marketplace.example"
NOW = 1_767_225_600  # 2026-01-01

pytest.importorskip("nacl", reason="dkimpy needs PyNaCl to verify ed25519-sha256")


class Keys:
    def __init__(self, path: Path, selector: str, txt: str) -> None:
        self.path, self.selector, self.txt = path, selector, txt
        self.signer = DkimSigner.load(path, DOMAIN, selector)

    def dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        # dkimpy asks for "<s>._domainkey.<d>." and must get exactly our published record.
        if name == (txt_record_name(self.selector, DOMAIN) + ".").encode():
            return self.txt.encode()
        return None


@pytest.fixture(scope="module", params=["rsa", "ed25519"])
def keys(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Keys:
    state = tmp_path_factory.mktemp("state")
    selector = f"bsm-{request.param}"
    path, txt = generate_key(state, selector, request.param)
    return Keys(path, selector, txt)


def _verify(keys: Keys, message: bytes) -> bool:
    return bool(dkim.verify(message, dnsfunc=keys.dns))


def _signed(keys: Keys, header_block: bytes, body: bytes) -> bytes:
    """The message as the receiver gets it: an SMTP client ends an unterminated body with CRLF."""
    on_the_wire = body + b"\r\n" if body and not body.endswith(b"\r\n") else body
    return keys.signer.sign(header_block, body, now=NOW) + header_block + b"\r\n" + on_the_wire


BASE = (
    b'From: "Anna via Marketplace" <s-aaaa@marketplace.example>\r\n'
    b"To: bob@buyer.example\r\n"
    b"Subject: Your order 1234\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <q4f9c2a1b7e@marketplace.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
)

MESSAGES = {
    "plain": (BASE, b"Hello Bob,\r\n\r\nyour parcel left today.\r\n"),
    "folded": (
        BASE.replace(b"Subject: Your order 1234\r\n", b"Subject: Your order\r\n\t1234 and a long\r\n   tail\r\n")
        + b"References: <a@x.example>\r\n <b@x.example>\r\n\t<c@x.example>\r\n",
        b"body\r\n",
    ),
    "encoded_word_subject": (
        BASE.replace(b"Subject: Your order 1234", b"Subject: =?utf-8?b?w4RydGVyIG1pdCBkZXIgQmVzdGVsbHVuZyDwn5Om?="),
        "Grüße\r\n".encode(),
    ),
    "empty_body": (BASE, b""),
    "only_crlf_body": (BASE, b"\r\n"),
    "trailing_blank_lines": (BASE, b"text\r\n\r\n \r\n\t\r\n\r\n"),
    "no_final_crlf": (BASE, b"text without newline  "),
    "large_body": (BASE, (b"0123456789 abcdefghij \t ABCDEFGHIJ" * 3 + b"\r\n") * 1000),
    "odd_whitespace": (
        b'From:\t"Anna"   <s-aaaa@marketplace.example>  \r\n'
        b"to:bob@buyer.example\r\n"
        b"SUBJECT:   spaced \t out   \r\n"
        b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"X-Unsigned:  whatever\r\n",
        b"  leading and  inner\t\tspace  \r\n\t\r\nend \t \r\n",
    ),
    "repeated_headers": (
        BASE + b"Received: from a\r\nReceived: from b\r\nAuto-Submitted: auto-replied\r\n"
        b"Reply-To: x@marketplace.example\r\nIn-Reply-To: <p@m.example>\r\n",
        b"body\r\n",
    ),
}


@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_dkimpy_verifies_our_signature(keys: Keys, case: str) -> None:
    header_block, body = MESSAGES[case]
    assert _verify(keys, _signed(keys, header_block, body))


@pytest.mark.parametrize("case", ["plain", "large_body", "folded"])
def test_tampered_body_fails(keys: Keys, case: str) -> None:
    header_block, body = MESSAGES[case]
    message = _signed(keys, header_block, body)
    head, blank, sent_body = message.partition(b"\r\n\r\n")
    assert _verify(keys, head + blank + sent_body)
    assert not _verify(keys, head + blank + bytes([sent_body[0] ^ 1]) + sent_body[1:])
    assert not _verify(keys, message + b"appended line\r\n")


def test_changed_subject_fails(keys: Keys) -> None:
    message = _signed(keys, *MESSAGES["plain"])
    assert not _verify(keys, message.replace(b"Subject: Your order 1234", b"Subject: Your order 1235"))


def test_second_from_fails_because_from_is_oversigned(keys: Keys) -> None:
    header_block, body = MESSAGES["plain"]
    signature = keys.signer.sign(header_block, body, now=NOW)
    assert b"h=from:from:" in signature.replace(b"\r\n ", b"")
    message = signature + header_block + b"From: evil@attacker.example\r\n\r\n" + body
    assert not _verify(keys, message)


def test_whitespace_changes_in_transit_still_verify(keys: Keys) -> None:
    """What relaxed/relaxed is for: re-folding and trailing spaces added by a hop."""
    message = _signed(keys, *MESSAGES["plain"])
    changed = message.replace(b"Subject: Your order 1234", b"Subject:  Your\r\n\torder   1234 ")
    changed = changed.replace(b"your parcel left today.", b"your  parcel\tleft today.   ")
    assert _verify(keys, changed)


def test_signature_header_shape(keys: Keys) -> None:
    header_block, body = MESSAGES["repeated_headers"]
    signature = keys.signer.sign(header_block, body, now=NOW)
    assert signature.startswith(b"DKIM-Signature: v=1; a=" + keys.signer.algorithm.encode() + b";")
    assert signature.endswith(b"\r\n") and signature.count(b"\r\n\r\n") == 0
    lines = signature[:-2].split(b"\r\n")
    assert all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    unfolded = signature.replace(b"\r\n ", b" ")
    assert b"c=relaxed/relaxed;" in unfolded
    assert b"d=marketplace.example;" in unfolded and b"s=" + keys.selector.encode() + b";" in unfolded
    assert b"t=%d;" % NOW in unfolded
    h = unfolded.split(b"h=")[1].split(b";")[0].replace(b" ", b"")
    # Received and other unlisted fields are not signed; every listed one present is.
    assert h == (b"from:from:to:subject:date:message-id:reply-to:in-reply-to:mime-version:content-type:auto-submitted")


def test_ed25519_signature_is_deterministic_and_rsa_verifies_again(keys: Keys) -> None:
    header_block, body = MESSAGES["plain"]
    first = keys.signer.sign(header_block, body, now=NOW)
    second = keys.signer.sign(header_block, body, now=NOW)
    assert first == second  # PKCS#1 v1.5 and Ed25519 are both deterministic
    assert keys.signer.sign(header_block, body, now=NOW + 1) != first


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\r\n",
        b"\r\n\r\n",
        b" \r\n",
        b"a",
        b"a \t b\t\r\n",
        b"a\r\n\r\n \r\n",
        b"\t\tindent\r\nx  \r\n\r\n",
        b"line\r\n  \t  \r\nline\r\n",
        b"x" + b" " * 33 + b"y\t \t \t\tz" + b" " * 17 + b"\r\n" * 5,
        b"bare\rcr \r\nand\nlf \r\n",
        (b"Lorem  ipsum \t dolor \r\n" * 5000) + b"\r\n" * 300,
    ],
)
def test_body_canonicalisation_matches_dkimpy(body: bytes) -> None:
    ours = canonicalize_body_relaxed(body)
    assert ours == Relaxed.canonicalize_body(body)


def test_header_canonicalisation() -> None:
    assert canonicalize_header_relaxed(b"SubJect ", b" \tA  \r\n\tb\t c  ") == b"subject:A b c\r\n"
    assert canonicalize_header_relaxed(b"X", b"") == b"x:\r\n"


def test_load_detects_key_type(keys: Keys) -> None:
    expected = "rsa-sha256" if "rsa" in keys.selector else "ed25519-sha256"
    assert keys.signer.algorithm == expected
    assert keys.signer.txt_record() == keys.txt


def test_load_refuses_other_keys(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ec.pem").write_bytes(ec_key)
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    with pytest.raises(DkimKeyError):
        DkimSigner.load(tmp_path / "ec.pem", DOMAIN, "s1")
    with pytest.raises(DkimKeyError):
        DkimSigner.load(tmp_path / "junk.pem", DOMAIN, "s1")


def test_generate_key_file_and_txt(tmp_path: Path) -> None:
    path, txt = generate_key(tmp_path, "sel1", "ed25519")
    assert path == tmp_path / "dkim" / "sel1.pem"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert txt.startswith("v=DKIM1; k=ed25519; p=")
    assert [p.name for p in path.parent.iterdir()] == ["sel1.pem"]  # no temporary left behind
    assert txt_record_name("sel1", DOMAIN) == "sel1._domainkey.marketplace.example"
    assert txt_record_name("sel1", DOMAIN + ".") == "sel1._domainkey.marketplace.example"


def test_generate_key_refuses_overwrite_unless_forced(tmp_path: Path) -> None:
    path, txt = generate_key(tmp_path, "sel1", "ed25519")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key(tmp_path, "sel1", "ed25519")
    assert path.read_bytes() == before
    path2, txt2 = generate_key(tmp_path, "sel1", "ed25519", force=True)
    assert path2 == path and path.read_bytes() != before and txt2 != txt
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["sel1.pem"]


@pytest.mark.parametrize("selector", ["../x", "a b", "", "sel;x", "-bad", "sél"])
def test_generate_key_rejects_bad_selector(tmp_path: Path, selector: str) -> None:
    with pytest.raises(ValueError):
        generate_key(tmp_path, selector, "ed25519")
    assert not (tmp_path / "dkim").exists() or not any((tmp_path / "dkim").iterdir())


def test_generate_key_rejects_unknown_algorithm(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_key(tmp_path, "sel1", "dsa")


def test_signer_rejects_header_injection_in_domain(keys: Keys) -> None:
    key = serialization.load_pem_private_key(keys.path.read_bytes(), password=None)
    with pytest.raises(ValueError):
        DkimSigner("marketplace.example; x=1", "s1", key)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r\n", b"  x", b".", b"\r\n\r\n", b"b c \t"]), max_size=60),
       st.integers(min_value=1, max_value=12))
def test_the_streamed_body_hash_equals_the_whole_body_hash(parts, chunk):
    """A spooled body is hashed piece by piece; the result is the hash of the whole body."""
    import io

    from bsm_relay.relay.dkim import body_hash_relaxed, canonicalize_body_relaxed
    from bsm_relay.relay.spool import line_pieces
    body = b"".join(parts)
    pieces = list(line_pieces(io.BytesIO(body).read, chunk))
    assert b"".join(pieces) == body
    assert all(p.endswith(b"\r\n") for p in pieces[:-1])
    assert body_hash_relaxed(pieces) == hashlib.sha256(canonicalize_body_relaxed(body)).digest()
