"""The `randes` command line: the contract of DESIGN.md, typer over the storage layer.

Queries (`tasks`, `versions`) touch only the registry and import neither torch nor
Prefect, so they answer fast. Every user-facing failure is a `RandesError` and ends
as one line on stderr with exit status 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import click
import typer

from flows.console import err, out, print_table, progress_bar
from randes.errors import RandesError

if TYPE_CHECKING:
    from storage.workspace import Workspace

app = typer.Typer(
    name="randes",
    help="Store many fine-tunes of one base model in the space of two (RanDeS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
base_app = typer.Typer(help="Base models.", no_args_is_help=True)
bundle_app = typer.Typer(help="Bundles.", no_args_is_help=True)
app.add_typer(base_app, name="base")
app.add_typer(bundle_app, name="bundle")


class Rank1(StrEnum):
    flip = "flip"
    plain = "plain"
    private = "private"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _workspace() -> Workspace:
    from storage.workspace import Workspace

    return Workspace.open()


def _split_ref(spec: str) -> tuple[str, str | None]:
    """``BUNDLE[@VERSION|@ALIAS]`` -> (bundle, ref or None for the head)."""
    bundle, _, ref = spec.partition("@")
    return bundle, (ref or None)


@app.command()
def init() -> None:
    """Create or upgrade the registry schema and the store root."""
    with _workspace() as ws:
        ws.init()
        out.print(f"registry: {_redact(ws.settings.resolved_database_url)}")
        out.print(f"store:    {ws.store.url}")


@base_app.command("add")
def base_add(
    name: Annotated[str, typer.Argument(help="Name of the base model.")],
    source: Annotated[str, typer.Argument(help="Path, s3://bucket/key or hf://org/repo[@rev].")],
) -> None:
    """Register and store a base model."""
    with _workspace() as ws:
        record = ws.add_base(name, source)
        out.print(f"base {record.name}: {record.uri} (sha256 {record.sha256[:12]})")


@bundle_app.command("create")
def bundle_create(
    name: Annotated[str, typer.Argument(help="Name of the new bundle.")],
    base: Annotated[str, typer.Option("--base", help="Registered base model.")],
    sign_flip: Annotated[bool, typer.Option(help="Random column sign flips.")] = True,
    layer_shuffle: Annotated[bool, typer.Option(help="Random layer shuffling.")] = True,
    rank1: Annotated[
        Rank1 | None,
        typer.Option(help="Rank-1 tensors: flipped, superposed unmapped, or stored per task."),
    ] = None,
    dtype: Annotated[
        DType, typer.Option(help="Storage dtype of the superposition.")
    ] = DType.float32,
    scale: Annotated[
        float | None, typer.Option(help="Bundle-wide lambda (default: data-free).")
    ] = None,
    gate: Annotated[
        float | None, typer.Option(help="Validation gate: minimum normalized score per task.")
    ] = None,
) -> None:
    """Create an empty bundle over a registered base with a fixed transform."""
    from randes.config import TransformConfig

    fields: dict[str, object] = {
        "sign_flip": sign_flip,
        "layer_shuffle": layer_shuffle,
        "dtype": dtype.value,
        "scale": scale,
    }
    if rank1 is not None:
        fields["rank1"] = rank1.value
    config = TransformConfig.model_validate(fields)
    with _workspace() as ws:
        record = ws.create_bundle(name, base, config, gate_threshold=gate)
        out.print(f"bundle {record.name} on base {record.base_name}: {config.model_dump_json()}")


@app.command()
def fold(
    bundle: Annotated[str, typer.Argument(help="Bundle to fold into.")],
    source: Annotated[
        str, typer.Argument(help="Checkpoint: path, s3://... or hf://org/repo[@rev].")
    ],
    task: Annotated[str, typer.Option("--task", help="Task name for this checkpoint.")],
    scale: Annotated[float | None, typer.Option(help="Per-task lambda override.")] = None,
) -> None:
    """Fold one fine-tuned checkpoint into a bundle as a new version."""
    with _workspace() as ws, progress_bar(f"folding {task}") as progress:
        outcome = ws.fold(bundle, source, task, scale=scale, progress=progress)
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
    with _workspace() as ws, progress_bar(f"removing {task}") as progress:
        outcome = ws.remove(bundle, task, progress=progress)
    out.print(f"{bundle}: version {outcome.version} removes task {task!r}")


@app.command()
def materialize(
    spec: Annotated[str, typer.Argument(metavar="BUNDLE[@REF]")],
    task: Annotated[str, typer.Argument()],
    dest: Annotated[Path, typer.Argument(help="New (or empty) directory for the model.")],
    scale: Annotated[float | None, typer.Option(help="Override lambda.")] = None,
) -> None:
    """Write one task's standalone model (model.safetensors + config.json)."""
    bundle, ref = _split_ref(spec)
    with _workspace() as ws, progress_bar(f"materializing {task}") as progress:
        path = ws.materialize(bundle, ref, task, dest, scale=scale, progress=progress)
    out.print(f"wrote {path}")


@app.command()
def pull(
    spec: Annotated[str, typer.Argument(metavar="BUNDLE[@VERSION|@ALIAS]")],
    dest: Annotated[Path, typer.Argument()],
) -> None:
    """Download one version with every object it needs; every sha256 is verified."""
    bundle, ref = _split_ref(spec)
    with _workspace() as ws:
        record = ws.pull(bundle, ref, dest)
    out.print(f"pulled {bundle} version {record.version} to {dest}")


@app.command()
def gc(
    grace: Annotated[
        float, typer.Option(help="Keep unreferenced objects younger than this (s).")
    ] = 3600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
) -> None:
    """Delete stored objects that no version references (never a running fold's)."""
    with _workspace() as ws:
        report = ws.gc(grace_s=grace, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    out.print(f"{verb} {len(report.deleted)} objects; kept {report.kept_young} recent ones")


def _registry():  # type: ignore[no-untyped-def]
    from storage.registry import Registry
    from storage.settings import load_settings

    return Registry(load_settings().resolved_database_url)


@app.command()
def tasks(
    bundle: Annotated[str | None, typer.Argument()] = None,
    as_json: JsonFlag = False,
) -> None:
    """Tasks held by a bundle (or by all bundles), with seeds and versions."""
    registry = _registry()
    try:
        records = registry.tasks(bundle)
    finally:
        registry.close()
    rows = [
        {
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
        "tasks",
        ["bundle", "task", "seed", "added in", "source"],
        [[r["bundle"], r["task"], r["seed"], r["added_in_version"], r["source_uri"]] for r in rows],
    )


@app.command()
def versions(
    bundle: Annotated[str, typer.Argument()],
    as_json: JsonFlag = False,
) -> None:
    """Versions of a bundle with status, parent and aliases."""
    registry = _registry()
    try:
        records = registry.list_versions(bundle)
        aliases = registry.aliases(bundle)
    finally:
        registry.close()
    by_version: dict[int, list[str]] = {}
    for alias in aliases:
        by_version.setdefault(alias.version, []).append(alias.name)
    rows = [
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
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    print_table(
        f"{bundle} versions",
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


@app.command()
def ingest(
    bundle: Annotated[str, typer.Argument()],
    source: Annotated[
        str,
        typer.Argument(
            help="Directory of task folders, s3://bucket/prefix, or hf://org/repo[@rev],..."
        ),
    ],
    evaluator: Annotated[
        str | None, typer.Option(help="module:function scoring a state dict.")
    ] = None,
    validate: Annotated[bool, typer.Option(help="Validate the new head afterwards.")] = True,
) -> None:
    """Fold every new checkpoint found under SOURCE (one per task), then validate."""
    from flows.pipeline import ingest_flow

    summary = ingest_flow(bundle, source, evaluator=evaluator, run_validation=validate)
    out.print(
        f"{bundle}: found {summary['found']}, folded {len(summary['folded'])}, "
        f"already present {len(summary['skipped'])}; version {summary['version']} "
        f"{summary['status'] or ''}".rstrip()
    )


@app.command()
def validate(
    bundle: Annotated[str, typer.Argument()],
    version: Annotated[int | None, typer.Option(help="Version (default: head).")] = None,
    evaluator: Annotated[
        str | None, typer.Option(help="module:function scoring a state dict.")
    ] = None,
    scale: Annotated[float | None, typer.Option(help="Override lambda for every task.")] = None,
) -> None:
    """Retrieve every task of a version, measure it, and gate the version."""
    from flows.pipeline import validate_flow
    from flows.validation import report_markdown

    report = validate_flow(bundle, version, evaluator, scale)
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
    registry = _registry()
    try:
        record = registry.set_alias(bundle, alias, version)
    finally:
        registry.close()
    out.print(f"{bundle}@{record.name} -> version {record.version}")


@app.command()
def demo() -> None:
    """The whole pipeline on the embedded default with real data (scikit-learn digits)."""
    from flows.demo import run_demo

    run_demo()


def _redact(url: str) -> str:
    """A database URL with its password hidden, for printing."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never print an unparsable URL, it may hold secrets
        return "<database url>"


def main(argv: list[str] | None = None) -> Literal[0] | int:
    """Console-script entry point: one line per user error, non-zero exit."""
    root = logging.getLogger()
    if not root.handlers:
        # Without any handler, library warnings (an S3 retry notice per failed attempt)
        # would reach stderr through logging's last-resort handler, around the error line.
        root.addHandler(logging.NullHandler())
    try:
        app(args=argv, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except RandesError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        sys.stderr.write(f"error: {message}\n")
        return 1
    return 0


def entry() -> None:
    sys.exit(main())
