"""The commands that run a Prefect flow or release a version: ``ingest``, ``validate``,
``publish``, ``demo``.

A missing bundle or group is told before Prefect starts (a temporary server takes
~15 s). ``ingest --group GROUP SOURCES...`` places checkpoints over a bundle group.
"""

from __future__ import annotations

from typing import Annotated

import typer

import flows.cli.grouped as grouped
from flows.cli.common import open_registry, pin_version, refuse_extra_arguments
from flows.cli.options import GroupFlag, positive_scale
from flows.cli.validation import DriftOption, SampleOption, WindowOption
from flows.console import out
from flows.prefect_session import prefect_session

app = typer.Typer()


@app.command()
def ingest(
    ctx: typer.Context,
    bundle: Annotated[str, typer.Argument(help="Bundle to fold into (--group: the group).")],
    source: Annotated[
        str,
        typer.Argument(
            help="Directory of task folders, s3://bucket/prefix, or hf://org/repo[@rev],..."
        ),
    ],
    more: Annotated[
        list[str] | None,
        typer.Argument(metavar="SOURCE", help="More sources (--group only)."),
    ] = None,
    evaluator: Annotated[
        str | None, typer.Option(help="module:function scoring a state dict.")
    ] = None,
    validate: Annotated[bool, typer.Option(help="Validate the new head afterwards.")] = True,
    group: GroupFlag = False,
    validate_all: Annotated[
        bool, typer.Option("--validate-all", help="Measure every task, not the policy's.")
    ] = False,
    drift: DriftOption = None,
    window: WindowOption = None,
    sample: SampleOption = None,
) -> None:
    """Fold every new checkpoint found under SOURCE (one per task), then validate.

    With --group: every new checkpoint under the SOURCEs is placed in the group member
    with room for it, and every member that changed is validated.
    """
    if group:
        grouped.ingest(bundle, [source, *(more or [])], evaluator=evaluator, validate=validate)
        return
    refuse_extra_arguments(ctx, more)
    with open_registry() as registry:  # a missing bundle is told before Prefect starts (~15 s)
        registry.get_bundle(bundle)
    with prefect_session():
        from flows.pipeline import ingest_flow

        summary = ingest_flow(
            bundle,
            source,
            evaluator=evaluator,
            run_validation=validate,
            validate_all=validate_all,
            drift=drift,
            window=window,
            sample=sample,
        )
    measured = summary["validation"].get(bundle)
    out.print(
        f"{bundle}: found {summary['found']}, folded {len(summary['folded'])}, "
        f"already present {len(summary['skipped'])}; version {summary['version']} "
        f"{summary['status'] or ''}".rstrip()
        + (
            f"; measured {len(measured['measured'])} of "
            f"{len(measured['measured']) + len(measured['skipped'])} tasks"
            if measured
            else ""
        )
    )


@app.command()
def validate(
    bundle: Annotated[str, typer.Argument()],
    version: Annotated[int | None, typer.Option(help="Version (default: head).")] = None,
    evaluator: Annotated[
        str | None, typer.Option(help="module:function scoring a state dict.")
    ] = None,
    scale: Annotated[
        float | None,
        typer.Option(help="Override lambda for every task.", callback=positive_scale),
    ] = None,
    everything: Annotated[
        bool, typer.Option("--all", help="Measure every task, not the policy's selection.")
    ] = False,
    drift: DriftOption = None,
    window: WindowOption = None,
    sample: SampleOption = None,
) -> None:
    """Measure the tasks of a version its validation policy selects, and gate the version.

    New tasks always, tasks whose predicted interference moved, and a rotation of the
    rest (every task at least once every --window versions); --all measures them all."""
    from storage.cache import integrity_context

    registry = open_registry()
    try:
        pinned, context = pin_version(registry, bundle, None if version is None else str(version))
    finally:
        registry.close()
    with prefect_session(), integrity_context(context):
        from flows.pipeline import validate_flow

        report = validate_flow(
            bundle, int(pinned), evaluator, scale, everything, drift, window, sample
        )
    from flows.validation import report_markdown

    out.print(report_markdown(report))
    if not report.passed:
        raise typer.Exit(code=3)


@app.command()
def publish(
    bundle: Annotated[str, typer.Argument()],
    version: Annotated[int, typer.Option(help="Validated version to publish.")],
    alias: Annotated[str, typer.Option(help="Alias to move.")] = "production",
) -> None:
    """Move an alias (default ``production``) to a validated version, atomically."""
    registry = open_registry()
    try:
        record = registry.set_alias(bundle, alias, version)
    finally:
        registry.close()
    out.print(f"{bundle}@{record.name} -> version {record.version}")


@app.command()
def demo() -> None:
    """The whole pipeline on the embedded default with real data (scikit-learn digits)."""
    with prefect_session():
        from flows.demo import run_demo

        run_demo()
