"""``randes group ...``: bundle groups on the command line.

    randes group create NAME --base B [--max-interference X] [bundle create's transform options]
    randes group show NAME [--json]        members, tasks, each task's r_t and data-free lambda
    randes group tasks NAME [--json]       = randes tasks --group NAME
    randes group ingest NAME SOURCES...    = randes ingest --group NAME SOURCES...
    randes group fold NAME SOURCE TASK     = randes fold --group NAME SOURCE TASK
    randes group materialize NAME[@ALIAS] TASK DEST
                                           = randes materialize --group NAME[@ALIAS] TASK DEST
    randes group pull NAME[@ALIAS] DEST    = randes pull --group NAME[@ALIAS] DEST

Both spellings run the same function of `flows.cli.grouped`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

import flows.cli.grouped as grouped
from flows.cli.common import open_workspace, print_json
from flows.cli.options import (
    DType,
    DTypeOption,
    GateOption,
    GroupSizeOption,
    JsonFlag,
    LayerShuffleOption,
    MapOption,
    MasterFlag,
    PullMasterFlag,
    Rank1Option,
    ScaleOption,
    ServingOption,
    SignFlipOption,
    positive_scale,
    transform_config,
)
from flows.console import out, print_table

app = typer.Typer(
    help="Bundle groups: tasks spread over bundles of one base, each under an "
    "interference limit. Also: randes ingest|fold|tasks|materialize|pull --group NAME ...",
    no_args_is_help=True,
)

GroupArgument = Annotated[str, typer.Argument(metavar="GROUP", help="Group.")]


def _max_interference(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number > 0")
    return value


@app.command("create")
def group_create(
    name: Annotated[
        str, typer.Argument(metavar="GROUP", help="Name of the new group (members: GROUP-1, ...).")
    ],
    base: Annotated[str, typer.Option("--base", help="Registered base model.")],
    max_interference: Annotated[
        float | None,
        typer.Option(
            help="Largest relative interference r_t any member's task may reach "
            "(default: randes.capacity.MAX_INTERFERENCE of the --map).",
            callback=_max_interference,
        ),
    ] = None,
    sign_flip: SignFlipOption = True,
    layer_shuffle: LayerShuffleOption = True,
    rank1: Rank1Option = None,
    dtype: DTypeOption = DType.float32,
    scale: Annotated[
        float | None,
        typer.Option(help="Group-wide lambda (default: data-free).", callback=positive_scale),
    ] = None,
    gate: GateOption = None,
    serving: ServingOption = None,
    group_size: GroupSizeOption = None,
    sign_map: MapOption = None,
) -> None:
    """Create an empty bundle group: its members get this base, transform and gate."""
    from randes.capacity import default_limit
    from storage.groups import create_group

    config = transform_config(
        sign_map=sign_map,
        sign_flip=sign_flip,
        layer_shuffle=layer_shuffle,
        rank1=rank1,
        dtype=dtype,
        scale=scale,
        serving=serving,
        group_size=group_size,
    )
    limit = default_limit(config.map) if max_interference is None else max_interference
    with open_workspace() as ws:
        record = create_group(
            ws,
            grouped.group_name(name),
            base,
            config,
            max_interference=limit,
            gate_threshold=gate,
        )
    out.print(
        f"group {record.name} on base {record.base_name}, max r_t {record.max_interference:g}: "
        f"{config.model_dump_json()}",
        soft_wrap=True,
    )


@app.command("show")
def group_show(name: GroupArgument, as_json: JsonFlag = False) -> None:
    """Members, their tasks, each task's predicted interference r_t and data-free lambda."""
    from storage.groups import show

    with open_workspace() as ws:
        record, members = show(ws, grouped.group_name(name))
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
        print_json(data)
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


@app.command("tasks")
def group_tasks(name: GroupArgument, as_json: JsonFlag = False) -> None:
    """Tasks of every member of the group, with the member bundle that holds each."""
    grouped.tasks(name, as_json=as_json)


@app.command("ingest")
def group_ingest(
    name: GroupArgument,
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
    grouped.ingest(name, sources, evaluator=evaluator, validate=validate)


@app.command("fold")
def group_fold(
    name: GroupArgument,
    source: Annotated[
        str, typer.Argument(help="Checkpoint: path, s3://... or hf://org/repo[@rev].")
    ],
    task_arg: Annotated[str | None, typer.Argument(metavar="TASK", help="Task name.")] = None,
    task_opt: Annotated[
        str | None, typer.Option("--task", help="Task name (instead of TASK).")
    ] = None,
    scale: Annotated[
        float | None, typer.Option(help="Per-task lambda override.", callback=positive_scale)
    ] = None,
) -> None:
    """Fold one checkpoint into the group's first member with room for it (or a new one).

    Same contract as `randes fold`: the same checkpoint under the same task name is a
    no-op (exit 0); under another name it is refused.
    """
    grouped.fold(name, source, task_arg, task_opt, scale)


@app.command("materialize")
def group_materialize(
    spec: Annotated[str, typer.Argument(metavar="GROUP[@ALIAS]")],
    task: Annotated[str, typer.Argument()],
    dest: Annotated[Path, typer.Argument(help="New (or empty) directory for the model.")],
    scale: ScaleOption = None,
    master: MasterFlag = False,
) -> None:
    """Write one task's standalone model from the member that holds it.

    The member is the first whose head (or ALIAS, such as production) holds TASK.
    """
    grouped.materialize(spec, task, dest, scale=scale, master=master)


@app.command("pull")
def group_pull(
    spec: Annotated[str, typer.Argument(metavar="GROUP[@ALIAS]")],
    dest: Annotated[Path, typer.Argument()],
    master: PullMasterFlag = False,
) -> None:
    """Download every member's head (or ALIAS) into one local store, sha256 verified."""
    grouped.pull(spec, dest, master=master)
