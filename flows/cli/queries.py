"""``randes tasks`` and ``randes versions``: registry queries.

They open the registry alone and import neither torch nor Prefect, so they answer fast.
``tasks --group GROUP`` lists the tasks of every member of a bundle group.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

import flows.cli.grouped as grouped
from flows.cli.common import (
    open_registry,
    print_json,
    print_tasks,
    require,
    serving_label,
    task_row,
)
from flows.cli.options import GroupFlag, JsonFlag
from flows.console import print_table

app = typer.Typer()


@app.command()
def tasks(
    ctx: typer.Context,
    bundle: Annotated[str | None, typer.Argument()] = None,
    version: Annotated[
        int | None, typer.Option(help="Tasks as of this version of BUNDLE (default: now).")
    ] = None,
    include_removed: Annotated[
        bool, typer.Option("--all", help="Also list tasks that were removed.")
    ] = False,
    as_json: JsonFlag = False,
    group: GroupFlag = False,
) -> None:
    """Tasks held by a bundle (or by all bundles), with seeds and versions."""
    if group:
        if version is not None or include_removed:
            raise typer.BadParameter("--version and --all do not apply to --group")
        grouped.tasks(require(ctx, bundle, "GROUP", "argument"), as_json=as_json)
        return
    if version is not None and bundle is None:
        raise typer.BadParameter("--version needs a BUNDLE")
    with open_registry() as registry:
        records = registry.tasks(bundle, version=version, include_removed=include_removed)
    print_tasks([task_row(r) for r in records], "tasks", as_json)


@app.command()
def versions(
    bundle: Annotated[str, typer.Argument()],
    as_json: JsonFlag = False,
) -> None:
    """Versions of a bundle with status, parent and aliases."""
    registry = open_registry()
    try:
        records = registry.list_versions(bundle)
        aliases = registry.aliases(bundle)
        transform = registry.get_bundle(bundle).transform
    finally:
        registry.close()
    by_version: dict[int, list[str]] = {}
    for alias in aliases:
        by_version.setdefault(alias.version, []).append(alias.name)
    rows: list[dict[str, Any]] = [
        {
            "version": r.version,
            "parent_version": r.parent_version,
            "status": r.status,
            "aliases": sorted(by_version.get(r.version, [])),
            "created_at": r.created_at.isoformat(),
            "manifest_key": r.manifest_key,
        }
        for r in records
    ]
    if as_json:
        print_json(rows)
        return
    print_table(
        f"{bundle} versions (serving {serving_label(transform)})",
        ["version", "parent", "status", "aliases", "created"],
        [
            [
                r["version"],
                r["parent_version"],
                r["status"],
                ",".join(r["aliases"]),
                r["created_at"],
            ]
            for r in rows
        ],
    )
