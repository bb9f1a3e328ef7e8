"""DKIM signing of outbound mail for the alias domain (RFC 6376, RFC 8463).

The last step before a message leaves: relay/delivery hands us the rewritten header block and the
body, and prepends the ``DKIM-Signature`` line we return. Signing goes through OpenSSL
(``cryptography``) and the relaxed canonicalisation is done with bytes regexes and hashlib, because
dkimpy's pure-Python RSA costs about 25 times as much per message (docs/decisions/0002). dkimpy
stays the independent verifier: for inbound mail and in our tests.

Only ``c=relaxed/relaxed`` is produced: it survives the re-folding and whitespace changes that
receiving MTAs commonly make.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

__all__ = [
    "SIGNED_HEADERS",
    "DkimKeyError",
    "DkimSigner",
    "PrivateKey",
    "canonicalize_body_relaxed",
    "canonicalize_header_relaxed",
    "generate_key",
    "txt_record_name",
]

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

#: Header fields signed when present, in the order they are listed in h=. ``from`` is also
#: over-signed (listed once more than it occurs) so that nobody can add a second From later.
SIGNED_HEADERS: tuple[bytes, ...] = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"auto-submitted",
)
_OVERSIGNED = frozenset({b"from"})

_MIN_RSA_BITS = 1024  # RFC 8301: verifiers must not accept smaller keys
_RSA_BITS = 2048
_FOLD_WIDTH = 76

# A header field ends at a CRLF that is not followed by WSP (which would make it a folded line).
_FIELD_END = re.compile(rb"\r\n(?![ \t])")
_WSP_RUN = re.compile(rb"[ \t]+")
# DNS labels only: the selector also becomes a file name, so nothing like "../" can get through.
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rb"\A" + _LABEL + rb"(?:\." + _LABEL + rb")*\Z")


class DkimKeyError(ValueError):
    """A DKIM private key that cannot be used (wrong type, too small, unreadable)."""


def canonicalize_header_relaxed(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2 for one field (``value`` is everything after the colon), with CRLF."""
    if b"\r\n" in value:
        value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:      # most values have single spaces only: no regex pass
        value = _WSP_RUN.sub(b" ", value)
    return name.rstrip(b" \t").lower() + b":" + value.strip(b" ") + b"\r\n"


def canonicalize_body_relaxed(body: bytes) -> bytes:
    """RFC 6376 §3.4.4: WSP runs to one SP, none at line ends, no empty lines at the end.

    A body without a final CRLF is taken as it will reach the receiver: the SMTP client adds the
    CRLF before the terminating dot, so its last line is a line like any other.
    """
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    body = _relax_whitespace(body)
    end = len(body)
    while end >= 4 and body[end - 4 : end] == b"\r\n\r\n":
        end -= 2
    if end == 2:  # what is left is one empty line: an empty body
        return b""
    return body[:end] if end != len(body) else body


def _relax_whitespace(body: bytes) -> bytes:
    """WSP runs to one SP and none before a CRLF, over whole lines."""
    # Speed matters here (docs/decisions/0002): a regex pass costs about 10 ns a byte and a
    # two-byte bytes search about 1 ns, but a one-byte find is a memchr. So the work is confined
    # to the span between the first and the last WSP (a MIME body's base64 parts have none), and
    # done there with bytes.replace: tabs to spaces, space runs halved per pass, then the single
    # space left before a CRLF removed.
    last = max(body.rfind(b" "), body.rfind(b"\t"))
    if last >= 0:
        first = min(i for i in (body.find(b" "), body.find(b"\t")) if i >= 0)
        end = last + 3  # a CRLF right after the last WSP belongs to the span
        span = body[first:end]
        if b"\t" in span:
            span = span.replace(b"\t", b" ")
        while b"  " in span:
            span = span.replace(b"  ", b" ")
        body = body[:first] + span.replace(b" \r\n", b"\r\n") + body[end:]
    return body


def body_hash_relaxed(pieces: Iterable[bytes]) -> bytes:
    """SHA-256 of the relaxed canonical body, given in pieces of whole lines (only the last may
    lack its CRLF; ``spool.Spooled.body_pieces`` cuts them): a spooled 25 MB body is hashed
    holding one piece, never all of it.

    The whitespace rules apply to each piece alone (no WSP run crosses a CRLF); a run of empty
    lines at a piece's end is held back until a line with content follows (empty lines at the
    end of the body are not part of it).
    """
    digest = hashlib.sha256()
    held = 0              # empty lines seen but not yet hashed
    for piece in pieces:
        if not piece:
            continue
        if not piece.endswith(b"\r\n"):      # the last line, as the receiver will see it
            piece += b"\r\n"
        relaxed = _relax_whitespace(piece)
        content = len(relaxed)
        while content >= 2 and relaxed[content - 2:content] == b"\r\n":
            content -= 2
        trailing = (len(relaxed) - content) // 2
        if content == 0:                      # a piece of empty lines only (each starts a line)
            held += trailing
        else:
            digest.update(b"\r\n" * held)
            digest.update(relaxed[:content + 2])
            held = trailing - 1
    return digest.digest()


def _split_fields(header_block: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-cased name, raw value after the colon) for each field, in message order."""
    if not header_block.endswith(b"\r\n"):
        header_block += b"\r\n"
    fields = []
    for raw in _FIELD_END.split(header_block)[:-1]:
        name, colon, value = raw.partition(b":")
        if colon:  # a line without a colon is not a header field and cannot be signed
            fields.append((name.rstrip(b" \t").lower(), value))
    return fields


def _fold(tokens: list[bytes], line_len: int) -> tuple[bytes, int]:
    """Join tokens, breaking before one (leading space kept as the WSP) when a line gets long."""
    out = bytearray()
    for token in tokens:
        if line_len + len(token) > _FOLD_WIDTH and line_len > 1:
            out += b"\r\n"
            line_len = 0
            if not token.startswith(b" "):
                token = b" " + token
        out += token
        line_len += len(token)
    return bytes(out), line_len


def _check_dns_name(what: str, value: str) -> bytes:
    encoded = value.encode("ascii", "replace")
    if not _DNS_NAME.match(encoded):
        raise ValueError(f"DKIM {what} must be an ASCII DNS name, got {value!r}")
    return encoded


def _txt_record(private_key: PrivateKey) -> str:
    public = private_key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        # RFC 8463 §4: the bare 32-octet key, not a SubjectPublicKeyInfo.
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


class DkimSigner:
    """Signs messages for one domain with one selector and key; immutable, safe to share."""

    def __init__(self, domain: str, selector: str, private_key: PrivateKey) -> None:
        if isinstance(private_key, rsa.RSAPrivateKey):
            if private_key.key_size < _MIN_RSA_BITS:
                raise DkimKeyError(f"RSA key of {private_key.key_size} bits; DKIM needs {_MIN_RSA_BITS}+")
            self.algorithm = "rsa-sha256"
        elif isinstance(private_key, ed25519.Ed25519PrivateKey):
            self.algorithm = "ed25519-sha256"
        else:
            raise DkimKeyError(f"unsupported DKIM key type {type(private_key).__name__}")
        self.domain = domain
        self.selector = selector
        self._key = private_key
        self._fixed_tags = [
            b" v=1;",
            b" a=" + self.algorithm.encode() + b";",
            b" c=relaxed/relaxed;",
            b" d=" + _check_dns_name("domain", domain) + b";",
            b" s=" + _check_dns_name("selector", selector) + b";",
        ]

    @classmethod
    def load(cls, path: Path, domain: str, selector: str) -> DkimSigner:
        """Read an unencrypted PEM private key; RSA or Ed25519 is taken from the key itself."""
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise DkimKeyError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
        if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
            raise DkimKeyError(f"{path}: {type(key).__name__} is not usable for DKIM (RSA or Ed25519)")
        return cls(domain, selector, key)

    def txt_record(self) -> str:
        """The TXT record text to publish at :func:`txt_record_name` for this key."""
        return _txt_record(self._key)

    def sign(self, header_block: bytes, body: bytes, now: int | None = None) -> bytes:
        """Return one folded ``DKIM-Signature: ...\\r\\n`` line to prepend to ``header_block``.

        ``header_block`` is the header section with CRLF line ends and no terminating blank
        line; ``body`` is everything after the blank line.
        """
        return self.sign_hashed(header_block, hashlib.sha256(canonicalize_body_relaxed(body)).digest(), now)

    def sign_hashed(self, header_block: bytes, body_hash: bytes, now: int | None = None) -> bytes:
        """:meth:`sign` for a body already hashed (:func:`body_hash_relaxed`, a spooled body)."""
        by_name: dict[bytes, list[bytes]] = {}
        for name, value in _split_fields(header_block):
            by_name.setdefault(name, []).append(value)

        # h= lists each signed name once per occurrence; the verifier then takes the instances
        # from the bottom up, so hashing them in reverse order matches what it will do.
        h_names: list[bytes] = []
        hashed = bytearray()
        for name in SIGNED_HEADERS:
            values = by_name.get(name, ())
            for value in reversed(values):
                h_names.append(name)
                hashed += canonicalize_header_relaxed(name, value)
            if name in _OVERSIGNED:
                h_names.append(name)  # names an absent instance: hashes as nothing

        timestamp = int(time.time()) if now is None else int(now)
        h_tokens = [name + b":" for name in h_names]
        h_tokens[0] = b" h=" + h_tokens[0]
        h_tokens[-1] = h_tokens[-1][:-1] + b";"
        tokens = [*self._fixed_tags, b" t=%d;" % timestamp, *h_tokens]
        tokens += [b" bh=" + base64.b64encode(body_hash) + b";", b" b="]
        head, line_len = _fold(tokens, len(b"DKIM-Signature:"))

        # The signature header itself is hashed with an empty b= and without its final CRLF.
        hashed += canonicalize_header_relaxed(b"dkim-signature", head)[:-2]
        if isinstance(self._key, rsa.RSAPrivateKey):
            signature = self._key.sign(bytes(hashed), padding.PKCS1v15(), hashes.SHA256())
        else:
            # RFC 8463 §3: Ed25519 signs the SHA-256 hash of the data, not the data itself.
            signature = self._key.sign(hashlib.sha256(hashed).digest())

        b64 = base64.b64encode(signature)
        chunks = [b64[i : i + 64] for i in range(0, len(b64), 64)]
        tail, _ = _fold(chunks, line_len)
        return b"DKIM-Signature:" + head + tail + b"\r\n"


def txt_record_name(selector: str, domain: str) -> str:
    """Where the public key is published: ``<selector>._domainkey.<domain>``."""
    return f"{selector}._domainkey.{domain.rstrip('.')}"


def generate_key(state_dir: Path, selector: str, algorithm: str = "rsa", *, force: bool = False) -> tuple[Path, str]:
    """Create ``state_dir/dkim/<selector>.pem`` (mode 0600) and return it with its TXT record.

    ``algorithm`` is ``"rsa"`` (2048 bits) or ``"ed25519"``. An existing key is never replaced
    unless ``force`` is set: replacing a published key breaks every signature until DNS follows.
    """
    _check_dns_name("selector", selector)
    key: PrivateKey
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS)
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"DKIM algorithm must be 'rsa' or 'ed25519', got {algorithm!r}")
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    key_dir = Path(state_dir) / "dkim"
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = key_dir / f"{selector}.pem"
    # Written under a temporary name and then linked or renamed into place, so that the key file
    # is either absent or complete, and O_EXCL / link() make "do not overwrite" race-free.
    tmp = key_dir / f".{selector}.pem.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # raises FileExistsError if a key is already there
    finally:
        tmp.unlink(missing_ok=True)
    return path, _txt_record(key)
