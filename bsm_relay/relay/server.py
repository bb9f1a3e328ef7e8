"""``bsm-relay serve``: SMTP in and delivery workers in one asyncio process.

SIGINT/SIGTERM stop accepting, let open sessions finish their transaction for a
grace time, let in-flight deliveries finish, and exit 0.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import dns.resolver

from ..aliases import keys as keyring
from ..config.settings import Settings
from . import db, log
from .context import Relay
from .delivery import Deliverer, make_target
from .dkim import DkimSigner
from .dns import make_resolver
from .queue import Enqueuer
from .smtpd import protocol_factory
from .store import Store
from .verp import BounceAddressCodec


class StartupError(RuntimeError):
    """The relay cannot start; the message says why, for the operator."""


async def open_relay(settings: Settings, *, require_schema: bool = True) -> Relay:
    state = Path(settings.state_dir)
    try:
        ring = keyring.load(state)
    except keyring.KeyError_ as exc:
        raise StartupError(str(exc)) from None
    redactor = log.Redactor(ring.derive("log-redaction"), settings.aliases.domain, settings.logging.redact)
    engine = db.make_engine(settings.database_url)
    if require_schema and not await db.schema_is_current(engine):
        await engine.dispose()
        raise StartupError("the database schema is not current; run 'bsm-relay init' first")
    sessions = db.sessionmaker(engine)
    try:
        resolver = make_resolver(settings.dns.nameservers, settings.dns.timeout)
    except dns.resolver.NoResolverConfiguration:
        await engine.dispose()
        raise StartupError("no DNS resolver: the system has none configured; set [dns] nameservers") from None
    return Relay(settings=settings, keys=ring, codec=ring.codec(), engine=engine, sessions=sessions,
                 store=Store(sessions), enqueuer=Enqueuer(sessions), redactor=redactor,
                 bounces=BounceAddressCodec(ring.derive("bounce-address"), settings.aliases.domain),
                 resolver=resolver)


def load_signer(settings: Settings) -> DkimSigner:
    path = dkim_key_path(settings)
    try:
        return DkimSigner.load(path, settings.aliases.domain, settings.dkim.selector)
    except FileNotFoundError:
        raise StartupError(f"no DKIM key at {path}; run 'bsm-relay init' or 'bsm-relay dkim keygen'") from None
    except (OSError, ValueError) as exc:
        raise StartupError(f"the DKIM key {path} is unusable: {exc}") from None


def dkim_key_path(settings: Settings) -> Path:
    return Path(settings.state_dir) / "dkim" / f"{settings.dkim.selector}.pem"


async def serve(settings: Settings, grace: float = 30.0) -> None:
    relay = await open_relay(settings)
    log.configure(settings.logging.format, settings.logging.level, relay.redactor)
    logger = log.get()
    if settings.auth.sender_authentication == "none":
        # Loud on purpose: in this mode anyone who can reach the port can write as any approved address.
        logger.warning("auth.disabled", sender_authentication="none",
                       detail="SPF/DKIM are not checked; only run this behind a trusted hop that verifies senders")
    loop = asyncio.get_running_loop()
    relay.enqueuer.start()
    deliverer = Deliverer(settings, relay.sessions, make_target(settings, relay.resolver), relay.enqueuer.wakeup,
                          signer=load_signer(settings))
    deliverer.start()
    host, port = settings.listen_host_port
    server = await loop.create_server(protocol_factory(relay), host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logger.info("relay.started", listen=f"{host}:{port}", delivery=settings.delivery.mode,
                config=settings.source, alias_domain=settings.aliases.domain)
    try:
        await stop.wait()
    finally:
        logger.info("relay.stopping")
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), grace)
        except TimeoutError:
            pass
        await deliverer.stop(grace)
        await relay.enqueuer.stop()
        await relay.engine.dispose()
        logger.info("relay.stopped")
