"""The database the tests run on: SQLite, or PostgreSQL when ``BSM_RELAY_TEST_DATABASE_URL`` says so.

Unset, every test database is a SQLite file in the test's own directory.  Set (for example
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``, as ``make test-pg`` does), every test
database is a fresh schema ``t_<random hex>`` on that server, so test runs (and tests) never see
each other's rows; the schemas a test process made are dropped when it ends (and by
:meth:`TestDatabase.drop` where a test can do it earlier).

Everything in the tests that opens the relay's database goes through here: the relay's
``[storage]`` lines (:meth:`TestDatabase.toml`), an engine for the delivery harness
(:meth:`TestDatabase.engine`), the serving relay's hot reads on a migrated database
(:func:`serving_reads`) and read-only queries from end-to-end tests (:meth:`TestDatabase.query`).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bsm_relay.relay import db

ENV = "BSM_RELAY_TEST_DATABASE_URL"
# Where the two-node test looks for PostgreSQL when the suite itself runs on SQLite.
LOCAL_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def configured_url() -> str:
    return os.environ.get(ENV, "").strip()


def on_postgres() -> bool:
    return configured_url().startswith("postgresql")


def _plain_url(url: str) -> str:
    """The SQLAlchemy URL as asyncpg takes it (no ``+driver``, no query)."""
    return make_url(url).set(drivername="postgresql", query={}).render_as_string(hide_password=False)


async def _pg(url: str, schema: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import asyncpg

    conn = await asyncpg.connect(_plain_url(url), server_settings={"search_path": schema} if schema else {},
                                 timeout=10)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *params)]
    finally:
        await conn.close()


def _numbered(sql: str) -> str:
    """``?`` placeholders (SQLite) as ``$1, $2 ...`` (PostgreSQL); the tests' SQL has no ``?`` in strings."""
    parts = sql.split("?")
    return "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, start=1))


def postgres_reachable(url: str = LOCAL_POSTGRES) -> bool:
    try:
        asyncio.run(_pg(url, "", "SELECT 1"))
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
    return True


_created: list[tuple[str, str]] = []
_created_lock = threading.Lock()


@atexit.register
def _drop_leftover_schemas() -> None:
    """Registered before helpers' relay clean-up, so it runs after every relay is gone."""
    with _created_lock:
        leftovers = list(_created)
        _created.clear()
    for url, schema in leftovers:
        try:
            asyncio.run(_pg(url, "", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        except Exception:  # noqa: BLE001 - the server may be gone already; nothing to clean then
            pass


@dataclass(frozen=True)
class TestDatabase:
    """One test's database: a SQLite file, or a schema of its own on PostgreSQL."""

    __test__ = False  # not a pytest test class

    url: str          # [storage] database_url ("" for the SQLite default in the state directory)
    schema: str       # [storage] database_schema ("" on SQLite)
    sqlite_path: Path | None = None

    @property
    def is_postgres(self) -> bool:
        return bool(self.schema)

    @property
    def engine_url(self) -> str:
        if self.sqlite_path is not None:
            return f"sqlite+aiosqlite:///{self.sqlite_path}"
        return db.with_schema(self.url, self.schema)

    def toml(self) -> str:
        """The ``[storage]`` keys besides ``state_dir`` that put a relay on this database."""
        if not self.is_postgres:
            return ""
        return f'database_url = "{self.url}"\ndatabase_schema = "{self.schema}"\n'

    def engine(self) -> AsyncEngine:
        return db.make_engine(self.engine_url)

    async def aquery(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        if self.is_postgres:
            return await _pg(self.url, self.schema, _numbered(sql), *params)
        return await asyncio.to_thread(self._sqlite_query, sql, params)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read-only SQL written with ``?`` placeholders, on either database (from sync tests)."""
        if self.is_postgres:
            return asyncio.run(_pg(self.url, self.schema, _numbered(sql), *params))
        return self._sqlite_query(sql, params)

    def execute(self, sql: str, *params: Any) -> None:
        """A write, as someone other than the relay would make it (the marketplace's own SQL)."""
        if self.is_postgres:
            asyncio.run(_pg(self.url, self.schema, _numbered(sql), *params))
            return
        assert self.sqlite_path is not None
        with sqlite3.connect(self.sqlite_path, timeout=30) as conn:
            conn.execute(sql, params)

    def _sqlite_query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        assert self.sqlite_path is not None
        with sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True) as conn:
            return conn.execute(sql, params).fetchall()

    async def adrop(self) -> None:
        if self.is_postgres:
            await _pg(self.url, "", f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            _forget(self.url, self.schema)

    def drop(self) -> None:
        if self.is_postgres:
            asyncio.run(self.adrop())


def _forget(url: str, schema: str) -> None:
    with _created_lock:
        if (url, schema) in _created:
            _created.remove((url, schema))


def fresh(state_dir: Path, url: str | None = None) -> TestDatabase:
    """A new, empty database for one test or one relay whose state directory is ``state_dir``.

    ``url``: a PostgreSQL URL to use whatever the environment says (the two-node test);
    default: ``BSM_RELAY_TEST_DATABASE_URL``, else SQLite in ``state_dir``.
    """
    url = configured_url() if url is None else url
    if not url:
        return TestDatabase("", "", Path(state_dir).resolve() / "relay.db")
    if not url.startswith("postgresql"):
        raise ValueError(f"{ENV} must be a PostgreSQL URL (or unset for SQLite), not {url!r}")
    schema = "t_" + secrets.token_hex(6)
    with _created_lock:
        _created.append((url, schema))
    return TestDatabase(url, schema)


@asynccontextmanager
async def serving_reads(state_dir: Path, reads_class: type[db.Reads] = db.Reads) -> AsyncIterator[tuple[db.Reads, Any]]:
    """A fresh migrated database and the serving relay's hot reads on it (``reads_class``: a
    subclass that records what it reads), with a session maker: (reads, sessions).  Everything
    is closed and the database dropped at the end."""
    database = fresh(state_dir)
    engine = database.engine()
    await db.migrate(engine)
    sync = db.make_sync_writer_engine(database.engine_url)
    reads = reads_class(engine, sync)
    try:
        yield reads, db.sessionmaker(engine)
    finally:
        reads.close()
        await engine.dispose()
        if sync is not None:
            sync.dispose()
        await database.adrop()
