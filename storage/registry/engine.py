"""Engine construction for the registry: SQLite (embedded default) or PostgreSQL.

SQLite needs care to be a correct multi-process registry:
- WAL journal so readers never block the writer (and vice versa);
- a busy timeout so a writer waits for the lock instead of failing at once;
- foreign keys ON (SQLite leaves them off per connection);
- SQLAlchemy, not the ``sqlite3`` driver, emits BEGIN. The driver's legacy mode starts no
  transaction for SELECT, so "read head, then insert head + 1" would not be atomic; and a
  deferred transaction that reads then writes fails with SQLITE_BUSY (no wait) when another
  writer committed in between. Write transactions therefore use ``BEGIN IMMEDIATE``, taking
  the write lock up front: writers queue on the busy timeout and each sees the one before.

PostgreSQL goes through psycopg 3 with READ COMMITTED; races between writers are decided by
unique constraints (a loser waits on the index entry, then gets a unique violation).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry

# Execution option read by the BEGIN hook: how a SQLite transaction begins.
SQLITE_BEGIN_OPTION = "randes_sqlite_begin"

# How long a SQLite writer waits for the lock, and a PostgreSQL client for a connection.
SQLITE_BUSY_TIMEOUT_S = 60.0
PG_CONNECT_TIMEOUT_S = 10


def write_options() -> dict[str, Any]:
    """Execution options for a connection that will write (``BEGIN IMMEDIATE`` on SQLite)."""
    return {SQLITE_BEGIN_OPTION: "IMMEDIATE"}


def _sqlite_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    assert isinstance(dbapi_connection, sqlite3.Connection)
    # Take BEGIN away from the driver; the "begin" hook below emits it.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")


def make_engine(url: str) -> Engine:
    """An engine for `url`, configured as described in the module docstring.

    For a SQLite file, the parent directory is created: the embedded default lives under
    RANDES_HOME, which may not exist yet on a fresh machine.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            # On failure, connecting fails too and says so (DatabaseUnavailableError).
            with contextlib.suppress(OSError):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            # psycopg 3 is the driver this project ships; plain URLs would mean psycopg2.
            parsed = parsed.set(drivername="postgresql+psycopg")
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        return create_engine(parsed, connect_args=connect_args, pool_pre_ping=True)
    return create_engine(parsed)
