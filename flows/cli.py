"""The `randes` command line: the contract of DESIGN.md, typer over the storage layer.

Queries (`tasks`, `versions`) touch only the registry and import neither torch nor
Prefect, so they answer fast. Every user-facing failure is a `RandesError` and ends
as one line on stderr with exit status 1 (a malformed command line: one line, status
2); anything else is a bug and keeps its traceback. The line is printed safely: its
control characters escaped, any configured secret replaced by ``***``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import click
import typer

from flows.console import err, out, print_table, progress_bar
from flows.prefect_session import prefect_session
from randes.errors import RandesError

if TYPE_CHECKING:
    from randes.config import TransformConfig
    from storage.registry import Registry
    from storage.workspace import Workspace


class AlreadyFoldedError(RandesError):
    """`randes fold` of a checkpoint the bundle holds under another task name."""


app: typer.Typer = typer.Typer(
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


class Rank1(StrEnum):
    flip = "flip"
    plain = "plain"
    private = "private"


class SignMap(StrEnum):
    columns = "columns"
    two_sided = "two-sided"
    elementwise = "elementwise"


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Serving(StrEnum):
    int8 = "int8"
    int4 = "int4"
    int3 = "int3"
    none = "none"


def _group_size(value: str | None) -> int | str | None:
    """``--group-size``: values per float32 scale, or ``row`` for one scale per row."""
    if value is None or value == "row":
        return value
    from pydantic import ValidationError

    from randes.quantize import QuantScheme

    try:
        size = int(value)
        QuantScheme(group_size=size)  # its bounds are the one definition of a valid size
    except (ValueError, ValidationError):
        raise typer.BadParameter(
            f"{value!r} is not 'row' or a whole number from 8 to {1 << 20}"
        ) from None
    return size


MASTER_HELP = "Use the fp32 master superposition instead of the quantized serving copy."


JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _positive_scale(value: float | None) -> float | None:
    """A lambda must be a finite number in (0, MAX_SCALE]: NaN would pass a plain ``> 0``
    range check and only fail deep inside a fold, after its objects were uploaded, and
    1e300 would overflow every retrieved weight."""
    from storage.workspace import MAX_SCALE

    if value is not None and not (math.isfinite(value) and 0 < value <= MAX_SCALE):
        raise typer.BadParameter(f"{value} is not a finite number > 0 and <= {MAX_SCALE:g}")
    return value


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


ScaleOption = Annotated[
    float | None, typer.Option(help="Override lambda.", callback=_positive_scale)
]


def _workspace() -> Workspace:
    from storage.workspace import Workspace

    return Workspace.open()


def _pin_version(registry: Registry, bundle: str, ref: str | None) -> tuple[str, str]:
    """``ref`` (head, version or alias) pinned to its version number now, and the context
    that names it in an integrity error: "bundle B version N"."""
    from storage.cache import version_context

    record = registry.resolve(bundle, ref)
    return str(record.version), version_context(bundle, record.version)


def _split_ref(spec: str) -> tuple[str, str | None]:
    """``BUNDLE[@VERSION|@ALIAS]`` -> (bundle, ref or None for the head)."""
    bundle, _, ref = spec.partition("@")
    return bundle, (ref or None)


@app.command()
def init() -> None:
    """Create or upgrade the registry schema and the store root."""
    with _workspace() as ws:
        ws.init()
        # soft_wrap: a URL printed whole, never cut at the console's width
        out.print(f"registry: {_redact(ws.settings.resolved_database_url)}", soft_wrap=True)
        out.print(f"store:    {ws.store.url}", soft_wrap=True)


@base_app.command("add")
def base_add(
    name: Annotated[str, typer.Argument(help="Name of the base model.")],
    source: Annotated[str, typer.Argument(help="Path, s3://bucket/key or hf://org/repo[@rev].")],
) -> None:
    """Register and store a base model."""
    with _workspace() as ws:
        record = ws.add_base(name, source)
        out.print(f"base {record.name}: {record.uri} (sha256 {record.sha256[:12]})")


@base_app.command("list")
def base_list(as_json: JsonFlag = False) -> None:
    """Registered base models."""
    from storage.queries import list_bases

    with _registry() as registry:
        rows = list_bases(registry)
    if as_json:
        _print_json(rows)
        return
    print_table(
        "bases",
        ["name", "uri", "sha256", "created"],
        [[r["name"], r["uri"], r["sha256"][:12], r["created_at"]] for r in rows],
    )


# Transform options shared by `bundle create` and `group create`.
SignFlipOption = Annotated[bool, typer.Option(help="Random sign flips (the map: --map).")]
MapOption = Annotated[
    SignMap | None,
    typer.Option(
        "--map",
        help="Sign map: a sign per column, per row and column, or per entry "
        "(default: randes.config.DEFAULT_MAP).",
    ),
]
LayerShuffleOption = Annotated[bool, typer.Option(help="Random layer shuffling.")]
Rank1Option = Annotated[
    Rank1 | None,
    typer.Option(help="Rank-1 tensors: flipped, superposed unmapped, or stored per task."),
]
DTypeOption = Annotated[DType, typer.Option(help="Storage dtype of the superposition.")]
GateOption = Annotated[
    float | None,
    typer.Option(help="Validation gate: minimum normalized score per task.", callback=_finite),
]
ServingOption = Annotated[
    Serving | None,
    typer.Option(help="Format pull/materialize serve (default int4); none: the master."),
]
GroupSizeOption = Annotated[
    str | None,
    typer.Option(
        "--group-size",
        metavar="N|row",
        help="Values per quantization scale (default 64), or row: one per row.",
        callback=_group_size,
    ),
]


def transform_config(
    *,
    sign_flip: bool,
    layer_shuffle: bool,
    rank1: Rank1 | None,
    dtype: DType,
    scale: float | None,
    serving: Serving | None,
    group_size: int | str | None,
    sign_map: SignMap | None = None,
) -> TransformConfig:
    """The TransformConfig of `bundle create` / `group create` options (one place)."""
    from randes.config import DEFAULT_SERVING, TransformConfig
    from randes.quantize import QuantScheme

    fields: dict[str, object] = {
        "sign_flip": sign_flip,
        "layer_shuffle": layer_shuffle,
        "dtype": dtype.value,
        "scale": scale,
    }
    if rank1 is not None:
        fields["rank1"] = rank1.value
    if sign_map is not None:
        fields["map"] = sign_map.value
    if serving is Serving.none:
        if group_size is not None:
            raise typer.BadParameter("--group-size needs a quantized --serving format")
        fields["serving"] = None
    elif serving is not None or group_size is not None:
        bits = int(serving.value.removeprefix("int")) if serving else DEFAULT_SERVING.bits
        size = DEFAULT_SERVING.group_size if group_size is None else group_size
        fields["serving"] = QuantScheme.model_validate(
            {"bits": bits, "group_size": None if size == "row" else size}
        )
    return TransformConfig.model_validate(fields)


@bundle_app.command("create")
def bundle_create(
    name: Annotated[str, typer.Argument(help="Name of the new bundle.")],
    base: Annotated[str, typer.Option("--base", help="Registered base model.")],
    sign_flip: SignFlipOption = True,
    layer_shuffle: LayerShuffleOption = True,
    rank1: Rank1Option = None,
    dtype: DTypeOption = DType.float32,
    scale: Annotated[
        float | None,
        typer.Option(help="Bundle-wide lambda (default: data-free).", callback=_positive_scale),
    ] = None,
    gate: GateOption = None,
    serving: ServingOption = None,
    group_size: GroupSizeOption = None,
    sign_map: MapOption = None,
) -> None:
    """Create an empty bundle over a registered base with a fixed transform."""
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
    with _workspace() as ws:
        record = ws.create_bundle(name, base, config, gate_threshold=gate)
        out.print(f"bundle {record.name} on base {record.base_name}: {config.model_dump_json()}")


@bundle_app.command("list")
def bundle_list(as_json: JsonFlag = False) -> None:
    """Bundles with base, transform, head version, task count, aliases and size."""
    from storage.queries import list_bundles

    with _workspace() as ws:
        rows = list_bundles(ws.registry, ws.manifest)
    if as_json:
        _print_json(rows)
        return
    print_table(
        "bundles",
        ["bundle", "base", "serving", "head", "tasks", "aliases", "size"],
        [
            [
                r["name"],
                r["base"],
                _serving_label(r["transform"]),
                "" if r["head_version"] is None else f"{r['head_version']} ({r['head_status']})",
                r["tasks"],
                ",".join(f"{a}@{v}" for a, v in r["aliases"].items()),
                _human_bytes(r["bytes"]),
            ]
            for r in rows
        ],
    )


@bundle_app.command("show")
def bundle_show(
    spec: Annotated[str, typer.Argument(metavar="BUNDLE[@VERSION|@ALIAS]")],
    as_json: JsonFlag = False,
) -> None:
    """One version: its tasks with seeds, lambdas, r_t and evaluations; its sizes."""
    from storage.queries import bundle_summary

    bundle, ref = _split_ref(spec)
    with _workspace() as ws:
        record, manifest = ws.resolve(bundle, ref)
        summary = bundle_summary(
            ws.registry, record, manifest, ws.base_manifest(manifest.base.name).norms
        )
    if as_json:
        _print_json(summary)
        return
    sizes = summary["sizes"]
    out.print(
        f"{bundle} version {summary['version']} ({summary['status']}"
        f"{', ' + ', '.join(summary['aliases']) if summary['aliases'] else ''}) on base "
        f"{summary['base']['name']}; serving {summary['serving']}; master "
        f"{_human_bytes(sizes['master_bytes'])}, serving {_human_bytes(sizes['serving_bytes'])}, "
        f"private {_human_bytes(sizes['private_bytes'])}",
        soft_wrap=True,
    )
    print_table(
        f"{len(summary['tasks'])} tasks",
        ["task", "seed", "added in", "lambda", "r_t", "normalized"],
        [
            [
                t["name"],
                t["seed"],
                t["added_in_version"],
                f"{t['lambda']:.3f}",
                f"{t['interference']:.2e}",
                ", ".join(
                    f"{e['metric']} {100 * e['normalized']:.1f}%"
                    for e in t["evaluations"]
                    if e["normalized"] is not None
                ),
            ]
            for t in summary["tasks"]
        ],
    )


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop always returns


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


@app.command()
def fold(
    bundle: Annotated[str, typer.Argument(help="Bundle to fold into.")],
    source: Annotated[
        str, typer.Argument(help="Checkpoint: path, s3://... or hf://org/repo[@rev].")
    ],
    task: Annotated[str, typer.Option("--task", help="Task name for this checkpoint.")],
    scale: Annotated[
        float | None, typer.Option(help="Per-task lambda override.", callback=_positive_scale)
    ] = None,
) -> None:
    """Fold one fine-tuned checkpoint into a bundle as a new version.

    Folding a checkpoint the bundle already holds under the same task name is a no-op
    (exit 0), so a retried command is harmless. The same bytes under another task name
    are refused: the bundle cannot hold one delta twice, and exiting 0 would tell a
    script that a task exists which does not.
    """
    with _workspace() as ws, progress_bar(f"folding {task}") as progress:
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
    with _workspace() as ws, progress_bar(f"removing {task}") as progress:
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
    master: Annotated[bool, typer.Option("--master", help=MASTER_HELP)] = False,
) -> None:
    """Write one task's standalone model (model.safetensors + config.json).

    It is retrieved from the version's serving superposition (quantized, see `randes
    bundle create --serving`), or from the fp32 master with --master.
    """
    from storage.cache import integrity_context

    bundle, ref = _split_ref(spec)
    with _workspace() as ws, progress_bar(f"materializing {task}") as progress:
        pinned, context = _pin_version(ws.registry, bundle, ref)
        with integrity_context(context):
            path = ws.materialize(
                bundle, pinned, task, dest, scale=scale, progress=progress, master=master
            )
    out.print(f"wrote {path}")


@app.command()
def pull(
    spec: Annotated[str, typer.Argument(metavar="BUNDLE[@VERSION|@ALIAS]")],
    dest: Annotated[Path, typer.Argument()],
    master: Annotated[
        bool,
        typer.Option("--master", help="Also download the fp32 master superposition."),
    ] = False,
) -> None:
    """Download one version with every object it needs; every sha256 is verified.

    A version that serves a quantized superposition is pulled without its fp32 master
    (what materialize needs, several times smaller); --master pulls a complete copy.
    """
    from storage.cache import integrity_context

    bundle, ref = _split_ref(spec)
    with _workspace() as ws:
        pinned, context = _pin_version(ws.registry, bundle, ref)
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
    with _workspace() as ws:
        report = ws.gc(grace_s=grace, dry_run=dry_run, keep_last=keep_last)
    verb = "would delete" if dry_run else "deleted"
    for kept in report.retention:
        numbers = ", ".join(str(v) for v in kept.deleted)
        out.print(f"{kept.bundle}: {verb} version(s) {numbers}")
    out.print(
        f"{verb} {len(report.deleted)} objects; kept {report.kept_young} recent ones; "
        f"swept {report.swept} incomplete uploads or temp files"
    )


def _registry():  # type: ignore[no-untyped-def]
    from storage.registry import Registry
    from storage.settings import load_settings

    return Registry.open_existing(load_settings().resolved_database_url)


@app.command()
def tasks(
    bundle: Annotated[str | None, typer.Argument()] = None,
    version: Annotated[
        int | None, typer.Option(help="Tasks as of this version of BUNDLE (default: now).")
    ] = None,
    include_removed: Annotated[
        bool, typer.Option("--all", help="Also list tasks that were removed.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Tasks held by a bundle (or by all bundles), with seeds and versions."""
    if version is not None and bundle is None:
        raise typer.BadParameter("--version needs a BUNDLE")
    with _registry() as registry:
        records = registry.tasks(bundle, version=version, include_removed=include_removed)
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
        _print_json(rows)
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
        transform = registry.get_bundle(bundle).transform
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
        _print_json(rows)
        return
    print_table(
        f"{bundle} versions (serving {_serving_label(transform)})",
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


def _serving_label(transform: dict[str, Any]) -> str:
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
    with _registry() as registry:  # a missing bundle is told before Prefect starts (~15 s)
        registry.get_bundle(bundle)
    with prefect_session():
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
    scale: Annotated[
        float | None,
        typer.Option(help="Override lambda for every task.", callback=_positive_scale),
    ] = None,
) -> None:
    """Retrieve every task of a version, measure it, and gate the version."""
    from storage.cache import integrity_context

    registry = _registry()
    try:
        pinned, context = _pin_version(registry, bundle, None if version is None else str(version))
    finally:
        registry.close()
    with prefect_session(), integrity_context(context):
        from flows.pipeline import validate_flow

        report = validate_flow(bundle, int(pinned), evaluator, scale)
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
    registry = _registry()
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


_SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "sslpassword")


def _redact(url: str) -> str:
    """A database URL with its password hidden, for printing.

    libpq also takes the password as a query parameter (``?password=...``), which
    SQLAlchemy's ``hide_password`` leaves visible: those values are hidden too.
    """
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        hidden = {k: "***" for k in parsed.query if k.lower().endswith(_SECRET_QUERY_KEYS)}
        if hidden:
            parsed = parsed.update_query_dict(hidden)
        return parsed.render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never print an unparsable URL, it may hold secrets
        return "<database url>"


def _configured_secrets() -> list[str]:
    """Secret values of this process's configuration, as they may appear in a message:
    the database password (from the URL's user info or its query string) and the AWS
    credential variables, each raw and URL-quoted (a rendered URL quotes them)."""
    from urllib.parse import quote, quote_plus

    values = [os.environ.get(n, "") for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    endpoint = os.environ.get("RANDES_S3_ENDPOINT_URL")
    if endpoint:  # user info of an endpoint URL is a credential, its name included
        from urllib.parse import unquote, urlsplit

        try:
            parts = urlsplit(endpoint)
            info = [v for v in (parts.username, parts.password) if v]
        except ValueError:  # unparsable: nothing to pick out
            info = []
        values += info + [unquote(v) for v in info]
    url = os.environ.get("RANDES_DATABASE_URL")
    if url:
        from sqlalchemy.engine import make_url

        try:
            parsed = make_url(url)
        except Exception:  # noqa: BLE001 - unparsable: nothing to pick out
            parsed = None
        if parsed is not None:
            values.append(str(parsed.password or ""))
            for key, value in parsed.query.items():
                if key.lower().endswith(_SECRET_QUERY_KEYS):
                    values += [str(v) for v in (value if isinstance(value, tuple) else (value,))]
    values += [quote(v, safe="") for v in values] + [quote_plus(v, safe="") for v in values]
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def _scrub(line: str) -> str:
    """Last line of defence at the output boundary: no configured secret is printed,
    whatever layer built the message."""
    for secret in _configured_secrets():
        line = line.replace(secret, "***")
    return line


def main(argv: list[str] | None = None) -> Literal[0] | int:
    """Console-script entry point: one line per user error, non-zero exit."""
    root = logging.getLogger()
    if not root.handlers:
        # Without any handler, library warnings (an S3 retry notice per failed attempt)
        # would reach stderr through logging's last-resort handler, around the error line.
        root.addHandler(logging.NullHandler())
    try:
        from flows.cli_groups import route_group_option

        # Outside standalone mode click RETURNS the code of a `typer.Exit` (the gate's
        # exit 3 of `randes validate`) instead of raising it: pass it on.
        code = app(args=route_group_option(argv), standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            return code
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    except _USAGE_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `randes` / `randes base`: help
            exc.show()  # type: ignore[attr-defined]
            return 2
        return _usage_error(exc)
    except (click.exceptions.Abort, typer.Abort):
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except RandesError as exc:
        sys.stderr.write(f"error: {_error_line(str(exc)) or type(exc).__name__}\n")
        return 1
    return 0


_MAX_ERROR_CHARS = 1000


def _error_line(message: str) -> str:
    """The first line of ``message``, safe to print: no control characters.

    Messages quote user input (a path, a task name, a key from a damaged manifest): an
    escape sequence in it must not drive the terminal, and a line separator must not
    turn one error into several lines.
    """
    lines = message.strip().splitlines()
    if not lines:
        return ""
    line = "".join(_escape(ch) for ch in _scrub(lines[0]))
    if len(line) > _MAX_ERROR_CHARS:
        line = line[: _MAX_ERROR_CHARS - 3] + "..."
    return line


def _escape(ch: str) -> str:
    if ch.isprintable() or ch == " ":
        return ch
    return ch.encode("unicode_escape").decode("ascii")


# typer >= 0.16 ships its own copy of click: its usage errors are not click's classes.
_USAGE_ERRORS: tuple[type[Exception], ...] = (click.ClickException, typer.TyperException)


def _usage_error(exc: Exception) -> int:
    """A bad command line as one line on stderr, like every other error (exit status 2)."""
    message = getattr(exc, "format_message", lambda: str(exc))()
    line = _error_line(str(message)) or type(exc).__name__
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    sys.stderr.write(f"error: {line}{hint}\n")
    code = getattr(exc, "exit_code", 2)
    return code if isinstance(code, int) and code else 2


def entry() -> None:
    sys.exit(main())


# Bundle groups: registers `randes group ...` on `app` (flows/cli_groups.py imports the
# names above, so this comes last) and routes the `--group NAME` forms of commands.
import flows.cli_groups  # noqa: E402, F401
