"""Inbound TLS: the server context for STARTTLS and the implicit-TLS listener.

``[tls] cert`` and ``key`` are PEM files.  Every listener is given one *front*
context that never changes; its SNI callback (OpenSSL calls it for every
ClientHello, with or without a server name) hands the handshake to the current
context.  A reload (SIGHUP) only swaps the current context, so a renewed
certificate is used by the next handshake without reopening a listening socket.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ..config.settings import TlsSettings

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(RuntimeError):
    """The certificate or key cannot be used; the message says which file and why, in one line."""


def build_context(cert: str, key: str, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context for ``cert``/``key``, or :class:`TlsError`.  Reads files: not on the event loop."""
    for what, path in (("certificate", cert), ("key", key)):
        try:
            Path(path).read_bytes()
        except OSError as exc:
            raise TlsError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsError(f"the TLS certificate {cert} does not match the key {key}") from None
        raise TlsError(f"the TLS certificate {cert} or key {key} is not usable PEM: {exc.reason or exc}") from None
    return ctx


class TlsContexts:
    """The front context given to listeners, and the current one it hands handshakes to."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.current = build_context(settings.cert, settings.key, settings.min_version)
        self.front = build_context(settings.cert, settings.key, settings.min_version)
        self.front.sni_callback = self._select

    def _select(self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        ssl_object.context = self.current
        return None

    def reload(self, settings: TlsSettings) -> None:
        """Swap in a context built from ``settings`` (raises :class:`TlsError`, keeping the old one)."""
        self.current = build_context(settings.cert, settings.key, settings.min_version)
        self.front.minimum_version = VERSIONS[settings.min_version]
        self.settings = settings


def contexts(settings: TlsSettings) -> TlsContexts | None:
    """The contexts for ``[tls]``, or None when no certificate is configured (no STARTTLS offered)."""
    if not settings.cert:
        return None
    return TlsContexts(settings)
