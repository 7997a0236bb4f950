"""Alembic environment of the registry schema.

Two ways in:
- `Registry.upgrade()` hands over an open connection (``config.attributes["connection"]``)
  inside a transaction it commits, so the schema changes through the same engine
  configuration (SQLite pragmas, psycopg) the registry uses;
- the ``alembic`` command line, which builds that engine from ``-x url=...``, from
  ``sqlalchemy.url``, or from the RANDES_* settings.

Migrations run in one transaction on both backends (SQLite supports transactional DDL
once the driver's own transaction handling is out of the way, see
`storage.registry.engine`), so a failed upgrade leaves the previous schema intact. On
PostgreSQL a transaction-scoped advisory lock serializes concurrent upgrades
(two `randes init` at once).
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import Connection, text

from storage.registry.engine import make_engine, write_options
from storage.registry.models import Base, UTCDateTime
from storage.registry.validation import ValidationCheck  # noqa: F401  (its tables on Base)

# An arbitrary constant: the advisory lock key that serializes schema upgrades.
MIGRATION_LOCK_KEY = 0x72616E646573  # "randes"

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return url
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from storage.settings import load_settings

    return load_settings().resolved_database_url


def _render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render application types as plain `sa` types, so migrations never import the app."""
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_item=_render_item,
        render_as_batch=True,  # SQLite cannot ALTER most things: future migrations batch
        compare_type=True,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.execution_options(**write_options()).connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
