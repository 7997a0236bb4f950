"""The registry's connection: engine and URL, migrations, transactions, error mapping.

Why one module: everything that touches the database as a whole (opening it, migrating
its schema, beginning a transaction, turning a driver error about the database into a
registry error, and keeping the URL's secrets out of every message) is one concern; the
concept modules (bundles, versions, tasks, ...) only see `RegistryCore._tx`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Self

from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.orm import Session, sessionmaker

from storage.redact import database_url_for_humans, database_url_secrets, redact_text
from storage.registry.engine import make_engine, write_options
from storage.registry.errors import (
    DatabaseUnavailableError,
    MigrationError,
    RegistryError,
    SchemaNotInitializedError,
)

# How the backends say "that table/column does not exist" (schema not migrated) ...
_PG_UNDEFINED = ("42P01", "42703")
_SQLITE_UNDEFINED = ("no such table", "no such column")
# ... and "the database file cannot be used right now".
_SQLITE_UNAVAILABLE = (
    "unable to open database",
    "database is locked",
    "disk i/o error",
    "file is not a database",
    "readonly database",
    "database or disk is full",
    "database disk image is malformed",
    "malformed database schema",
    "not authorized",
)


def _first_line(exc: DBAPIError) -> str:
    text = str(exc.orig if exc.orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def migrations_dir() -> Path:
    """The Alembic script directory shipped inside the `migrations` package."""
    return Path(str(resources.files("migrations")))


class RegistryCore:
    """The database a registry talks to: engine, sessions, schema and error mapping.

    The base of every concept mixin, which reach the database only through `_tx`
    (one short transaction a call); `Registry` composes them.
    """

    def __init__(self, url: str) -> None:
        try:
            self._url = make_url(url)
            self._engine: Engine = make_engine(url)
        except (ArgumentError, ValueError, ImportError, NoSuchModuleError) as exc:
            # never quote the URL: a malformed one may still hold a password
            raise RegistryError(
                f"invalid registry database URL (RANDES_DATABASE_URL): {type(exc).__name__}; "
                "expected e.g. sqlite:///path/registry.db or postgresql+psycopg://user@host/db"
            ) from None
        self._writer = self._engine.execution_options(**write_options())
        self._read_session = sessionmaker(self._engine, expire_on_commit=False)
        self._write_session = sessionmaker(self._writer, expire_on_commit=False)

    @classmethod
    def open_existing(cls, url: str) -> Self:
        """The registry at ``url`` for a read-only query: an embedded (SQLite) registry
        that does not exist yet is an error, not a new empty database and its folders."""
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            return cls(url)  # the constructor reports it
        database = parsed.database
        if (
            parsed.get_backend_name() == "sqlite"
            and database
            and database != ":memory:"
            and not database.startswith("file:")
            and not Path(database).expanduser().is_file()
        ):
            raise SchemaNotInitializedError(
                f"no registry database at {database} (run `randes init`)"
            )
        return cls(url)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL with its password hidden (safe to log)."""
        return database_url_for_humans(self._url)

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    def close(self) -> None:
        """Close every pooled connection (the registry can still be used afterwards)."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to `revision` with Alembic (the only way the schema changes).

        Runs in one transaction through this registry's own engine, so SQLite gets the
        same pragmas and a failed migration leaves the previous schema as it was.
        """
        from alembic import command

        self._alembic(command.upgrade, revision)

    def downgrade(self, revision: str) -> None:
        """Take the schema back to `revision` (``base``: drop every registry table)."""
        from alembic import command

        self._alembic(command.downgrade, revision)

    def _alembic(self, action: Callable[[Any, str], None], revision: str) -> None:
        from alembic.config import Config
        from alembic.util.exc import CommandError

        directory = migrations_dir()
        config = Config(str(directory / "alembic.ini"))
        config.set_main_option("script_location", str(directory))
        config.attributes["configure_logger"] = False
        try:
            with self._writer.begin() as conn:
                config.attributes["connection"] = conn
                action(config, revision)
        except DBAPIError as exc:
            if isinstance(translated := self._translate(exc), DatabaseUnavailableError):
                raise translated from None
            raise MigrationError(
                f"migrating the registry schema of {self.url} to {revision} failed "
                f"(nothing was changed): {_first_line(exc)}"
            ) from exc
        except CommandError as exc:
            raise MigrationError(f"cannot migrate the registry schema: {exc}") from exc

    # -- transactions -------------------------------------------------------------------

    def _translate(self, exc: DBAPIError) -> RegistryError | None:
        """The registry error for a driver error about the database as a whole
        (unreachable, locked, schema missing), or None for one the caller must handle."""
        if isinstance(exc, IntegrityError):
            return None
        detail = redact_text(_first_line(exc), database_url_secrets(self._url))
        sqlstate = getattr(exc.orig, "sqlstate", None)
        lowered = detail.lower()
        if sqlstate in _PG_UNDEFINED or any(m in lowered for m in _SQLITE_UNDEFINED):
            return SchemaNotInitializedError(
                f"registry database {self.url} has no registry schema or an outdated one "
                f"(run `randes init`): {detail}"
            )
        unavailable = (
            exc.connection_invalidated
            or any(m in lowered for m in _SQLITE_UNAVAILABLE)
            or (
                self.backend == "postgresql"
                and isinstance(exc, OperationalError)
                and (sqlstate is None or str(sqlstate).startswith(("08", "53", "57")))
            )
        )
        if unavailable:
            return DatabaseUnavailableError(f"registry database {self.url} unavailable: {detail}")
        return None

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Session]:
        """One transaction: committed on normal exit, rolled back on any exception."""
        factory = self._write_session if write else self._read_session
        with self._translating(), factory() as session, session.begin():
            yield session

    @contextmanager
    def _translating(self) -> Iterator[None]:
        """Re-raise a driver error about the database as a whole as its registry error
        (`_translate`); any other driver error passes through for the caller."""
        try:
            yield
        except DBAPIError as exc:
            translated = self._translate(exc)
            if translated is None:
                raise
            raise translated from None

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None: never migrated)."""
        from alembic.runtime.migration import MigrationContext

        with self._translating(), self._engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
