"""The quality suite: RanDeS against task arithmetic on the digits fine-tunes.

    .venv/bin/python -m benchmarks run quality               # 8 tasks (~15 min on 2 cores)
    .venv/bin/python -m benchmarks run quality --tasks 13    # beyond 8 tasks
    .venv/bin/python -m benchmarks run quality --quick       # 3 tasks, small grids

Question and protocol: the docstring of benchmarks.quality (whose primitives this
runs). Every score the page reads is evaluated here, inside the temporary directory the
bundles live in, and stored per task and split; benchmarks.quality_report renders them.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import (
    DEFAULT_CONFIG,
    HEAD,
    QUICK_RD_GRID,
    QUICK_TA_GRID,
    RD_GRID,
    ROBUST_LAMBDAS,
    ROBUST_RANK1_LAMBDAS,
    SEED_SETS,
    SEEDS,
    TA_GRID,
    Bundle,
    Score,
    Sweep,
    _nbytes,
    _variants,
    base_with_heads,
    build_bundle,
    data_free_lambdas,
    default_variant,
    fit_inverse_law,
    lam_text,
    law,
    load_suite,
    randes_score,
    task_arithmetic,
)
from benchmarks.suite import BaseSuite, Context, Page, Result
from flows.digits.data import ALL_TASKS, TASKS
from flows.digits.model import WEIGHTS_FILE
from flows.digits.train import Recipe
from randes.config import TransformConfig

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "benchmarks" / "out" / "digits-models"


def measure(
    tasks: list[str],
    quick: bool,
    models_dir: Path,
    retrain: bool,
    log: Callable[[str], None],
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    """Train or load the models, fold every variant, evaluate every score the page reads."""
    recipe = recipe or Recipe()
    n = len(tasks)
    ks = sorted({1, n // 2, n}) if quick else list(range(1, n + 1))
    ta_grid = QUICK_TA_GRID if quick else TA_GRID
    rd_grid = QUICK_RD_GRID if quick else RD_GRID
    dflt = default_variant()
    variants = _variants()
    if quick:
        variants = {dflt: variants[dflt]}
    suite = load_suite(models_dir, tasks, recipe, reuse=not retrain)
    log(f"models ready in {suite.train_s:.1f}s")

    ta = Sweep(lambda k, lam: task_arithmetic(suite, k, lam))
    floor = {k: base_with_heads(suite, k) for k in ks}
    rd: dict[str, Sweep] = {}
    bundles: dict[str, Bundle] = {}
    dflt_lams: dict[int, str] = {}
    dscore: dict[int, Score] = {}
    with tempfile.TemporaryDirectory(prefix="randes-quality-") as tmp:
        for i, (name, cfg) in enumerate(variants.items()):
            bundle = build_bundle(suite, cfg, Path(tmp) / f"variant{i}")
            bundles[name] = bundle
            rd[name] = Sweep(partial(randes_score, suite, bundle))
            log(f"folded {n} tasks for {name!r} in {bundle.fold_s:.2f}s")
        for k in ks:
            lams = data_free_lambdas(suite, bundles[dflt], k)
            dflt_lams[k] = lam_text(lams)
            dscore[k] = randes_score(suite, bundles[dflt], k, lams)

        # Selection (validation) over every k for task arithmetic and the default variant,
        # at n tasks only for the other variants: the curve is about the default.
        ta_best = {k: ta.best(k, ta_grid) for k in ks}
        rd_best = {v: {k: rd[v].best(k, rd_grid) for k in (ks if v == dflt else [n])} for v in rd}
        const_lam = max(rd_grid, key=lambda g: sum(rd[dflt](k, g).mean("val") for k in ks))

        # Robustness: the rank-1 policies (flip + shuffle) over several seed sets, and the
        # lambda-by-task-count law fitted on their VALIDATION mean (reported on test).
        robust: dict[str, list[Sweep]] = {}
        robust_ks = [k for k in (2, 4, 6, 8, 10) if k < n] + [n]
        if not quick:
            for pol in ("flip", "plain", "private"):
                name = f"flip + shuffle, rank1={pol}"
                sweeps = [rd[name]]
                for j, seeds in enumerate(SEED_SETS[1:], start=1):
                    b = build_bundle(
                        suite, TransformConfig(rank1=pol), Path(tmp) / f"r-{pol}-{j}", seeds
                    )
                    sweeps.append(Sweep(partial(randes_score, suite, b)))
                robust[pol] = sweeps
            law_sweeps = robust[DEFAULT_CONFIG.rank1]

            def law_value(k: int, g: float) -> float:
                return sum(sw(k, g).mean("val") for sw in law_sweeps) / len(law_sweeps)

            law_c = fit_inverse_law(law_value, robust_ks, ROBUST_LAMBDAS)
            for sw in law_sweeps:
                for k in robust_ks:
                    for g in ROBUST_LAMBDAS:
                        sw(k, g).split("test")
            for sws in robust.values():
                for sw in sws:
                    for g in ROBUST_RANK1_LAMBDAS:
                        sw(n, g).split("test")
        else:
            law_c = fit_inverse_law(lambda k, g: rd[dflt](k, g).mean("val"), ks, rd_grid)

        # Test-split evaluations that the tables below read (forced here, inside the
        # temporary directory the bundles live in).
        for k in ks:
            for sc in (
                ta_best[k][1],
                floor[k],
                rd_best[dflt][k][1],
                dscore[k],
                rd[dflt](k, law(law_c, k)),
                rd[dflt](k, const_lam),
            ):
                sc.split("test")
        for v in rd:
            for g in rd_grid:
                rd[v](n, g).split("test")
                rd[v](n, g).split("val")
        for g in ta_grid:
            ta(n, g).split("test")
        for k in ks:  # the figures' n-curves without robust sets
            for g in rd_grid:
                rd[dflt](k, g).split("test")
        storage = {v: b.bytes(n) for v, b in bundles.items()}
    return {
        "tasks": tasks,
        "ks": ks,
        "ta_grid": list(ta_grid),
        "rd_grid": list(rd_grid),
        "dflt": dflt,
        "variants": list(rd),
        "robust_ks": robust_ks,
        "law_c": law_c,
        "const_lam": const_lam,
        "suite": {
            "ref": suite.ref,
            "rel_delta": suite.rel_delta,
            "train_s": suite.train_s,
            "base_params": sum(v.numel() for v in suite.base.values()),
            "rank1_params": sum(v.numel() for v in suite.base.values() if v.dim() <= 1),
        },
        "bytes": {
            "base": (suite.base_dir / WEIGHTS_FILE).stat().st_size,
            "finetunes": sum((d / WEIGHTS_FILE).stat().st_size for d in suite.task_dirs.values()),
            "heads": sum(_nbytes({h: suite.tuned[t][h] for h in HEAD}) for t in tasks),
            "ta_merged": _nbytes(suite.base),
            "storage": storage,
        },
        "recipe": recipe.to_json(),
        "fold_s": {v: b.fold_s for v, b in bundles.items()},
        "floor": {k: floor[k].per_task for k in ks},
        "dscore": {k: dscore[k].per_task for k in ks},
        "dflt_lams": dflt_lams,
        "ta": sweep_json(ta),
        "rd": {v: sweep_json(sw) for v, sw in rd.items()},
        "robust": {p: [sweep_json(sw) for sw in sws] for p, sws in robust.items()},
    }


def sweep_json(sweep: Sweep) -> list[list[Any]]:
    """Every evaluated score of a sweep: [k, lambda, {split: {task: normalized acc}}]."""
    return [[k, lam, sc.per_task] for (k, lam), sc in sweep.cache.items() if sc.per_task]


class QualitySuite(BaseSuite):
    name = "quality"
    title = "Quality"

    def add_arguments(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
        ap.add_argument("--retrain", action="store_true", help="ignore models trained earlier")
        ap.add_argument(
            "--tasks",
            type=int,
            default=len(TASKS),
            help=f"fold this many tasks: the {len(TASKS)}-task suite, then the extras"
            f" (at most {min(len(ALL_TASKS), len(SEEDS))})",
        )
        ap.add_argument(
            "--threads",
            type=int,
            default=2,
            help="torch threads (default 2, the cores of the reference machine; on a machine"
            " shared with other work 1 avoids OpenMP stalls). Weights depend on it in the"
            " last bits.",
        )

    def params(self, args: argparse.Namespace, quick: bool) -> dict[str, Any]:
        top = min(len(ALL_TASKS), len(SEEDS))
        tasks = args.tasks if args.tasks != len(TASKS) or not quick else 3
        if not 1 <= tasks <= top:
            raise SystemExit(f"error: --tasks must be in 1..{top}")
        return {"tasks": list(ALL_TASKS)[:tasks], "threads": args.threads}

    def key(self, params: Mapping[str, Any]) -> str:
        n = len(params["tasks"])
        return self.name if n == len(TASKS) else f"{self.name}-{n}"

    def run(self, ctx: Context) -> dict[str, Any]:
        torch.set_num_threads(ctx.params["threads"])
        from benchmarks.storage_suites import QUICK_DIR, QUICK_RECIPE

        # models reused between runs: training is deterministic
        models = QUICK_DIR if ctx.quick else Path(ctx.args.models_dir)
        recipe = QUICK_RECIPE if ctx.quick else Recipe()
        tasks = list(ctx.params["tasks"])
        return measure(tasks, ctx.quick, models, ctx.args.retrain, ctx.log, recipe)

    def render(self, result: Result) -> Page:
        from benchmarks.quality_report import render

        n = len(result.params["tasks"])
        title = f"Quality beyond {len(TASKS)} tasks" if n > len(TASKS) else "Quality"
        markdown, figures = render(result.data)
        return Page(title, markdown, figures)
