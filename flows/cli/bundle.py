"""``randes bundle create|list|show``: bundles, their transform and their versions' contents."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import (
    human_bytes,
    open_workspace,
    print_json,
    serving_label,
    split_ref,
)
from flows.cli.options import (
    DType,
    DTypeOption,
    GateOption,
    GroupSizeOption,
    JsonFlag,
    LayerShuffleOption,
    MapOption,
    Rank1Option,
    ServingOption,
    SignFlipOption,
    positive_scale,
    transform_config,
)
from flows.cli.validation import bundle_validation
from flows.console import out, print_table

app = typer.Typer(help="Bundles.", no_args_is_help=True)


@app.command("create")
def bundle_create(
    name: Annotated[str, typer.Argument(help="Name of the new bundle.")],
    base: Annotated[str, typer.Option("--base", help="Registered base model.")],
    sign_flip: SignFlipOption = True,
    layer_shuffle: LayerShuffleOption = True,
    rank1: Rank1Option = None,
    dtype: DTypeOption = DType.float32,
    scale: Annotated[
        float | None,
        typer.Option(help="Bundle-wide lambda (default: data-free).", callback=positive_scale),
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
    with open_workspace() as ws:
        record = ws.create_bundle(name, base, config, gate_threshold=gate)
        out.print(f"bundle {record.name} on base {record.base_name}: {config.model_dump_json()}")


app.command("validation")(bundle_validation)


@app.command("list")
def bundle_list(as_json: JsonFlag = False) -> None:
    """Bundles with base, transform, head version, task count, aliases and size."""
    from storage.queries import list_bundles

    with open_workspace() as ws:
        rows = list_bundles(ws.registry, ws.manifest)
    if as_json:
        print_json(rows)
        return
    print_table(
        "bundles",
        ["bundle", "base", "serving", "head", "tasks", "aliases", "size"],
        [
            [
                r["name"],
                r["base"],
                serving_label(r["transform"]),
                "" if r["head_version"] is None else f"{r['head_version']} ({r['head_status']})",
                r["tasks"],
                ",".join(f"{a}@{v}" for a, v in r["aliases"].items()),
                human_bytes(r["bytes"]),
            ]
            for r in rows
        ],
    )


@app.command("show")
def bundle_show(
    spec: Annotated[str, typer.Argument(metavar="BUNDLE[@VERSION|@ALIAS]")],
    as_json: JsonFlag = False,
) -> None:
    """One version: its tasks with seeds, lambdas, r_t and evaluations; its sizes."""
    from storage.queries import bundle_summary

    bundle, ref = split_ref(spec)
    with open_workspace() as ws:
        record, manifest = ws.resolve(bundle, ref)
        summary = bundle_summary(
            ws.registry, record, manifest, ws.base_manifest(manifest.base.name).norms
        )
    if as_json:
        print_json(summary)
        return
    sizes = summary["sizes"]
    out.print(
        f"{bundle} version {summary['version']} ({summary['status']}"
        f"{', ' + ', '.join(summary['aliases']) if summary['aliases'] else ''}) on base "
        f"{summary['base']['name']}; serving {summary['serving']}; master "
        f"{human_bytes(sizes['master_bytes'])}, serving {human_bytes(sizes['serving_bytes'])}, "
        f"private {human_bytes(sizes['private_bytes'])}",
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
