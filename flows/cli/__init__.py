"""The `randes` command line: the contract of DESIGN.md, typer over the storage layer.

This root module creates the app and adds every command module's sub-app; imports point
one way only (root -> command modules -> shared helpers), no command module imports it:

- `flows.cli.versions`  init, fold, remove, materialize, pull, gc
- `flows.cli.queries`   tasks, versions (registry only: neither torch nor Prefect)
- `flows.cli.runs`      ingest, validate, publish, demo (the Prefect flows)
- `flows.cli.base`      ``randes base add|list``
- `flows.cli.bundle`    ``randes bundle create|list|show|validation``
- `flows.cli.group`     ``randes group ...``
- shared: `flows.cli.grouped` (the group path, also behind ``CMD --group``),
  `flows.cli.options` (option types and checks), `flows.cli.common` (opening the
  workspace or registry, references, output), `flows.cli.errors` (the output
  boundary: one ``error:`` line and the exit status of every failure).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from flows.cli import base, bundle, group, queries, runs, versions
from flows.cli.errors import run
from flows.console import out

app: typer.Typer = typer.Typer(
    name="randes",
    help="Store many fine-tunes of one base model in the space of two (RanDeS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for commands in (versions.app, queries.app, runs.app):  # top-level commands, in help order
    app.add_typer(commands)
app.add_typer(base.app, name="base")
app.add_typer(bundle.app, name="bundle")
app.add_typer(group.app, name="group")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.print(f"randes {version('randes-pipeline')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    """The root of the command tree; ``--version`` is handled by its callback."""


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point: one line per user error, non-zero exit."""
    return run(app, argv)


def entry() -> None:
    sys.exit(main())
