"""The group path: what ``randes group CMD GROUP ...`` and ``randes CMD --group GROUP ...``
both run (tasks, ingest, fold, materialize, pull over the members of a bundle group).

A group spreads tasks over several bundles of one base so that no bundle's tasks
interfere past a limit (storage.groups); these functions print what the commands print.
"""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.common import (
    AlreadyFoldedError,
    open_registry,
    open_workspace,
    print_tasks,
    split_ref,
    task_row,
)
from flows.console import out, progress_bar
from flows.prefect_session import prefect_session
from randes.names import validate_name


def group_name(name: str) -> str:
    return validate_name(name, "group name")


def tasks(name: str, *, as_json: bool) -> None:
    """Tasks of every member of the group, with the member bundle that holds each."""
    registry = open_registry()
    try:
        group = group_name(name)
        records = [
            task for member in registry.group_members(group) for task in registry.tasks(member.name)
        ]
    finally:
        registry.close()
    print_tasks([{"group": group, **task_row(r)} for r in records], f"{group} tasks", as_json)


def ingest(name: str, sources: list[str], *, evaluator: str | None, validate: bool) -> None:
    """Place every new checkpoint found under SOURCES in the member with room for it."""
    group = group_name(name)
    registry = open_registry()
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


def fold(
    name: str, source: str, task_arg: str | None, task_opt: str | None, scale: float | None
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
    group = group_name(name)
    with open_workspace() as ws, progress_bar(f"placing {task}") as progress:
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


def materialize(spec: str, task: str, dest: Path, *, scale: float | None, master: bool) -> None:
    """Write one task's standalone model from the member that holds it: the first whose
    head (or ALIAS, such as production) holds TASK."""
    from storage.groups import materialize as materialize_task

    group, ref = split_ref(spec)
    with open_workspace() as ws, progress_bar(f"materializing {task}") as progress:
        record = materialize_task(
            ws, group_name(group), ref, task, dest, scale=scale, master=master, progress=progress
        )
    out.print(f"wrote {dest} (task {task!r} of bundle {record.bundle} version {record.version})")


def pull(spec: str, dest: Path, *, master: bool) -> None:
    """Download every member's head (or ALIAS) into one local store, sha256 verified."""
    from storage.groups import pull as pull_members

    group, ref = split_ref(spec)
    with open_workspace() as ws:
        result = pull_members(ws, group_name(group), ref, dest, master=master)
    pulled = ", ".join(f"{r.bundle}@{r.version}" for r in result.pulled)
    what = "version yet" if ref is None else repr(ref)
    skipped = f"; skipped {', '.join(result.skipped)} (no {what})" if result.skipped else ""
    out.print(f"pulled {group} ({pulled}) to {dest}{skipped}")
