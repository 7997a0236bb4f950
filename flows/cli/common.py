"""What every command module shares: opening the workspace or the registry, version
references, JSON and size output, and the usage errors the commands raise themselves.

Opening is lazy (imports inside the functions): the registry queries (`tasks`,
`versions`) must import neither torch nor Prefect, so that they answer fast.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer

from flows.console import print_table
from randes.errors import RandesError

if TYPE_CHECKING:
    from storage.registry import Registry, TaskRecord
    from storage.workspace import Workspace


class AlreadyFoldedError(RandesError):
    """`randes fold` of a checkpoint the bundle holds under another task name."""


def open_workspace() -> Workspace:
    """The configured workspace (store, registry and cache), from the settings."""
    from storage.workspace import Workspace

    return Workspace.open()


def open_registry() -> Registry:
    """The configured registry alone: what the queries need, without the store."""
    from storage.registry import Registry
    from storage.settings import load_settings

    return Registry.open_existing(load_settings().resolved_database_url)


def pin_version(registry: Registry, bundle: str, ref: str | None) -> tuple[str, str]:
    """``ref`` (head, version or alias) pinned to its version number now, and the context
    that names it in an integrity error: "bundle B version N"."""
    from storage.cache import version_context

    record = registry.resolve(bundle, ref)
    return str(record.version), version_context(bundle, record.version)


def split_ref(spec: str) -> tuple[str, str | None]:
    """``BUNDLE[@VERSION|@ALIAS]`` -> (bundle, ref or None for the head)."""
    bundle, _, ref = spec.partition("@")
    return bundle, (ref or None)


def print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def task_row(record: TaskRecord) -> dict[str, Any]:
    """One task as `randes tasks --json` lists it."""
    return {
        "bundle": record.bundle,
        "task": record.name,
        "seed": record.seed,
        "added_in_version": record.added_in_version,
        "removed_in_version": record.removed_in_version,
        "source_uri": record.source_uri,
        "source_sha256": record.source_sha256,
    }


def print_tasks(rows: list[dict[str, Any]], title: str, as_json: bool) -> None:
    """Task rows (`task_row`) as JSON or as a table."""
    if as_json:
        print_json(rows)
        return
    print_table(
        title,
        ["bundle", "task", "seed", "added in", "source"],
        [[r["bundle"], r["task"], r["seed"], r["added_in_version"], r["source_uri"]] for r in rows],
    )


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop always returns


def serving_label(transform: dict[str, Any]) -> str:
    """The bundle's serving format, from its registry row without importing torch (the
    registry queries answer fast); a row older than the field gets the default."""
    if "serving" not in transform:
        from randes.config import DEFAULT_SERVING

        return DEFAULT_SERVING.name
    scheme = transform["serving"]
    if not isinstance(scheme, dict):
        return "master"
    group = scheme.get("group_size")
    return f"int{scheme.get('bits')}-{'row' if group is None else f'g{group}'}"


class UsageError(typer.BadParameter):
    """A malformed command line that a command finds itself (a parameter only one form
    of it takes), worded as click words its own: exit status 2, no "Invalid value"."""

    def format_message(self) -> str:
        return self.message


def refuse_extra_arguments(ctx: typer.Context, extra: Sequence[str] | None) -> None:
    """Arguments a command takes only in its ``--group`` form, given without it."""
    if extra:
        raise UsageError(f"Got unexpected extra argument(s) ({' '.join(extra)})", ctx=ctx)


def require(ctx: typer.Context, value: str | None, name: str, kind: str = "option") -> str:
    """A parameter required in one form of a command only (with or without ``--group``)."""
    if value is None:
        raise UsageError(f"Missing {kind} '{name}'.", ctx=ctx)
    return value
