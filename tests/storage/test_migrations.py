"""Alembic migrations of the registry on real SQLite and real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from storage.registry import MigrationError, Registry, SchemaNotInitializedError
from storage.registry.engine import make_engine
from storage.registry.models import Base
from storage.registry.registry import migrations_dir
from tests.storage.registries import table_names

REPO = Path(__file__).resolve().parents[2]
REGISTRY_TABLES = set(Base.metadata.tables)
HEAD = "0004"  # the newest migration (0004: the ledger's digest kind)


def _schema_diff(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "target_metadata": Base.metadata}
            )
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_scripts_ship_inside_the_package() -> None:
    directory = migrations_dir()
    for name in ("alembic.ini", "env.py", "script.py.mako"):
        assert (directory / name).is_file(), name
    script = ScriptDirectory.from_config(Config(str(directory / "alembic.ini")))
    assert script.get_heads() == [HEAD]  # one linear history
    assert script.get_base() == "0001"


def test_upgrade_from_empty_then_downgrade_to_base(registry_url: str) -> None:
    reg = Registry(registry_url)
    try:
        assert reg.schema_revision() is None
        reg.upgrade()
        assert reg.schema_revision() == HEAD
        assert table_names(registry_url) >= REGISTRY_TABLES

        reg.downgrade("base")
        assert reg.schema_revision() is None
        assert table_names(registry_url) & REGISTRY_TABLES == set()

        reg.upgrade()  # and back up, to a working registry
        reg.add_base("base", "file:///base", "0" * 64, "bases/base.json", "1" * 64, [])
        assert [b.name for b in reg.list_bases()] == ["base"]
    finally:
        reg.close()


def test_orm_and_migrated_schema_agree(registry_url: str) -> None:
    """Autogenerate finds nothing to do after `upgrade head`: models == migrations."""
    reg = Registry(registry_url)
    try:
        reg.upgrade()
    finally:
        reg.close()
    assert _schema_diff(registry_url) == []


def test_alembic_command_line(sqlite_url: str) -> None:
    """The shipped alembic.ini works from the command line, with the URL given by -x."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ini = str(migrations_dir() / "alembic.ini")
    base = [sys.executable, "-m", "alembic", "-c", ini, "-x", f"url={sqlite_url}"]
    for args in (["upgrade", "head"], ["check"], ["downgrade", "base"]):
        result = subprocess.run(
            [*base, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
    assert table_names(sqlite_url) & REGISTRY_TABLES == set()


def test_failed_migration_changes_nothing(registry_url: str) -> None:
    """Migrations run in one transaction, on SQLite too: an error rolls all of it back."""
    engine = make_engine(registry_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE aliases (id INTEGER PRIMARY KEY)")  # in the way
    engine.dispose()
    reg = Registry(registry_url)
    try:
        with pytest.raises(MigrationError, match="aliases"):
            reg.upgrade()
        assert table_names(registry_url) == {"aliases"}
        assert reg.schema_revision() is None
    finally:
        reg.close()


def test_unmigrated_database_says_run_init(registry_url: str) -> None:
    reg = Registry(registry_url)
    try:
        with pytest.raises(SchemaNotInitializedError, match="randes init"):
            reg.list_bundles()
    finally:
        reg.close()
