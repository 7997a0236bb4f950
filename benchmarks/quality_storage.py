"""Quality against storage: normalized accuracy vs total bytes, per serving format.

    .venv/bin/python -m benchmarks run quality_storage --suite digits   # or minilm, all
    .venv/bin/python -m benchmarks run quality_storage --quick --no-large

This module measures (run_suite, run_capacity, run_budget); the tables are
benchmarks.quality_storage_blocks, the summary and findings
benchmarks.quality_storage_findings, the suite benchmarks.quality_storage_suite.

Total bytes = fp32 base + superposition (in its serving format) + private tensors (task
heads, rank-1 tensors under rank1="private"); tensor payloads only, safetensors headers
and manifests excluded. Compared, for each suite:

- RanDeS (TransformConfig(), real randes.fold) with the superposition stored as fp32,
  bf16, int8, int4, int3 (randes.quantize.fake_quantize of each slot of the folded
  fp32 superposition: exactly what a serving artifact decodes to);
- task arithmetic: one merged fp32 model (no base needed), or base + merged delta in a
  quantized format; lambda tuned on validation;
- BitDelta (data-free init): per task and matrix, sign bits + one fp32 scale.

Lambda rules: the data-free lambda per task (randes.scaling, from stored norms only),
the best fixed lambda on VALIDATION (reported on test), and per-tensor data-free lambdas.
Normalized accuracy = test accuracy of the retrieved model / that of the fine-tune."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality import TA_GRID
from benchmarks.storage_core import (
    FORMATS,
    SERVING,
    BitDelta,
    Floor,
    Folded,
    Models,
    RandesGroup,
    StorageSuite,
    Store,
    TaskArithmetic,
    fold_bundle,
    load_models,
    nbytes,
)
from benchmarks.storage_eval import Evaluator, best_fixed, mean
from randes.capacity import DEFAULT_MAX_INTERFERENCE, place
from randes.config import TransformConfig
from randes.scaling import NOISE_GAIN

CONFIG = TransformConfig()
GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
GAINS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.7, 4.0, 5.0, 10.0)
LIMITS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
CALIBRATION_TARGET = 0.98
"""The planner's limit is the largest one whose group keeps this mean normalized
VALIDATION accuracy (int4-g64, data-free lambda) on the calibration suite."""
BUDGET_X = 1.25
"""A bundle (base + superposition + private) must stay within this many fp32 bases."""
CONSTANTS = {"NOISE_GAIN": NOISE_GAIN, "DEFAULT_MAX_INTERFERENCE": DEFAULT_MAX_INTERFERENCE}
"""Results on disk are keyed by these: a cached suite computed under others is not reused."""


@dataclass
class Plan:
    formats: tuple[str, ...] = tuple(FORMATS)
    grid: tuple[float, ...] = GRID
    gains: tuple[float, ...] = GAINS
    gain_formats: tuple[str, ...] = ("fp32", SERVING)
    ta_formats: tuple[str, ...] = ("fp32", "int8-g64", SERVING)
    ta_grid: tuple[float, ...] = TA_GRID
    bitdelta: bool = True
    per_tensor: bool = True
    sweep_formats: tuple[str, ...] = ("fp32", SERVING)
    """Formats whose every grid lambda is also evaluated on test (the sweep table)."""
    grid_formats: tuple[str, ...] | None = None
    """Formats that get the fixed-lambda grid (None: all); the others data-free only."""
    bitdelta_grid: tuple[float, ...] | None = None
    """BitDelta's fixed-lambda grid (None: the same grid)."""


QUICK = Plan(
    formats=("fp32", "int8-g64", SERVING, "int3-g64"),
    grid=(0.6, 0.8, 0.9, 1.0, 1.1, 1.3),
    gains=(0.0, 1.0, 2.7, 5.0, 10.0),
    ta_formats=("fp32",),
    ta_grid=(0.1, 0.2, 0.3, 0.5, 1.0),
    sweep_formats=(),
)
LAMBDA_ONLY = Plan(
    formats=("fp32", SERVING),
    ta_formats=("fp32",),
    per_tensor=True,
)

MINILM_PLAN = Plan(
    formats=("fp32", "bf16", "int8-g64", "int4-row", SERVING, "int4-g128", "int3-g64"),
    grid_formats=("fp32", SERVING, "int3-g64"),
    gain_formats=(SERVING,),
    ta_formats=("fp32", SERVING),
    ta_grid=(0.2, 0.3, 0.5, 0.7, 1.0),
    bitdelta_grid=(0.7, 1.0, 1.3),
    sweep_formats=(),
)
"""MiniLM evaluations cost ~15x the digits ones: the lambda grid on three formats only."""


@dataclass
class Row:
    method: str
    fmt: str
    rule: str
    lam: str
    total: int
    test: dict[str, float]
    store_key: tuple[object, ...] = ()


@dataclass
class SuiteResult:
    suite: StorageSuite
    base_bytes: int
    rows: list[Row] = field(default_factory=list)
    lam: dict[str, dict[str, Any]] = field(default_factory=dict)  # fmt -> gap info
    gains: dict[str, dict[float, float]] = field(default_factory=dict)  # fmt -> gain -> val
    gain_test: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    sweep: dict[str, dict[float, tuple[float, float]]] = field(default_factory=dict)
    capacity: list[dict[str, Any]] = field(default_factory=list)
    budget: list[dict[str, Any]] = field(default_factory=list)
    evals: int = 0
    seconds: float = 0.0
    serving_diff: float | None = None


Log = Callable[[str], None]


def _lam_range(xs: Sequence[float]) -> str:
    lo, hi = min(xs), max(xs)
    return f"{lo:.2f}" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:+.1f}"


# --------------------------------------------------------------------------- one suite


def run_suite(
    suite: StorageSuite, plan: Plan, work: Path, log: Log
) -> tuple[SuiteResult, Models, Folded, Evaluator]:
    t0 = time.perf_counter()
    tasks = suite.tasks
    folded = fold_bundle(suite, tasks, CONFIG, work / "single")
    models = load_models(suite, CONFIG, folded)
    ev = Evaluator(suite)
    res = SuiteResult(suite, models.base_bytes, serving_diff=folded.serving_diff)
    log(f"{suite.name}: folded {len(tasks)} tasks in {folded.fold_s:.1f}s")

    def add(store: Store, rule: str, lam: str, test: dict[str, float]) -> None:
        res.rows.append(Row(store.method, store.fmt, rule, lam, store.total_bytes(), test))
        log(
            f"{suite.name}: {store.method} {store.fmt} {rule} ({lam}):"
            f" {_pct(mean(test))}  [{ev.evals} evals]"
        )

    individual = sum(nbytes(models.tuned[t]) for t in tasks)
    res.rows.append(
        Row("individual fine-tunes", "fp32", "-", "-", individual, dict.fromkeys(tasks, 1.0))
    )
    floor = Floor(models, folded)
    add(floor, "lambda = 0", "0", ev.point(floor, dict.fromkeys(tasks, 0.0), "test", tasks))

    for name in plan.formats:
        g = RandesGroup(models, [folded], FORMATS[name])
        df = {t: g.data_free(t) for t in tasks}
        df_test = ev.point(g, df, "test", tasks)
        add(g, "data-free", _lam_range(list(df.values())), df_test)
        if plan.grid_formats is not None and name not in plan.grid_formats:
            continue
        lam, _ = best_fixed(ev, g, tasks, plan.grid)
        fx_test = ev.point(g, dict.fromkeys(tasks, lam), "test", tasks)
        add(g, "best fixed (val)", f"{lam:g}", fx_test)
        info: dict[str, Any] = {
            "df_lams": df,
            "df_test": mean(df_test),
            "df_val": mean(ev.point(g, df, "val", tasks)),
            "best_lam": lam,
            "grid": list(plan.grid),
            "r": mean([g.interference(t) for t in tasks]),
            "best_test": mean(fx_test),
            "best_val": mean(ev.point(g, dict.fromkeys(tasks, lam), "val", tasks)),
        }
        if plan.per_tensor:
            pt = {t: g.data_free_tensors(t) for t in tasks}
            pt_test = ev.point(g, pt, "test", tasks)
            lams = [v for d in pt.values() for v in d.values()]
            add(g, "per-tensor data-free", _lam_range(lams), pt_test)
            info["pt_test"] = mean(pt_test)
        res.lam[name] = info
        if name in plan.sweep_formats:
            res.sweep[name] = {
                lam_: (
                    mean(ev.point(g, dict.fromkeys(tasks, lam_), "val", tasks)),
                    mean(ev.point(g, dict.fromkeys(tasks, lam_), "test", tasks)),
                )
                for lam_ in plan.grid
            }
        if name in plan.gain_formats:
            vals = {
                gain: mean(ev.point(g, {t: g.data_free(t, gain) for t in tasks}, "val", tasks))
                for gain in plan.gains
            }
            res.gains[name] = vals
            best = max(plan.gains, key=lambda x: (round(vals[x], 9), -abs(x - NOISE_GAIN)))
            at_best = mean(ev.point(g, {t: g.data_free(t, best) for t in tasks}, "test", tasks))
            res.gain_test[name] = (best, at_best, mean(df_test))
            log(f"{suite.name}: {name} best NOISE_GAIN on val {best:g} (test {_pct(at_best)})")

    for name in plan.ta_formats:
        ta = TaskArithmetic(models, FORMATS[name])
        lam, _ = best_fixed(ev, ta, tasks, plan.ta_grid)
        add(
            ta,
            "best fixed (val)",
            f"{lam:g}",
            ev.point(ta, dict.fromkeys(tasks, lam), "test", tasks),
        )

    if plan.bitdelta:
        bd = BitDelta(models, folded)
        add(
            bd,
            "data-free (= 1, no cross-talk)",
            "1",
            ev.point(bd, dict.fromkeys(tasks, 1.0), "test", tasks),
        )
        lam, _ = best_fixed(ev, bd, tasks, plan.bitdelta_grid or plan.grid)
        add(
            bd,
            "best fixed (val)",
            f"{lam:g}",
            ev.point(bd, dict.fromkeys(tasks, lam), "test", tasks),
        )

    res.evals = ev.evals
    res.seconds = time.perf_counter() - t0
    return res, models, folded, ev


# --------------------------------------------------------------------------- capacity


def plan_groups(
    folded: Folded, models: Models, tasks: Sequence[str], limit: float
) -> list[list[str]]:
    """randes.capacity.place over the tasks in order: the members of the bundle group."""
    bundles: list[dict[str, dict[str, float]]] = []
    for t in tasks:
        norms = folded.delta_norms[t]
        i = place(bundles, t, norms, models.base_norms, models.superposed, limit=limit)
        if i is None:
            bundles.append({t: norms})
        else:
            bundles[i][t] = norms
    return [list(b) for b in bundles]


def run_capacity(
    res: SuiteResult,
    models: Models,
    folded: Folded,
    ev: Evaluator,
    limits: Sequence[float],
    work: Path,
    log: Log,
) -> None:
    """Groups planned at each limit, served int4-g64 with data-free lambdas per member,
    against the ONE all-task bundle in the format of nearest (and of at least) equal bytes."""
    suite = res.suite
    tasks = suite.tasks
    singles = {
        name: RandesGroup(models, [folded], FORMATS[name]) for name in FORMATS
    }  # same keys as run_suite's stores: evaluations are shared
    single_test = {}
    for name, g in singles.items():
        single_test[name] = ev.point(g, {t: g.data_free(t) for t in tasks}, "test", tasks)
    folds: dict[tuple[str, ...], Folded] = {tuple(tasks): folded}
    for limit in limits:
        members = plan_groups(folded, models, tasks, limit)
        mem_folds = []
        for m in members:
            key = tuple(m)
            if key not in folds:
                folds[key] = fold_bundle(suite, m, CONFIG, work / f"m{len(folds)}")
            mem_folds.append(folds[key])
        g = RandesGroup(models, mem_folds, FORMATS[SERVING], label="group")
        df = {t: g.data_free(t) for t in tasks}
        val = ev.point(g, df, "val", tasks)
        test = ev.point(g, df, "test", tasks)
        total = g.total_bytes()
        by_bytes = sorted(singles, key=lambda n: singles[n].total_bytes())
        nearest = min(by_bytes, key=lambda n: abs(singles[n].total_bytes() - total))
        at_least = next((n for n in by_bytes if singles[n].total_bytes() >= total), by_bytes[-1])
        res.capacity.append(
            {
                "limit": limit,
                "members": members,
                "total": total,
                "val": val,
                "test": test,
                "lams": df,
                "nearest": (nearest, singles[nearest].total_bytes(), single_test[nearest]),
                "at_least": (at_least, singles[at_least].total_bytes(), single_test[at_least]),
            }
        )
        log(
            f"{suite.name}: limit {limit:g}: {len(members)} members, {total / res.base_bytes:.2f}x,"
            f" test {_pct(mean(test))} vs single {nearest} {_pct(mean(single_test[nearest]))}"
        )


def calibrate(cap: Sequence[Mapping[str, Any]]) -> float:
    """Largest limit whose group keeps CALIBRATION_TARGET mean normalized val accuracy."""
    ok = [c["limit"] for c in cap if mean(c["val"]) >= CALIBRATION_TARGET]  # type: ignore[arg-type]
    return float(max(ok)) if ok else float(min(c["limit"] for c in cap))  # type: ignore[type-var]


# --------------------------------------------------------------------------- budget

BUDGET_FORMATS = (SERVING, "int3-g64")
BUDGET_LIMITS = (0.03, 0.05, 0.1, 0.2)
FLIP = TransformConfig(rank1="flip")


class Bf16Private(RandesGroup):
    """HYPOTHETICAL: the default bundle with every private tensor (rank-1 tensors and
    heads) stored bf16. randes.fold writes private tensors in their checkpoint dtype, so
    no product path stores this; accuracy is measured with the private tensors rounded
    to bf16, bytes counted at 2 per value."""

    def __init__(self, models: Models, folded: Folded, fmt: str) -> None:
        rounded_priv = {
            t: {n: x.to(torch.bfloat16).to(x.dtype) for n, x in p.items()}
            for t, p in folded.private.items()
        }
        copy = Folded(
            folded.config,
            folded.tasks,
            folded.seeds,
            folded.superposition,
            rounded_priv,
            folded.key_maps,
            folded.delta_norms,
        )
        super().__init__(models, [copy], FORMATS[fmt], label="private-bf16")
        self.method = "RanDeS, private tensors bf16 (hypothetical)"

    def private_bytes(self) -> int:
        return sum(
            x.numel() * 2 for m in self.members for p in m.private.values() for x in p.values()
        )


def run_budget(
    res: SuiteResult, models: Models, folded: Folded, ev: Evaluator, work: Path, log: Log
) -> None:
    """The best configurations that fit BUDGET_X fp32 bases (data-free lambda, test)."""
    suite = res.suite
    tasks = suite.tasks
    base = res.base_bytes

    def add(store: RandesGroup, config: str, members: str) -> None:
        df = {t: store.data_free(t) for t in tasks}
        test = ev.point(store, df, "test", tasks)
        total = store.total_bytes()
        res.budget.append(
            {
                "config": config,
                "fmt": store.fmt,
                "members": members,
                "lam": _lam_range(list(df.values())),
                "total": total,
                "test": test,
            }
        )
        log(
            f"{suite.name} budget: {config} {store.fmt} [{members}] {total / base:.3f}x"
            f" test {_pct(mean(test))}"
        )

    for fmt in BUDGET_FORMATS:
        add(RandesGroup(models, [folded], FORMATS[fmt]), "`TransformConfig()` (default)", "1")
    for fmt in BUDGET_FORMATS:
        add(Bf16Private(models, folded, fmt), "default, private tensors bf16 (hypothetical)", "1")
    f_flip = fold_bundle(suite, tasks, FLIP, work / "flip")
    m_flip = load_models(suite, FLIP, f_flip)
    for fmt in BUDGET_FORMATS:
        add(RandesGroup(m_flip, [f_flip], FORMATS[fmt], label="flip"), '`rank1="flip"`', "1")
    folds: dict[tuple[str, ...], Folded] = {tuple(tasks): f_flip}
    plans: dict[tuple[tuple[str, ...], ...], list[float]] = {}
    for limit in BUDGET_LIMITS:
        members = plan_groups(f_flip, m_flip, tasks, limit)
        if len(members) >= 2:
            plans.setdefault(tuple(tuple(m) for m in members), []).append(limit)
    for planned, limits in plans.items():
        members = [list(m) for m in planned]
        limit_txt = ", ".join(f"{x:g}" for x in limits)
        mem_folds = []
        for m in members:
            if tuple(m) not in folds:
                folds[tuple(m)] = fold_bundle(suite, m, FLIP, work / f"flip{len(folds)}")
            mem_folds.append(folds[tuple(m)])
        for fmt in BUDGET_FORMATS:
            g = RandesGroup(m_flip, mem_folds, FORMATS[fmt], label="flip-group")
            add(
                g,
                f'`rank1="flip"` group, `place` limit {limit_txt}',
                " / ".join("+".join(m) for m in members),
            )
