"""``randes group ...``: bundle groups on the command line, and the ``--group`` forms.

A group spreads tasks over several bundles of one base so that no bundle's tasks
interfere past a limit (storage.groups). The commands:

    randes group create NAME --base B [--max-interference X] [bundle create's transform options]
    randes group show NAME [--json]        members, tasks, each task's r_t and data-free lambda
    randes group tasks NAME [--json]       = randes tasks --group NAME
    randes group ingest NAME SOURCES...    = randes ingest --group NAME SOURCES...
    randes group fold NAME SOURCE TASK     = randes fold --group NAME SOURCE TASK
    randes group materialize NAME[@ALIAS] TASK DEST
                                           = randes materialize --group NAME[@ALIAS] TASK DEST
    randes group pull NAME[@ALIAS] DEST    = randes pull --group NAME[@ALIAS] DEST

The ``--group`` forms are rewritten to the ``group`` subcommands before typer parses
the line (`route_group_option`): their positional arguments differ from the bundle
forms' (no BUNDLE), which one typer signature cannot express. Importing this module
registers ``group`` on the `flows.cli` app.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli import (
    MASTER_HELP,
    AlreadyFoldedError,
    DType,
    DTypeOption,
    GateOption,
    GroupSizeOption,
    JsonFlag,
    LayerShuffleOption,
    Rank1Option,
    ScaleOption,
    ServingOption,
    SignFlipOption,
    _positive_scale,
    _registry,
    _split_ref,
    _workspace,
    app,
    transform_config,
)
from flows.console import out, print_table, progress_bar
from flows.prefect_session import prefect_session
from randes.names import validate_name

if TYPE_CHECKING:
    pass

group_app = typer.Typer(
    help="Bundle groups: tasks spread over bundles of one base, each under an "
    "interference limit. Also: randes ingest|fold|tasks|materialize|pull --group NAME ...",
    no_args_is_help=True,
)

GROUP_FORMS = ("ingest", "fold", "tasks", "materialize", "pull")
"""Top-level commands that take ``--group NAME`` (rewritten to ``group <command> NAME``)."""


def route_group_option(argv: list[str] | None) -> list[str]:
    """``randes CMD ... --group NAME ...`` -> ``randes group CMD NAME ...`` for the
    commands in GROUP_FORMS; any other command line is returned unchanged.

    Only options before a ``--`` count. A ``--group`` without a value becomes ``group
    CMD``, whose missing NAME typer reports as usual.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in GROUP_FORMS:
        return args
    command, rest = args[0], args[1:]
    for i, arg in enumerate(rest):
        if arg == "--":
            break
        if arg == "--group":
            return ["group", command, *rest[i + 1 : i + 2], *rest[:i], *rest[i + 2 :]]
        if arg.startswith("--group="):
            return ["group", command, arg.split("=", 1)[1], *rest[:i], *rest[i + 1 :]]
    return args


def _max_interference(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number > 0")
    return value


def _group_name(name: str) -> str:
    return validate_name(name, "group name")


@group_app.command("create")
def group_create(
    name: Annotated[
        str, typer.Argument(metavar="GROUP", help="Name of the new group (members: GROUP-1, ...).")
    ],
    base: Annotated[str, typer.Option("--base", help="Registered base model.")],
    max_interference: Annotated[
        float | None,
        typer.Option(
            help="Largest relative interference r_t any member's task may reach "
            "(default: randes.capacity.DEFAULT_MAX_INTERFERENCE).",
            callback=_max_interference,
        ),
    ] = None,
    sign_flip: SignFlipOption = True,
    layer_shuffle: LayerShuffleOption = True,
    rank1: Rank1Option = None,
    dtype: DTypeOption = DType.float32,
    scale: Annotated[
        float | None,
        typer.Option(help="Group-wide lambda (default: data-free).", callback=_positive_scale),
    ] = None,
    gate: GateOption = None,
    serving: ServingOption = None,
    group_size: GroupSizeOption = None,
) -> None:
    """Create an empty bundle group: its members get this base, transform and gate."""
    from randes.capacity import DEFAULT_MAX_INTERFERENCE
    from storage.groups import create_group

    config = transform_config(
        sign_flip=sign_flip,
        layer_shuffle=layer_shuffle,
        rank1=rank1,
        dtype=dtype,
        scale=scale,
        serving=serving,
        group_size=group_size,
    )
    limit = DEFAULT_MAX_INTERFERENCE if max_interference is None else max_interference
    with _workspace() as ws:
        record = create_group(
            ws, _group_name(name), base, config, max_interference=limit, gate_threshold=gate
        )
    out.print(
        f"group {record.name} on base {record.base_name}, max r_t {record.max_interference:g}: "
        f"{config.model_dump_json()}",
        soft_wrap=True,
    )


@group_app.command("show")
def group_show(
    name: Annotated[str, typer.Argument(metavar="GROUP", help="Group.")],
    as_json: JsonFlag = False,
) -> None:
    """Members, their tasks, each task's predicted interference r_t and data-free lambda."""
    from storage.groups import show

    with _workspace() as ws:
        record, members = show(ws, _group_name(name))
    data: dict[str, Any] = {
        "group": record.name,
        "base": record.base_name,
        "max_interference": record.max_interference,
        "gate_threshold": record.gate_threshold,
        "transform": record.transform,
        "members": [
            {
                "bundle": m.bundle,
                "version": m.version,
                "max_interference": m.max_interference,
                "tasks": [
                    {
                        "task": t.name,
                        "added_in_version": t.added_in_version,
                        "interference": t.interference,
                        "data_free_scale": t.data_free_scale,
                        "scale": t.scale,
                    }
                    for t in m.tasks
                ],
            }
            for m in members
        ],
    }
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    out.print(
        f"group {record.name} on base {record.base_name}: {len(members)} member(s), "
        f"max r_t {record.max_interference:g}"
    )
    rows: list[list[Any]] = []
    for m in members:
        if not m.tasks:
            rows.append([m.bundle, m.version, "", "", "", ""])
        for t in m.tasks:
            rows.append(
                [
                    m.bundle,
                    m.version,
                    t.name,
                    f"{t.interference:.4g}",
                    f"{t.data_free_scale:.4f}",
                    "" if t.scale is None else f"{t.scale:g}",
                ]
            )
    print_table(
        f"{record.name} members",
        ["bundle", "head", "task", "r_t", "lambda (data-free)", "scale override"],
        rows,
    )


@group_app.command("tasks")
def group_tasks(
    name: Annotated[str, typer.Argument(metavar="GROUP", help="Group.")],
    as_json: JsonFlag = False,
) -> None:
    """Tasks of every member of the group, with the member bundle that holds each."""
    registry = _registry()
    try:
        group = _group_name(name)
        records = [
            task for member in registry.group_members(group) for task in registry.tasks(member.name)
        ]
    finally:
        registry.close()
    rows = [
        {
            "group": group,
            "bundle": r.bundle,
            "task": r.name,
            "seed": r.seed,
            "added_in_version": r.added_in_version,
            "removed_in_version": r.removed_in_version,
            "source_uri": r.source_uri,
            "source_sha256": r.source_sha256,
        }
        for r in records
    ]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    print_table(
        f"{group} tasks",
        ["bundle", "task", "seed", "added in", "source"],
        [[r["bundle"], r["task"], r["seed"], r["added_in_version"], r["source_uri"]] for r in rows],
    )


@group_app.command("ingest")
def group_ingest(
    name: Annotated[str, typer.Argument(metavar="GROUP", help="Group.")],
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Directories of task folders, s3://bucket/prefix, or hf://org/repo[@rev],..."
        ),
    ],
    evaluator: Annotated[
        str | None, typer.Option(help="module:function scoring a state dict.")
    ] = None,
    validate: Annotated[
        bool, typer.Option(help="Validate the new head of every member that changed.")
    ] = True,
) -> None:
    """Place every new checkpoint found under SOURCES in the member with room for it."""
    group = _group_name(name)
    registry = _registry()
    try:
        registry.get_group(group)  # an unknown group fails before Prefect starts
    finally:
        registry.close()
    placed: dict[str, str] = {}
    found = folded = present = 0
    refused: list[str] = []
    statuses: list[str] = []
    with prefect_session():  # before Prefect is imported: it reads the settings then
        from flows.pipeline import IngestRefusedError, ingest_flow

        for source in sources:
            try:
                summary = ingest_flow(
                    None, source, evaluator=evaluator, run_validation=validate, group=group
                )
            except IngestRefusedError as exc:  # the others were placed: go on, fail at the end
                refused.append(str(exc).splitlines()[0])
                continue
            found += summary["found"]
            folded += len(summary["folded"])
            present += len(summary["skipped"])
            placed.update(summary["placed"])
            if summary["status"]:
                statuses.append(summary["status"])
    for task, where in placed.items():
        out.print(f"  {task} -> {where}")
    status = "" if not statuses else ("rejected" if "rejected" in statuses else "validated")
    out.print(
        f"{group}: found {found}, folded {folded}, already present {present} {status}".rstrip()
    )
    if refused:
        from flows.pipeline import IngestRefusedError

        raise IngestRefusedError("; ".join(refused))


@group_app.command("fold")
def group_fold(
    name: Annotated[str, typer.Argument(metavar="GROUP", help="Group.")],
    source: Annotated[
        str, typer.Argument(help="Checkpoint: path, s3://... or hf://org/repo[@rev].")
    ],
    task_arg: Annotated[str | None, typer.Argument(metavar="TASK", help="Task name.")] = None,
    task_opt: Annotated[
        str | None, typer.Option("--task", help="Task name (instead of TASK).")
    ] = None,
    scale: Annotated[
        float | None, typer.Option(help="Per-task lambda override.", callback=_positive_scale)
    ] = None,
) -> None:
    """Fold one checkpoint into the group's first member with room for it (or a new one).

    Same contract as `randes fold`: the same checkpoint under the same task name is a
    no-op (exit 0); under another name it is refused.
    """
    from storage.groups import place

    if (task_arg is None) == (task_opt is None):
        raise typer.BadParameter("give the task name once: as TASK or as --task")
    task = task_arg if task_arg is not None else task_opt
    assert task is not None
    group = _group_name(name)
    with _workspace() as ws, progress_bar(f"placing {task}") as progress:
        placement = place(ws, group, source, task, scale=scale, progress=progress)
    outcome = placement.outcome
    if outcome.skipped and outcome.task != task:
        raise AlreadyFoldedError(
            f"this checkpoint is already in group {group!r} as task {outcome.task!r} "
            f"(bundle {outcome.bundle!r} version {outcome.version}); not adding it again "
            f"as {task!r}"
        )
    if outcome.skipped:
        out.print(
            f"already folded as task {outcome.task!r} in bundle {outcome.bundle!r} version "
            f"{outcome.version}: nothing to do"
        )
        return
    new = " (new member)" if placement.created_member else ""
    over = " OVER THE LIMIT (concurrent placements)" if placement.over_limit else ""
    out.print(
        f"{group}: task {task!r} -> bundle {outcome.bundle}{new} version {outcome.version}; "
        f"member max r_t {placement.interference:.4g}{over}"
    )


@group_app.command("materialize")
def group_materialize(
    spec: Annotated[str, typer.Argument(metavar="GROUP[@ALIAS]")],
    task: Annotated[str, typer.Argument()],
    dest: Annotated[Path, typer.Argument(help="New (or empty) directory for the model.")],
    scale: ScaleOption = None,
    master: Annotated[bool, typer.Option("--master", help=MASTER_HELP)] = False,
) -> None:
    """Write one task's standalone model from the member that holds it.

    The member is the first whose head (or ALIAS, such as production) holds TASK.
    """
    from storage.groups import materialize

    group, ref = _split_ref(spec)
    with _workspace() as ws, progress_bar(f"materializing {task}") as progress:
        record = materialize(
            ws, _group_name(group), ref, task, dest, scale=scale, master=master, progress=progress
        )
    out.print(f"wrote {dest} (task {task!r} of bundle {record.bundle} version {record.version})")


@group_app.command("pull")
def group_pull(
    spec: Annotated[str, typer.Argument(metavar="GROUP[@ALIAS]")],
    dest: Annotated[Path, typer.Argument()],
    master: Annotated[
        bool,
        typer.Option("--master", help="Also download the fp32 master superpositions."),
    ] = False,
) -> None:
    """Download every member's head (or ALIAS) into one local store, sha256 verified."""
    from storage.groups import pull

    group, ref = _split_ref(spec)
    with _workspace() as ws:
        result = pull(ws, _group_name(group), ref, dest, master=master)
    pulled = ", ".join(f"{r.bundle}@{r.version}" for r in result.pulled)
    what = "version yet" if ref is None else repr(ref)
    skipped = f"; skipped {', '.join(result.skipped)} (no {what})" if result.skipped else ""
    out.print(f"pulled {group} ({pulled}) to {dest}{skipped}")


app.add_typer(group_app, name="group")
