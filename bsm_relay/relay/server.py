"""``bsm-relay serve``: SMTP in and delivery workers in one asyncio process.

One such process per core (``serve --workers N``, see ``supervisor``) shares the
listening port through SO_REUSEPORT and the database.  Signals:

- SIGTERM/SIGINT drain: the listeners close, sessions between transactions get
  ``421 4.3.2``, a session inside a transaction finishes it first, in-flight
  deliveries finish; after ``[smtp] drain_grace`` what is left is cut off; exit 0.
- SIGHUP reloads what can change at run time (``RELOADABLE``) and logs
  ``config.reloaded`` with the keys that changed and those that need a restart.

Under systemd (``$NOTIFY_SOCKET``) it sends READY=1 once listening, STOPPING=1 on
SIGTERM and WATCHDOG=1 while its event loop runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import signal
from pathlib import Path

import dns.resolver

from ..aliases import keys as keyring
from ..config import settings as config
from ..config.settings import Settings, split_host_port
from . import db, history, log, metrics, sdnotify, spool, tls
from .context import Relay
from .delivery import Deliverer, make_target
from .dkim import DkimSigner
from .dns import make_resolver
from .factcache import FactsCache
from .queue import Enqueuer
from .segments import SegmentLog
from .smtpd import Gate, Handler, protocol_factory
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
        resolver = make_resolver(settings.dns.nameservers, settings.dns.timeout, cache=True)
    except dns.resolver.NoResolverConfiguration:
        await engine.dispose()
        raise StartupError("no DNS resolver: the system has none configured; set [dns] nameservers") from None
    sync_engine = db.make_sync_writer_engine(settings.database_url)
    reads = db.Reads(engine, sync_engine)
    return Relay(settings=settings, keys=ring, codec=ring.codec(), engine=engine, sessions=sessions,
                 store=Store(sessions, FactsCache(reads)),
                 enqueuer=Enqueuer(sessions, write_lock=db.write_lock(settings.database_url),
                                   sync_engine=sync_engine, reads=reads, segments=_segments(settings)),
                 redactor=redactor,
                 bounces=BounceAddressCodec(ring.derive("bounce-address"), settings.aliases.domain),
                 resolver=resolver)


def _segments(settings: Settings) -> SegmentLog | None:
    """Large bodies in spool segments (SQLite; not when spooling is switched off)."""
    threshold = settings.queue.spool_threshold
    return SegmentLog(settings.state_dir, maximum=threshold) if spool.enabled(threshold) else None


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


# What SIGHUP may change in a running process: section -> keys (None: the whole section).
# Everything else keeps its running value and is reported as needing a restart.
RELOADABLE: dict[str, frozenset[str] | None] = {
    "smtp": frozenset({"max_message_size", "postmaster", "max_recipients", "max_invalid_recipients", "timeout",
                       "data_timeout", "max_sessions", "max_sessions_per_ip", "max_invalid_commands",
                       "drain_grace"}),
    "auth": None, "policy": None, "logging": None,
    "tls": frozenset({"cert", "key", "min_version"}),
}


@dataclasses.dataclass(frozen=True)
class ReloadPlan:
    settings: Settings          # the running settings with the reloadable changes applied
    changed: list[str]          # "section.key" applied now
    needs_restart: list[str]    # "section.key" that differ but keep their running value


def plan_reload(running: Settings, loaded: Settings) -> ReloadPlan:
    """Which keys differ between the running and the newly read settings, and what may apply now.

    Key names only, never values: a changed password or key path is reported, not printed.
    """
    changed: list[str] = []
    restart: list[str] = []
    sections: dict[str, object] = {}
    # TLS switched on or off needs a listener that offers (or stops offering) STARTTLS: a restart.
    tls_switch = bool(running.tls.cert) != bool(loaded.tls.cert)
    for f in dataclasses.fields(running):
        old, new = getattr(running, f.name), getattr(loaded, f.name)
        if not dataclasses.is_dataclass(old):
            continue
        allowed = RELOADABLE.get(f.name, frozenset())
        apply: dict[str, object] = {}
        for key in (k.name for k in dataclasses.fields(old)):
            if getattr(old, key) == getattr(new, key):
                continue
            name = f"{f.name}.{key}"
            if (allowed is None or key in allowed) and not (f.name == "tls" and tls_switch):
                changed.append(name)
                apply[key] = getattr(new, key)
            else:
                restart.append(name)
        sections[f.name] = dataclasses.replace(old, **apply) if apply else old  # type: ignore[type-var]
    return ReloadPlan(dataclasses.replace(running, **sections), changed, restart)  # type: ignore[arg-type]


class Running:
    """One serve process: its relay, listeners, TLS contexts and delivery workers."""

    def __init__(self, relay: Relay, contexts: tls.TlsContexts | None) -> None:
        self.relay = relay
        self.tls = contexts
        self.gate = Gate(relay)
        self.handler = Handler(relay)      # one for every listener: one queue depth count
        self.servers: list[asyncio.Server] = []
        self.log = log.get()
        self._reloading = asyncio.Lock()

    async def listen(self, reuse_port: bool) -> None:
        loop = asyncio.get_running_loop()
        s = self.relay.settings
        host, port = s.listen_host_port
        starttls = self.tls.front if self.tls else None
        self.servers.append(await loop.create_server(
            protocol_factory(self.relay, self.gate, starttls=starttls, handler=self.handler), host, port,
            reuse_address=True, reuse_port=reuse_port))
        if s.tls.implicit_listen and self.tls is not None:
            ihost, iport = split_host_port(s.tls.implicit_listen, 465)
            self.servers.append(await loop.create_server(
                protocol_factory(self.relay, self.gate, tls_label="implicit", handler=self.handler),
                ihost, iport, ssl=self.tls.front,
                ssl_handshake_timeout=min(60.0, s.smtp.timeout), reuse_address=True, reuse_port=reuse_port))

    async def reload(self) -> None:
        """SIGHUP: read the configuration again and apply what may change at run time."""
        async with self._reloading:
            running = self.relay.settings
            try:
                path = None if running.source == "<defaults>" else running.source
                loaded = await asyncio.to_thread(config.load, path)
            except config.ConfigError as exc:
                self.log.error("config.reload_failed", error=str(exc), pid=os.getpid())
                return
            plan = plan_reload(running, loaded)
            # The certificate files are read again even when their paths did not change (renewals
            # usually replace the files in place).
            if self.tls is not None:
                try:
                    await asyncio.to_thread(self.tls.reload, plan.settings.tls)
                except tls.TlsError as exc:   # keep serving with the old certificate and settings
                    self.log.error("config.reload_failed", error=str(exc), pid=os.getpid())
                    return
            self.relay.settings = plan.settings
            if any(k.startswith("logging.") for k in plan.changed):
                self.relay.redactor.enabled = plan.settings.logging.redact
                log.configure(plan.settings.logging.format, plan.settings.logging.level, self.relay.redactor)
                self.log = log.get()
            self.log.info("config.reloaded", changed=plan.changed, needs_restart=plan.needs_restart,
                          tls_certificate="reloaded" if self.tls is not None else None,
                          config=running.source, pid=os.getpid())

    async def drain(self, grace: float) -> None:
        """Stop accepting; let open transactions and sessions end within ``grace`` seconds."""
        for server in self.servers:
            server.close()
        self.gate.drain()
        self.log.info("relay.draining", sessions=len(self.gate.open), grace=grace, pid=os.getpid())
        try:
            await asyncio.wait_for(self.gate.empty.wait(), grace)
        except TimeoutError:
            self.gate.cut_off()
        # A queue count a session started may outlive it: let it end before the engine goes
        # (cancelled at exit, its connection's rollback would be cut off mid-way).
        await self.handler.queue_depth.settle()


async def _watchdog(interval: float) -> None:
    while True:
        sdnotify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def load_tls(settings: Settings) -> tls.TlsContexts | None:
    """The TLS contexts of ``[tls]``; an unusable certificate or key stops the start with one line."""
    try:
        return tls.contexts(settings.tls)
    except tls.TlsError as exc:
        raise StartupError(str(exc)) from None


async def serve(settings: Settings) -> None:
    # Under ``serve --workers N`` the parent's children share the port; alone, a second relay
    # started by mistake on the same port must fail to bind rather than silently share it.
    supervised = bool(os.environ.get(SUPERVISED_ENV))
    contexts = await asyncio.to_thread(load_tls, settings)
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
                          signer=load_signer(settings), writer=relay.enqueuer)
    deliverer.start()
    relay.hand_off = deliverer.hand_off
    running = Running(relay, contexts)
    stop = asyncio.Event()
    background: set[asyncio.Task[None]] = set()
    # What start-up built (modules, the schema, settings, caches) lives as long as the process:
    # out of the collector's sight, a full collection no longer walks it (about 100,000 objects,
    # 35-40 ms with the event loop stopped) and the collector's share of CPU halves (0020).
    gc.collect()
    gc.freeze()
    try:
        await running.listen(reuse_port=supervised)
    except OSError as exc:
        await deliverer.stop(0)
        await relay.enqueuer.stop()
        await relay.engine.dispose()
        raise StartupError(f"cannot listen: {exc.strerror or exc}") from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_hup() -> None:
        task = asyncio.create_task(running.reload())
        background.add(task)
        task.add_done_callback(background.discard)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    interval = sdnotify.watchdog_interval()
    if interval:
        background.add(asyncio.create_task(_watchdog(interval)))
    sweeping = asyncio.Event()
    sweeper = asyncio.create_task(history.sweeper(relay, sweeping), name="history")
    host, port = settings.listen_host_port
    logger.info("relay.started", listen=f"{host}:{port}", delivery=settings.delivery.mode,
                config=settings.source, alias_domain=settings.aliases.domain, pid=os.getpid(),
                starttls=contexts is not None, implicit_tls=settings.tls.implicit_listen or None)
    relay_metrics = metrics.start(relay.settings, relay)   # [metrics] listen; None when off
    sdnotify.notify("READY=1", f"STATUS=listening on {host}:{port}")
    try:
        await stop.wait()
    finally:
        sdnotify.notify("STOPPING=1")
        loop.remove_signal_handler(signal.SIGHUP)
        grace = relay.settings.smtp.drain_grace
        deadline = loop.time() + grace
        await running.drain(grace)
        await deliverer.stop(max(0.0, deadline - loop.time()))
        for task in background:
            task.cancel()
        sweeping.set()                    # between two batches, never inside one
        await sweeper
        if relay_metrics is not None:
            await relay_metrics.stop()
        await relay.enqueuer.stop()
        await relay.engine.dispose()
        logger.info("relay.stopped", pid=os.getpid())


# Set by the ``serve --workers N`` parent in its children's environment (its pid).
SUPERVISED_ENV = "BSM_RELAY_SUPERVISOR_PID"
