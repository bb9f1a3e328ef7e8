"""Database engine and migrations: SQLite by default, any SQLAlchemy async URL otherwise.

SQLite runs in WAL mode with ``synchronous=FULL`` so that a committed queue row has
reached the disk before the relay answers 250.  Migrations are Alembic's, run from
``bsm-relay init`` (and checked at ``serve``).

PostgreSQL (``postgresql+asyncpg://`` or ``postgresql+psycopg://``) may keep the relay's
tables in a schema of their own (``[storage] database_schema``): every connection then
gets that schema as its ``search_path``, and ``init`` creates it when it is missing.  The
schema travels inside the URL as the ``schema`` query parameter (``Settings.database_url``
puts it there), so every caller that opens an engine from the settings gets it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, Executable, Row, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker, create_async_engine

MIGRATIONS = Path(__file__).parent / "migrations"

# A plain, unquoted PostgreSQL identifier: never interpolated unless it matches.
SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class DatabaseURLError(ValueError):
    """The database URL or schema cannot be used; the message says why."""


def with_schema(url: str, schema: str) -> str:
    """``url`` carrying ``schema`` (its ``schema`` query parameter); ``url`` itself when empty."""
    if not schema:
        return url
    check_schema(schema)
    return make_url(url).update_query_dict({"schema": schema}).render_as_string(hide_password=False)


def check_schema(schema: str) -> None:
    if not SCHEMA_NAME.fullmatch(schema):
        raise DatabaseURLError(f"database schema {schema!r} must be a plain identifier (letters, digits, _)")


def split_schema(url: str) -> tuple[URL, str]:
    """The URL without its ``schema`` parameter, and that schema ("" when there is none)."""
    parsed = make_url(url)
    schema = parsed.query.get("schema", "")
    if isinstance(schema, tuple):
        raise DatabaseURLError("the database URL names more than one schema")
    if schema:
        check_schema(schema)
        if not parsed.drivername.startswith("postgresql"):
            raise DatabaseURLError("a database schema is only supported on PostgreSQL")
    return parsed.difference_update_query(["schema"]), schema


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        # [storage] busy_timeout travels as the URL's "timeout" parameter (Settings.database_url):
        # how long a write waits for another process's lock before it fails (then 451 4.3.0).
        parsed_url = make_url(url)
        busy = float(str(parsed_url.query.get("timeout", "30")))
        # Every aiosqlite connection is a thread of its own: a pool that is too small for the
        # sessions waiting on it opens and closes overflow connections (a thread and the pragmas
        # each) under load, so the pool keeps as many as the relay's concurrency needs.
        engine = create_async_engine(parsed_url.difference_update_query(["timeout"]),
                                     connect_args={"timeout": busy}, pool_size=20, max_overflow=20)
        _sqlite_setup(engine.sync_engine, busy)
        return engine
    parsed, schema = split_schema(url)
    connect_args: dict[str, Any] = {}
    if schema:
        # Only this schema: tables are created in it and looked up in it, nowhere else, so
        # two installations (or two test runs) on one database never see each other's rows.
        if parsed.drivername.endswith("+asyncpg"):
            connect_args["server_settings"] = {"search_path": schema}
        else:  # libpq-style drivers (psycopg)
            connect_args["options"] = f"-csearch_path={schema}"
    return create_async_engine(parsed, pool_size=10, max_overflow=10, pool_pre_ping=True,
                               connect_args=connect_args)


# SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN (primary result codes).
_READONLY = 8
_FILE_TROUBLE = (_READONLY, 10, 14)


def _sqlite_code(exc: BaseException | None) -> int:
    """The primary SQLite result code of a driver error (0 when there is none)."""
    while exc is not None:
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF
        exc = exc.__cause__ or getattr(exc, "orig", None)
    return 0


def _refuse_read_only(cur: Any) -> None:
    """Never pool a connection SQLite opened read-only.

    When the database files cannot be written at the moment a connection is opened (a read-only
    or full file system), SQLite quietly opens it read-only, and it stays so after the fault is
    gone: every write on it would fail for the life of the process.  A write that changes
    nothing (the schema's user_version set to itself, rolled back) tells; a read-only
    connection raises, so the pool never keeps it.  ``BEGIN IMMEDIATE`` alone would not tell in
    WAL mode.  A locked database is no such sign (the busy timeout is off meanwhile).
    """
    cur.execute("PRAGMA busy_timeout=0")
    try:
        cur.execute("BEGIN")
        cur.execute("PRAGMA user_version")
        version = int(cur.fetchone()[0])
        cur.execute(f"PRAGMA user_version={version}")
    except Exception as exc:
        if _sqlite_code(exc) == _READONLY or "readonly" in str(exc).lower():
            raise
    finally:
        try:
            cur.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - nothing was begun or written
            pass


def write_lock(url: str) -> Callable[[], AbstractAsyncContextManager[None]] | None:
    """For a SQLite file, a lock the serving processes take around each group commit.

    SQLite lets one connection write at a time; a second writer sleeps in SQLite's busy
    handler (1, 2, 5, ... up to 100 ms between tries), which under load turns into tens of
    milliseconds per message.  ``serve --workers N`` processes instead queue on an ``flock``
    beside the database (waited for in a thread, never on the event loop) and are handed the
    database in turn the moment it is free.  PostgreSQL needs none: None.
    """
    database = sqlite_file(url)
    if database is None:
        return None
    path = database.with_name(database.name + ".writelock")
    fd: list[int] = []

    @asynccontextmanager
    async def locked() -> AsyncIterator[None]:
        if not fd:
            fd.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        try:                  # free: taken at once, no thread hand-off
            fcntl.flock(fd[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await asyncio.to_thread(fcntl.flock, fd[0], fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd[0], fcntl.LOCK_UN)

    @contextmanager
    def locked_here() -> Iterator[None]:      # the same lock, taken in a writer thread
        if not fd:
            fd.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        fcntl.flock(fd[0], fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd[0], fcntl.LOCK_UN)
    @contextmanager
    def locked_now() -> Iterator[None]:       # the same lock only if it is free: BlockingIOError if not
        if not fd:
            fd.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        fcntl.flock(fd[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(fd[0], fcntl.LOCK_UN)
    locked.sync = locked_here  # type: ignore[attr-defined]
    locked.now = locked_now  # type: ignore[attr-defined]
    return locked


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for PostgreSQL or an in-memory database."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def make_sync_writer_engine(url: str) -> Engine | None:
    """For a SQLite file, a plain (thread) engine the serving process's writer commits its groups
    with, in one hand-off to a thread per group instead of one per statement (every statement
    through aiosqlite is a thread hop and an event-loop wake-up, and under load each wake-up
    waits behind the sessions' work).  PostgreSQL: None (asyncpg is the only driver)."""
    if sqlite_file(url) is None:
        return None
    parsed = make_url(url)
    busy = float(str(parsed.query.get("timeout", "30")))
    engine = create_engine(parsed.set(drivername="sqlite").difference_update_query(["timeout"]),
                           connect_args={"timeout": busy, "check_same_thread": False},
                           pool_size=2, max_overflow=4)   # the writer and the hot reads
    _sqlite_setup(engine, busy)
    return engine


class Reads:
    """The serving path's read-only statements (the facts counter, "anything due?", the day's
    count).  On SQLite each is one hand-off to a thread on a plain connection of the writer's
    engine: through aiosqlite a read costs a thread hop and an event-loop wake-up per call
    (cursor, execute, fetch, the rollback when the connection goes back).  WAL: a read never
    waits for the writer and sees every committed group.  Elsewhere the async engine."""

    def __init__(self, engine: AsyncEngine, sync_engine: Engine | None) -> None:
        self._engine = engine
        self._sync = sync_engine
        self._here: sqlite3.Connection | None = None
        self._here_failed = False

    def at_once(self, sql: str) -> list[tuple[Any, ...]] | None:
        """``sql``, a read of a row or two by primary key, run right here on the event loop; None
        when the database is not SQLite or cannot answer without waiting (the caller then awaits
        :meth:`all`).  A thread hand-off costs about 170 µs of CPU on a slow VM, such a read about
        13 µs.  The connection never waits: ``busy_timeout`` 0 (a database locked exclusively or
        being recovered answers SQLITE_BUSY at once) and ``query_only``."""
        if self._sync is None or self._here_failed:
            return None
        try:
            if self._here is None:
                here = sqlite3.connect(str(self._sync.url.database), isolation_level=None, check_same_thread=False)
                here.execute("PRAGMA busy_timeout=0")
                here.execute("PRAGMA query_only=1")
                self._here = here
            return self._here.execute(sql).fetchall()
        except sqlite3.Error:
            if self._here is None:
                self._here_failed = True       # cannot even open it here: the thread path from now on
            else:                              # busy, or the file in trouble: a new connection next time
                self.close()
            return None

    def close(self) -> None:
        if self._here is not None:
            self._here.close()
            self._here = None

    async def all(self, stmt: Executable, params: dict[str, Any] | None = None) -> Sequence[Row[Any]]:
        if self._sync is not None:
            return await asyncio.to_thread(self._all_sync, stmt, params)
        async with self._engine.connect() as conn:
            return (await conn.execute(stmt, params)).all()

    def _all_sync(self, stmt: Executable, params: dict[str, Any] | None) -> Sequence[Row[Any]]:
        assert self._sync is not None
        with self._sync.connect() as conn:
            return conn.execute(stmt, params).all()


def _sqlite_setup(engine: Engine, busy: float) -> None:
    """Every SQLite connection of the relay: WAL, ``synchronous=FULL`` (a committed row is on disk
    before the 250), foreign keys, the busy timeout, and never a read-only one in the pool.

    ``secure_delete=FAST`` (docs/decisions/0017): Debian's SQLite zeroes every freed page by
    default, so a delivered 100 KB body (cut to its header block) cost another 100 KB of zeros
    through the WAL and the checkpoint; FAST zeroes deleted content only where no extra page is
    written."""

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA secure_delete=FAST")
        cur.execute("PRAGMA foreign_keys=ON")
        try:
            _refuse_read_only(cur)
        finally:
            cur.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
            cur.close()

    @event.listens_for(engine, "handle_error")
    def _broken_files(ctx):  # type: ignore[no-untyped-def]
        # Read-only, I/O error, cannot open: the files were in trouble when this connection
        # used them; throw the pool's connections away rather than keep a crippled one.
        if _sqlite_code(ctx.original_exception) in _FILE_TROUBLE:
            ctx.is_disconnect = True


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker:  # type: ignore[type-arg]
    return async_sessionmaker(engine, expire_on_commit=False)


def single_host(sessions: async_sessionmaker) -> bool:  # type: ignore[type-arg]
    """Whether the database can only be this host's (SQLite): then every spool file under the
    state directory is this relay's, whatever host name wrote it (a container's changes when it
    is recreated).  On PostgreSQL a spool file belongs to the node whose host name it bears."""
    bind = sessions.kw.get("bind")
    return getattr(getattr(bind, "dialect", None), "name", "") == "sqlite"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def _create_schema(conn: AsyncConnection) -> None:
    """On PostgreSQL, create the schema the connection's search_path names, if it is missing."""
    if conn.dialect.name != "postgresql":
        return
    path = (await conn.execute(text("SHOW search_path"))).scalar_one()
    first = path.split(",")[0].strip().strip('"')
    if SCHEMA_NAME.fullmatch(first):  # never "$user", never anything needing quotes
        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{first}"'))


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    cfg = alembic_config(str(engine.url))

    def _upgrade(connection) -> None:  # type: ignore[no-untyped-def]
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")

    async with engine.begin() as conn:
        await _create_schema(conn)
        await conn.run_sync(_upgrade)


async def schema_is_current(engine: AsyncEngine) -> bool:
    head = ScriptDirectory.from_config(alembic_config(str(engine.url))).get_current_head()

    def _current(connection) -> str | None:  # type: ignore[no-untyped-def]
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_current) == head
