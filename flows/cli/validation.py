"""The validation policy on the command line: its options and ``randes bundle validation``.

    randes validate BUNDLE [--all] [--drift X] [--window K] [--sample N]
    randes ingest BUNDLE SOURCE [--validate-all] [--drift X] [--window K] [--sample N]
    randes bundle validation BUNDLE [--drift X] [--window K] [--sample N] [--reset]

The options of the first two override the bundle's stored policy for one run; the
third shows the stored policy, or changes it. What they mean: randes.validation_policy.

`flows.cli.runs` takes the options, `flows.cli.bundle` registers the command.
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from flows.console import out


def _drift(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"{value} is not a finite number >= 0")
    return value


DriftOption = Annotated[
    float | None,
    typer.Option(
        help="Measure a task whose predicted interference r_t moved by more than this "
        "fraction since it was last measured (default: the bundle's, else 0.25).",
        callback=_drift,
    ),
]
WindowOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Measure every task at least once every this many versions "
        "(default: the bundle's, else 8).",
    ),
]
SampleOption = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Tasks rotated in per version (default: the bundle's, else ceil(tasks / window)).",
    ),
]


def bundle_validation(
    bundle: Annotated[str, typer.Argument()],
    drift: DriftOption = None,
    window: WindowOption = None,
    sample: SampleOption = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="Back to the defaults (before the options given).")
    ] = False,
) -> None:
    """Show, or change, which tasks a validation of BUNDLE measures."""
    from flows.cli.common import open_registry

    with open_registry() as registry:
        if reset or any(v is not None for v in (drift, window, sample)):
            policy = registry.set_validation_policy(
                bundle, drift=drift, window=window, sample=sample, reset=reset
            )
        else:
            policy = registry.validation_policy(bundle)
    sample_words = (
        f"{policy.sample} per version"
        if policy.sample is not None
        else f"ceil(tasks / {policy.window}) per version"
    )
    out.print(
        f"{bundle}: measures new tasks, tasks whose interference moved by more than "
        f"{100 * policy.drift:g}%, and a rotation of {sample_words}; every task at least "
        f"once every {policy.window} versions",
        soft_wrap=True,
    )
