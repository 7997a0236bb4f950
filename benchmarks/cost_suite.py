"""The cost suite: fold and materialize against a plain safetensors copy (see benchmarks.cost).

Built from parts so the suite grows by one entry, not by one more script: a ``Part`` names
what it measures, measures it in ``measure`` (inside the fork server, on the suite's
models) and renders its own markdown from the data it returned. Add a part to ``PARTS``;
``--parts`` picks a subset (a part's data is stored under its name in the result file).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import cost_batch
from benchmarks.cost_cli import CLI_MODEL, CLI_QUICK, measure_cli, render_cli
from benchmarks.cost_measure import run_size, serving
from benchmarks.cost_models import FULL, GPT2_SMALL, QUICK, ROOT, ModelSpec
from benchmarks.cost_report import report
from benchmarks.suite import BaseSuite, Context, Page, Result


@dataclass(frozen=True)
class CostRun:
    """What every part is given: the models, the task count, repeats and a scratch folder."""

    specs: tuple[ModelSpec, ...]
    tasks: int
    repeats: int
    work: Path
    keep: bool
    log: Callable[[str], None]
    quick: bool = False
    cli_old: Path | None = None


@dataclass(frozen=True)
class Part:
    name: str
    measure: Callable[[CostRun], dict[str, Any]]
    render: Callable[[Mapping[str, Any], Mapping[str, Any]], list[str]]  # (data, params)


def _spec_json(res: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "spec"} | {"spec": asdict(res["spec"])}


def measure_fold_materialize(run: CostRun) -> dict[str, Any]:
    """Fold tasks 1..K and materialize task 1 on each model (benchmarks.cost_measure)."""
    sizes = []
    for spec in run.specs:
        sizes.append(
            _spec_json(run_size(spec, run.work / spec.name, run.tasks, run.repeats, run.log))
        )
        if not run.keep:
            shutil.rmtree(run.work / spec.name, ignore_errors=True)
    return {"sizes": sizes}


def render_fold_materialize(data: Mapping[str, Any], params: Mapping[str, Any]) -> list[str]:
    sizes = [dict(r) | {"spec": ModelSpec(**r["spec"])} for r in data["sizes"]]
    tables, verdicts = report(sizes, int(params["repeats"]))
    return [
        "Method: see the docstring of `benchmarks/cost.py` (fresh process per fold, "
        "GPT-2-shaped fp32 models, default TransformConfig, baseline = "
        '`safetensors.torch.load_file(backend="pread")` of every file the operation '
        "reads + `save_file` of as many bytes as it writes, interleaved run by run).",
        "",
        "**Verdicts**",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        tables,
    ]


def measure_batch(run: CostRun) -> dict[str, Any]:
    """K checkpoints as one batch vs K sequential folds, and ingest on a 2-worker Dask
    cluster vs one process (benchmarks.cost_batch), on the first model."""
    spec = run.specs[0]
    return cost_batch.measure(
        spec, run.work / f"batch-{spec.name}", run.tasks, run.repeats, run.log
    )


def measure_fold_cli(run: CostRun) -> dict[str, Any]:
    """One `randes fold` end to end per repeat against a plain copy (benchmarks.cost_cli)."""
    spec = CLI_QUICK if run.quick else CLI_MODEL
    return measure_cli(spec, run.repeats, run.work / "fold_cli", run.log, run.cli_old)


PARTS: dict[str, Part] = {
    p.name: p
    for p in (
        Part("fold_materialize", measure_fold_materialize, render_fold_materialize),
        Part("batch", measure_batch, cost_batch.render),
        Part("fold_cli", measure_fold_cli, render_cli),
    )
}


class CostSuite(BaseSuite):
    name = "cost"
    title = "Cost: fold and materialize against a plain safetensors copy"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--gpt2-small", action="store_true", help="also real GPT-2 small shapes")
        ap.add_argument("--tasks", type=int, default=None, help="tasks folded (default 8)")
        ap.add_argument(
            "--repeats", type=int, default=None, help="runs per fold k / materialize (3; quick 1)"
        )
        ap.add_argument("--keep", action="store_true", help="keep the generated files")
        ap.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
        ap.add_argument(
            "--core", type=Path, default=ROOT, help="checkout whose randes/ is measured"
        )
        ap.add_argument(
            "--cli-old", type=Path, default=None, help="fold_cli: also time this checkout"
        )

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        specs = (QUICK if quick else FULL) + ((GPT2_SMALL,) if args.gpt2_small else ())
        parts = [p for p in args.parts.split(",") if p]
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise SystemExit(f"error: unknown cost part(s) {unknown}; known: {list(PARTS)}")
        return {
            "specs": [asdict(s) for s in specs],
            "tasks": args.tasks or (3 if quick else 8),
            "repeats": args.repeats or (1 if quick else 3),
            "parts": parts,
            "core": str(Path(args.core).resolve()),
            "cli_old": str(Path(args.cli_old).resolve()) if args.cli_old else None,
        }

    def key(self, params: Mapping[str, Any]) -> str:
        """``cost``, or ``cost-<parts>`` for a run of some parts only (its own file)."""
        parts = list(params["parts"])
        return self.name if parts == list(PARTS) else "-".join([self.name, *parts])

    def run(self, ctx: Context) -> dict[str, Any]:
        p = ctx.params
        run = CostRun(
            specs=tuple(ModelSpec(**s) for s in p["specs"]),
            tasks=p["tasks"],
            repeats=p["repeats"],
            work=ctx.work,
            keep=bool(ctx.args.keep),
            log=ctx.log,
            quick=ctx.quick,
            cli_old=Path(p["cli_old"]) if p.get("cli_old") else None,
        )
        with serving(Path(p["core"])):
            return {name: PARTS[name].measure(run) for name in p["parts"]}

    def render(self, result: Result) -> Page:
        lines: list[str] = []
        for name in result.params["parts"]:
            if name in result.data and name in PARTS:
                lines += [*PARTS[name].render(result.data[name], result.params), ""]
        return Page(self.title, "\n".join(lines))
