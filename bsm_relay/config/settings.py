"""Typed settings: TOML file, then environment overrides, then defaults.

Every key is documented, with its default, in ``relay.example.toml`` beside this
module.  Environment overrides use ``BSM_RELAY_<SECTION>_<KEY>`` (for example
``BSM_RELAY_SMTP_LISTEN=0.0.0.0:25``); lists are comma-separated.
Stdlib only: the rest of the relay imports this, never the other way round.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class SmtpSettings:
    listen: str = "127.0.0.1:2525"
    hostname: str = "mx.marketplace.example"
    max_message_size: int = 26_214_400
    postmaster: str = "postmaster@ops.example"
    max_recipients: int = 100
    max_invalid_recipients: int = 20
    timeout: float = 300.0          # idle / per-command timeout, RFC 5321 §4.5.3.2
    proxy_protocol: bool = False    # expect a PROXY v1/v2 header from a trusted peer
    trusted_proxies: list[str] = field(default_factory=list)
    # Process, limits and drain (issue 6).
    data_timeout: float = 600.0     # the whole DATA phase, from DATA to the final reply (RFC 5321: 10 min)
    max_sessions: int = 1000        # concurrent sessions per serve process; beyond: 421 4.7.0
    max_sessions_per_ip: int = 50   # concurrent sessions per client IP per serve process; beyond: 421 4.7.0
    max_invalid_commands: int = 10  # 5xx-syntax/sequence answers per session before 421 and close
    drain_grace: float = 30.0       # SIGTERM: seconds for open sessions and deliveries to finish
    # Hardening (issue 8): NOOP, VRFY, EXPN, HELP, ETRN per session before 421 and close (Postfix's
    # smtpd_junk_command_limit).
    junk_command_limit: int = 100
    # Speed (issue 7): "uvloop" (libuv; 17-30 % more messages per core) or "asyncio" (the stdlib loop).
    event_loop: str = "uvloop"


@dataclass(frozen=True)
class TlsSettings:
    cert: str = ""                  # PEM certificate (chain); empty: no STARTTLS
    key: str = ""                   # PEM private key
    implicit_listen: str = ""       # e.g. "0.0.0.0:465": an implicit-TLS (SMTPS) listener
    min_version: str = "TLSv1.2"    # TLSv1.2 | TLSv1.3


@dataclass(frozen=True)
class AliasSettings:
    domain: str = "marketplace.example"
    marketplace_name: str = "Marketplace"


@dataclass(frozen=True)
class StorageSettings:
    state_dir: str = "./var"
    database_url: str = ""
    database_schema: str = ""       # PostgreSQL only: the schema holding the relay's tables
    # Storage faults (issue 8): SQLite lock wait before 451 4.3.0; free bytes below which MAIL gets 452 4.3.1.
    busy_timeout: float = 30.0
    min_free_bytes: int = 0         # 0: not checked
    # Finished queue items, log rows and delivery events older than this are deleted (relay/history.py).
    history_days: float = 30.0      # 0: kept forever


@dataclass(frozen=True)
class DeliverySettings:
    mode: str = "maildir"           # maildir | smarthost | mx
    smarthost: str = "127.0.0.1:2600"
    smarthost_tls: str = "opportunistic"   # opportunistic | required | off
    smarthost_user: str = ""
    smarthost_password: str = ""
    maildir: str = "./var/maildir"
    mx_port: int = 25               # the port MX delivery connects to (tests point it elsewhere)
    workers: int = 20
    poll_interval: float = 1.0
    timeout: float = 600.0          # final-dot timeout toward the downstream


@dataclass(frozen=True)
class QueueSettings:
    min_backoff: int = 300          # first retry after this many seconds, doubling ...
    max_backoff: int = 4000         # ... up to this
    max_lifetime: int = 432_000     # give up (and bounce) after this many seconds
    delay_warning: int = 14_400     # send a delay notice after this many seconds; 0 disables
    lease: int = 600                # a claimed item is another worker's after this many seconds
    max_errors: int = 3             # processing failures (bugs, broken rows) before an item is held
    max_depth: int = 100_000        # items waiting (not done) beyond which MAIL gets 452 4.3.1; 0: no limit
    # Messages larger than this go to a spool file under <state_dir>/spool/<host> instead of the
    # database row, and are delivered by the node that holds the file; 0: never.  On SQLite, messages
    # of 32 KB up to this size go to spool segments (docs/decisions/0026); 0 turns those off too.
    spool_threshold: int = 1_048_576


@dataclass(frozen=True)
class DnsSettings:
    nameservers: list[str] = field(default_factory=list)   # empty: the system resolver
    timeout: float = 5.0


@dataclass(frozen=True)
class DkimSettings:
    selector: str = "bsm1"
    algorithm: str = "rsa"          # rsa | ed25519


@dataclass(frozen=True)
class AuthSettings:
    sender_authentication: str = "dmarc"   # dmarc | none
    max_approved_senders: int = 0          # approved addresses per seller besides the primary; 0: no limit


@dataclass(frozen=True)
class PolicySettings:
    """The marketplace's messaging rules; see bsm_relay/policy/rules.py for the defaults."""

    order_id_pattern: str = r"\d{3}-\d{7}-\d{7}"
    proactive_window_days: int = 30
    max_attachments: int = 5
    max_attachment_bytes: int = 10 * 1024 * 1024
    emails: str = "mask"            # allow | mask | refuse
    phones: str = "mask"
    links: str = "refuse"           # what happens to links outside link_allowlist
    link_allowlist: list[str] = field(default_factory=list)   # empty: the built-in carriers + alias domain
    remote_images: str = "mask"     # mask = strip
    review_min_days: int = 5
    review_max_days: int = 30
    volume_base: int = 600
    volume_per_order_factor: int = 5
    volume_window_days: int = 30
    max_text_chars: int = 100_000
    # Contact reasons an opted-out buyer still receives.
    critical_reasons: list[str] = field(
        default_factory=lambda: ["customization", "delivery_scheduling", "shipping_address"])
    # Contact reasons per order status group (reason ids of policy/orders.py).
    reasons_before_shipment: list[str] = field(
        default_factory=lambda: ["additional_info", "customization", "unexpected_problem"])
    reasons_after_shipment: list[str] = field(
        default_factory=lambda: ["delivery_scheduling", "shipping_address", "unexpected_problem",
                                 "return_refund", "invoice"])
    # Per product category, "category:reason" entries added to / removed from every group.
    category_add_reasons: list[str] = field(default_factory=list)
    category_remove_reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("category_add_reasons", "category_remove_reasons"):
            for entry in getattr(self, key):
                category, sep, reason = str(entry).partition(":")
                if not (sep and category.strip() and reason.strip()):
                    raise ConfigError(f"[policy] {key}: {entry!r} is not \"category:reason\"")


@dataclass(frozen=True)
class LoggingSettings:
    format: str = "auto"            # auto | json | console
    level: str = "info"
    redact: bool = True


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = ""                # host:port of the Prometheus endpoint, e.g. "127.0.0.1:9125"; "": off
    queue_interval: float = 15.0    # seconds between the queue depth / oldest age queries


@dataclass(frozen=True)
class Settings:
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    aliases: AliasSettings = field(default_factory=AliasSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: str = "<defaults>"

    # -- derived paths ---------------------------------------------------------
    @property
    def state_dir(self) -> Path:
        return Path(self.storage.state_dir)

    @property
    def database_url(self) -> str:
        if self.storage.database_url:
            # The schema rides along as the URL's "schema" parameter; relay/db.py takes it out
            # again and makes it the connection's search_path.
            schema = self.storage.database_schema
            url = self.storage.database_url
            if url.startswith("sqlite") and self.storage.busy_timeout != 30.0 and "timeout=" not in url:
                return f"{url}{'&' if '?' in url else '?'}timeout={self.storage.busy_timeout}"
            if not schema:
                return url
            return f"{url}{'&' if '?' in url else '?'}{urllib.parse.urlencode({'schema': schema})}"
        url = f"sqlite+aiosqlite:///{(self.state_dir / 'relay.db').resolve()}"
        # relay/db.py reads the lock wait back from the URL (every engine opened from the settings gets it).
        return url if self.storage.busy_timeout == 30.0 else f"{url}?timeout={self.storage.busy_timeout}"

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return split_host_port(self.smtp.listen, 25)


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):  # [::1]:25
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, str(default_port)
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(f"{value!r} is not host:port") from None


SECTIONS = ("smtp", "aliases", "storage", "delivery", "queue", "dns", "dkim", "auth", "policy", "logging", "tls",
            "metrics")


def _section_class(name: str) -> type:
    return {
        "smtp": SmtpSettings, "aliases": AliasSettings, "storage": StorageSettings,
        "delivery": DeliverySettings, "queue": QueueSettings, "logging": LoggingSettings,
        "dns": DnsSettings, "dkim": DkimSettings, "auth": AuthSettings, "policy": PolicySettings,
        "tls": TlsSettings, "metrics": MetricsSettings,
    }[name]


def _coerce(section: str, key: str, value: Any, target: Any) -> Any:
    kind = type(target)
    where = f"[{section}] {key}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, not {value!r}")
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, not {value!r}") from None
    if kind is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return value
        raise ConfigError(f"{where} must be a list")
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    return value


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from ``path`` (or ``$BSM_RELAY_CONFIG``), then the environment."""
    env = os.environ if env is None else env
    path = path or env.get("BSM_RELAY_CONFIG") or None
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
        source = str(path)
    sections: dict[str, Any] = {}
    for name in SECTIONS:
        cls = _section_class(name)
        defaults = cls()
        given = dict(data.get(name, {}))
        known = {f.name for f in dataclasses.fields(cls)}
        for key in given:
            if key not in known:
                raise ConfigError(f"unknown key [{name}] {key} in {source}")
        for key in known:
            env_key = f"BSM_RELAY_{name.upper()}_{key.upper()}"
            if env_key in env:
                given[key] = env[env_key]
        values = {k: _coerce(name, k, v, getattr(defaults, k)) for k, v in given.items()}
        sections[name] = cls(**values)
    unknown = set(data) - set(sections)
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}] in {source}")
    settings = Settings(**sections, source=source)
    validate(settings)
    return settings


def validate(settings: Settings) -> None:
    if settings.delivery.mode not in ("maildir", "smarthost", "mx"):
        raise ConfigError(f"[delivery] mode must be maildir, smarthost or mx, not {settings.delivery.mode!r}")
    if settings.dkim.algorithm not in ("rsa", "ed25519"):
        raise ConfigError("[dkim] algorithm must be rsa or ed25519")
    if settings.smtp.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError("[smtp] event_loop must be uvloop or asyncio")
    if settings.auth.sender_authentication not in ("dmarc", "none"):
        raise ConfigError("[auth] sender_authentication must be dmarc or none")
    for key in ("emails", "phones", "links", "remote_images"):
        if getattr(settings.policy, key) not in ("allow", "mask", "refuse"):
            raise ConfigError(f"[policy] {key} must be allow, mask or refuse")
    q = settings.queue
    if not 0 < q.min_backoff <= q.max_backoff:
        raise ConfigError("[queue] needs 0 < min_backoff <= max_backoff")
    if q.max_depth < 0:
        raise ConfigError("[queue] max_depth must be 0 (no limit) or more")
    storage = settings.storage
    if storage.busy_timeout <= 0 or storage.min_free_bytes < 0:
        raise ConfigError("[storage] busy_timeout must be more than 0 and min_free_bytes 0 or more")
    if storage.history_days < 0:
        raise ConfigError("[storage] history_days must be 0 (keep everything) or more")
    if storage.database_schema:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", storage.database_schema):
            raise ConfigError("[storage] database_schema must be a plain identifier (letters, digits, _)")
        if not storage.database_url.startswith("postgresql"):
            raise ConfigError("[storage] database_schema needs a PostgreSQL database_url")
    if settings.delivery.smarthost_tls not in ("opportunistic", "required", "off"):
        raise ConfigError("[delivery] smarthost_tls must be opportunistic, required or off")
    if settings.logging.format not in ("auto", "json", "console"):
        raise ConfigError("[logging] format must be auto, json or console")
    if settings.metrics.listen:
        split_host_port(settings.metrics.listen, 9125)
    if settings.metrics.queue_interval <= 0:
        raise ConfigError("[metrics] queue_interval must be more than 0")
    if "@" in settings.aliases.domain or not settings.aliases.domain:
        raise ConfigError("[aliases] domain must be a bare domain name")
    split_host_port(settings.smtp.listen, 25)
    _validate_limits_and_tls(settings)
    split_host_port(settings.delivery.smarthost, 25)
    if settings.smtp.max_recipients < 1:
        raise ConfigError("[smtp] max_recipients must be at least 1")
    if settings.auth.max_approved_senders < 0:
        raise ConfigError("[auth] max_approved_senders must be 0 (no limit) or more")
    for entry in settings.smtp.trusted_proxies:
        try:
            ipaddress.ip_network(str(entry).strip(), strict=False)
        except ValueError:
            raise ConfigError(f"[smtp] trusted_proxies: {entry!r} is not an IP address or network") from None
    if settings.smtp.proxy_protocol and not settings.smtp.trusted_proxies:
        raise ConfigError("[smtp] proxy_protocol = true needs trusted_proxies (the proxies' addresses)")


def _validate_limits_and_tls(settings: Settings) -> None:
    smtp, tls = settings.smtp, settings.tls
    for key in ("max_sessions", "max_sessions_per_ip", "max_invalid_commands", "junk_command_limit"):
        if getattr(smtp, key) < 1:
            raise ConfigError(f"[smtp] {key} must be at least 1")
    for key in ("timeout", "data_timeout"):
        if getattr(smtp, key) <= 0:
            raise ConfigError(f"[smtp] {key} must be more than 0 seconds")
    if smtp.drain_grace < 0:
        raise ConfigError("[smtp] drain_grace must be 0 or more seconds")
    if tls.min_version not in ("TLSv1.2", "TLSv1.3"):
        raise ConfigError("[tls] min_version must be TLSv1.2 or TLSv1.3")
    if bool(tls.cert) != bool(tls.key):
        raise ConfigError("[tls] cert and key go together: set both or neither")
    if tls.implicit_listen:
        if not tls.cert:
            raise ConfigError("[tls] implicit_listen needs cert and key")
        split_host_port(tls.implicit_listen, 465)
