"""``randes base add|list``: the base models bundles are built over."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import open_registry, open_workspace, print_json
from flows.cli.options import JsonFlag
from flows.console import out, print_table

app = typer.Typer(help="Base models.", no_args_is_help=True)


@app.command("add")
def base_add(
    name: Annotated[str, typer.Argument(help="Name of the base model.")],
    source: Annotated[str, typer.Argument(help="Path, s3://bucket/key or hf://org/repo[@rev].")],
) -> None:
    """Register and store a base model."""
    with open_workspace() as ws:
        record = ws.add_base(name, source)
        out.print(f"base {record.name}: {record.uri} (sha256 {record.sha256[:12]})")


@app.command("list")
def base_list(as_json: JsonFlag = False) -> None:
    """Registered base models."""
    from storage.queries import list_bases

    with open_registry() as registry:
        rows = list_bases(registry)
    if as_json:
        print_json(rows)
        return
    print_table(
        "bases",
        ["name", "uri", "sha256", "created"],
        [[r["name"], r["uri"], r["sha256"][:12], r["created_at"]] for r in rows],
    )
