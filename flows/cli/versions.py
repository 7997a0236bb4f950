"""The commands that make and read a bundle's stored versions: ``init``, ``fold``,
``remove``, ``materialize``, ``pull``, ``gc``.

``fold``, ``materialize`` and ``pull`` also take ``--group``: their first argument then
names a bundle group and the group path (`flows.cli.grouped`) runs instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import flows.cli.grouped as grouped
from flows.cli.common import (
    AlreadyFoldedError,
    open_workspace,
    pin_version,
    refuse_extra_arguments,
    require,
    split_ref,
)
from flows.cli.options import GroupFlag, MasterFlag, PullMasterFlag, ScaleOption, positive_scale
from flows.console import out, progress_bar
from storage.redact import database_url_for_humans

app = typer.Typer()


@app.command()
def init() -> None:
    """Create or upgrade the registry schema and the store root."""
    with open_workspace() as ws:
        ws.init()
        # soft_wrap: a URL printed whole, never cut at the console's width
        registry = database_url_for_humans(ws.settings.resolved_database_url)
        out.print(f"registry: {registry}", soft_wrap=True)
        out.print(f"store:    {ws.store.url}", soft_wrap=True)


@app.command()
def fold(
    ctx: typer.Context,
    bundle: Annotated[str, typer.Argument(help="Bundle to fold into (--group: the group).")],
    source: Annotated[
        str, typer.Argument(help="Checkpoint: path, s3://... or hf://org/repo[@rev].")
    ],
    task_arg: Annotated[
        str | None, typer.Argument(metavar="TASK", help="Task name (--group only).")
    ] = None,
    task: Annotated[
        str | None,
        typer.Option("--task", help="Task name for this checkpoint (required without --group)."),
    ] = None,
    scale: Annotated[
        float | None, typer.Option(help="Per-task lambda override.", callback=positive_scale)
    ] = None,
    group: GroupFlag = False,
) -> None:
    """Fold one fine-tuned checkpoint into a bundle as a new version.

    Folding a checkpoint the bundle already holds under the same task name is a no-op
    (exit 0), so a retried command is harmless. The same bytes under another task name
    are refused: the bundle cannot hold one delta twice, and exiting 0 would tell a
    script that a task exists which does not. With --group the checkpoint goes to the
    group's first member with room for it (or a new one).
    """
    if group:
        grouped.fold(bundle, source, task_arg, task, scale)
        return
    refuse_extra_arguments(ctx, [] if task_arg is None else [task_arg])
    task = require(ctx, task, "--task")
    with open_workspace() as ws, progress_bar(f"folding {task}") as progress:
        outcome = ws.fold(bundle, source, task, scale=scale, progress=progress)
    if outcome.skipped and outcome.task != task:
        raise AlreadyFoldedError(
            f"this checkpoint is already in bundle {bundle!r} as task {outcome.task!r} "
            f"(version {outcome.version}); not adding it again as {task!r}"
        )
    if outcome.skipped:
        out.print(
            f"already folded as task {outcome.task!r} in version {outcome.version}: nothing to do"
        )
    else:
        out.print(f"{bundle}: version {outcome.version} adds task {task!r}")


@app.command()
def remove(
    bundle: Annotated[str, typer.Argument()],
    task: Annotated[str, typer.Argument()],
) -> None:
    """Fold a task out (its source is fetched again by uri and checked by sha256)."""
    with open_workspace() as ws, progress_bar(f"removing {task}") as progress:
        outcome = ws.remove(bundle, task, progress=progress)
    if outcome.skipped:  # like a retried fold: what was asked for is the state now
        out.print(f"task {task!r} already removed in version {outcome.version}: nothing to do")
        return
    out.print(f"{bundle}: version {outcome.version} removes task {task!r}")


@app.command()
def materialize(
    spec: Annotated[str, typer.Argument(metavar="BUNDLE[@REF]")],
    task: Annotated[str, typer.Argument()],
    dest: Annotated[Path, typer.Argument(help="New (or empty) directory for the model.")],
    scale: ScaleOption = None,
    master: MasterFlag = False,
    group: GroupFlag = False,
) -> None:
    """Write one task's standalone model (model.safetensors + config.json).

    It is retrieved from the version's serving superposition (quantized, see `randes
    bundle create --serving`), or from the fp32 master with --master. With --group the
    first argument is GROUP or GROUP@ALIAS: the first member whose head (or ALIAS) holds
    TASK writes it.
    """
    if group:
        grouped.materialize(spec, task, dest, scale=scale, master=master)
        return
    from storage.cache import integrity_context

    bundle, ref = split_ref(spec)
    with open_workspace() as ws, progress_bar(f"materializing {task}") as progress:
        pinned, context = pin_version(ws.registry, bundle, ref)
        with integrity_context(context):
            path = ws.materialize(
                bundle, pinned, task, dest, scale=scale, progress=progress, master=master
            )
    out.print(f"wrote {path}")


@app.command()
def pull(
    spec: Annotated[str, typer.Argument(metavar="BUNDLE[@VERSION|@ALIAS]")],
    dest: Annotated[Path, typer.Argument()],
    master: PullMasterFlag = False,
    group: GroupFlag = False,
) -> None:
    """Download one version with every object it needs; every sha256 is verified.

    A version that serves a quantized superposition is pulled without its fp32 master
    (what materialize needs, several times smaller); --master pulls a complete copy.
    With --group the first argument is GROUP or GROUP@ALIAS: every member's head (or
    ALIAS) is pulled into one local store.
    """
    if group:
        grouped.pull(spec, dest, master=master)
        return
    from storage.cache import integrity_context

    bundle, ref = split_ref(spec)
    with open_workspace() as ws:
        pinned, context = pin_version(ws.registry, bundle, ref)
        with integrity_context(context):
            record = ws.pull(bundle, pinned, dest, master=master)
    out.print(f"pulled {bundle} version {record.version} to {dest}")


@app.command()
def gc(
    grace: Annotated[
        float, typer.Option(help="Keep unreferenced objects younger than this (s).")
    ] = 3600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
    keep_last: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="First delete versions older than each bundle's K newest, except the head "
            "and what an alias or a published status names.",
        ),
    ] = None,
) -> None:
    """Delete stored objects that no version references (never a running fold's)."""
    with open_workspace() as ws:
        report = ws.gc(grace_s=grace, dry_run=dry_run, keep_last=keep_last)
    verb = "would delete" if dry_run else "deleted"
    for kept in report.retention:
        numbers = ", ".join(str(v) for v in kept.deleted)
        out.print(f"{kept.bundle}: {verb} version(s) {numbers}")
    out.print(
        f"{verb} {len(report.deleted)} objects; kept {report.kept_young} recent ones; "
        f"swept {report.swept} incomplete uploads or temp files"
    )
