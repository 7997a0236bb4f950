"""Set-up the registry tests share: a base to hang bundles and groups on, the schema's
table names, versions with no objects."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import inspect

from storage.registry import Registry
from storage.registry.engine import make_engine

TRANSFORM = {"sign_flip": True, "layer_shuffle": True}


@contextmanager
def upgraded_registry(url: str, *, tiny_base: bool = False) -> Iterator[Registry]:
    """A Registry on the empty database ``url``, its schema at the newest migration
    (with base ``tiny`` if asked), closed when the block ends."""
    with Registry(url) as registry:
        registry.upgrade()
        if tiny_base:
            add_tiny_base(registry)
        yield registry


def add_tiny_base(reg: Registry) -> None:
    """Base ``tiny``, no objects: what a bundle or a group needs to exist."""
    reg.add_base("tiny", "file:///base", "0" * 64, "manifests/b.json", "1" * 64, [])


def commit_empty(reg: Registry, bundle: str, version: int, manifest_key: str) -> None:
    """Version ``version`` of ``bundle`` on top of version - 1, with no tasks or objects."""
    reg.commit_version(
        bundle,
        version=version,
        parent_version=version - 1 if version > 1 else None,
        manifest_key=manifest_key,
        manifest_sha256=f"{version}" * 64,
        object_keys=[],
    )


def table_names(url: str) -> set[str]:
    """The tables the database at ``url`` holds now (a fresh engine: no cached schema)."""
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
