"""Quality against storage: normalized accuracy vs total bytes, per serving format.

    .venv/bin/python -m benchmarks.quality_storage --suite digits   # or minilm, all
    .venv/bin/python -m benchmarks.quality --storage --suite digits # same

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
Normalized accuracy = test accuracy of the retrieved model / that of the fine-tune.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import DATE, MACHINE, TA_GRID, write_section  # noqa: E402
from benchmarks.storage_core import (  # noqa: E402
    FORMATS,
    SERVING,
    BitDelta,
    Evaluator,
    Floor,
    Folded,
    Models,
    RandesGroup,
    StorageSuite,
    Store,
    TaskArithmetic,
    best_fixed,
    fold_bundle,
    load_models,
    mean,
    nbytes,
)
from randes.capacity import DEFAULT_MAX_INTERFERENCE, place  # noqa: E402
from randes.config import TransformConfig  # noqa: E402
from randes.scaling import NOISE_GAIN  # noqa: E402

CONFIG = TransformConfig()
GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3)
GAINS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.7, 4.0, 5.0, 10.0)
LIMITS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
CALIBRATION_TARGET = 0.98
"""The planner's limit is the largest one whose group keeps this mean normalized
VALIDATION accuracy (int4-g64, data-free lambda) on the calibration suite."""
BUDGET_X = 1.25
"""A bundle (base + superposition + private) must stay within this many fp32 bases."""
SECTION = "## Quality against storage"
OUT = ROOT / "benchmarks/out/storage"
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
    lam: dict[str, dict[str, object]] = field(default_factory=dict)  # fmt -> gap info
    gains: dict[str, dict[float, float]] = field(default_factory=dict)  # fmt -> gain -> val
    gain_test: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    sweep: dict[str, dict[float, tuple[float, float]]] = field(default_factory=dict)
    capacity: list[dict[str, object]] = field(default_factory=list)
    budget: list[dict[str, object]] = field(default_factory=list)
    evals: int = 0
    seconds: float = 0.0
    serving_diff: float | None = None


class Log:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


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
        info: dict[str, object] = {
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


def calibrate(cap: Sequence[Mapping[str, object]]) -> float:
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
    for members, limits in plans.items():
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


def budget_block(res: SuiteResult) -> list[str]:
    base = res.base_bytes
    fits = [b for b in res.budget if int(b["total"]) <= BUDGET_X * base]  # type: ignore[call-overload]
    best = max(fits, key=lambda b: mean(b["test"])) if fits else None  # type: ignore[arg-type]
    rows = []
    for b in res.budget:
        total = int(b["total"])  # type: ignore[call-overload]
        ok = total <= BUDGET_X * base
        acc = _pct(mean(b["test"]))  # type: ignore[arg-type]
        rows.append(
            [
                str(b["config"]),
                str(b["fmt"]),
                str(b["members"]),
                str(b["lam"]),
                _kib(total),
                f"{total / base:.3f}",
                "yes" if ok else "no",
                f"**{acc}**" if b is best else acc,
                _worst(b["test"]),  # type: ignore[arg-type]
            ]
        )
    out = [
        f"#### Digits-8 within {BUDGET_X}x",
        "",
        f"Configurations of the digits-8 bundle against the {BUDGET_X}x budget (total bytes:"
        " fp32 base + superposition(s) in the format + private tensors), data-free lambda per"
        f" task (NOISE_GAIN {NOISE_GAIN:g}), mean normalized test accuracy. Default"
        ' `rank1="private"` stores every task\'s rank-1 tensors (biases, norms) verbatim,'
        " which on this 201k-parameter model costs more than the int4 superposition;"
        ' `rank1="flip"` superposes them instead (only the task heads stay private). Groups:'
        " `randes.capacity.place` over the tasks in order, each member folded separately"
        ' with `rank1="flip"`. The bf16-private rows are hypothetical (the product stores'
        " private tensors in their checkpoint dtype): accuracy measured with private tensors"
        " rounded to bf16, bytes counted at 2 per value.",
        "",
    ]
    out += _table(
        [
            "configuration",
            "format",
            "members",
            "data-free lambda",
            "total KiB",
            "x base",
            f"<= {BUDGET_X}x",
            "mean norm. test %",
            "worst task",
        ],
        rows,
    )
    out.append("")
    if best is not None:
        out += [
            f"Best within {BUDGET_X}x: **{_pct(mean(best['test']))}%** mean normalized test"  # type: ignore[arg-type]
            f" accuracy with {best['config']} served {best['fmt']}"
            f" ({int(best['total']) / base:.3f}x the fp32 base; members {best['members']}).",  # type: ignore[call-overload]
            "",
        ]
    return out


# --------------------------------------------------------------------------- report


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _worst(test: Mapping[str, float]) -> str:
    t = min(test, key=lambda k: test[k])
    return f"{_pct(test[t])} (`{t}`)"


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def default_row(res: SuiteResult) -> Row | None:
    return next(
        (
            r
            for r in res.rows
            if r.method == "RanDeS" and r.fmt == SERVING and r.rule == "data-free"
        ),
        None,
    )


def suite_block(res: SuiteResult, command: str, calibrated: float | None = None) -> list[str]:
    s = res.suite
    base = res.base_bytes
    lines = [f"### {s.name}: {s.description}", ""]
    lines += [
        f"Command `{command}`; this suite took {res.seconds:.0f} s ({res.evals} task"
        f" evaluations). Base: {_kib(base)} KiB fp32." + "".join(f" {n}." for n in s.notes),
        "",
    ]
    if res.serving_diff is not None:
        lines += [
            f"Check: the serving copy `randes.fold` itself wrote ({SERVING}) decodes to"
            f" fake_quantize of the master within {res.serving_diff:.1e} (max abs difference).",
            "",
        ]
    rows = [
        [
            r.method,
            r.fmt,
            r.rule,
            r.lam,
            _kib(r.total),
            f"{r.total / base:.2f}",
            f"**{_pct(mean(r.test))}**",
            _worst(r.test),
        ]
        for r in res.rows
    ]
    lines += _table(
        [
            "method",
            "format",
            "lambda rule",
            "lambda",
            "total KiB",
            "x base",
            "mean norm. test %",
            "worst task",
        ],
        rows,
    )
    lines.append("")
    d = default_row(res)
    if d is not None:
        x = d.total / base
        lines += [
            f"**Default settings** (`TransformConfig()`, served {SERVING}, data-free lambda):"
            f" {_pct(mean(d.test))}% mean normalized test accuracy, worst task {_worst(d.test)},"
            f" at {x:.2f}x the fp32 base ({'within' if x <= BUDGET_X else 'over'} the"
            f" {BUDGET_X}x budget; superposition {x - 1 - _priv_x(res):.2f}x, private tensors"
            f" {_priv_x(res):.2f}x). Reaches 97%: **{'yes' if mean(d.test) >= 0.97 else 'no'}**."
            + _budget_note(res),
            "",
        ]
    if res.lam:
        lines += [
            "Data-free lambda against the best fixed lambda (chosen on val, reported on test):",
            "",
        ]
        lrows = []
        for name, info in res.lam.items():
            gap = float(info["df_test"]) - float(info["best_test"])  # type: ignore[arg-type]
            lrows.append(
                [
                    name,
                    _lam_range(list(info["df_lams"].values())),  # type: ignore[union-attr]
                    _pct(float(info["df_test"])),  # type: ignore[arg-type]
                    f"{info['best_lam']:g}" + _edge(float(info["best_lam"]), info),  # type: ignore[arg-type]
                    _pct(float(info["best_test"])),  # type: ignore[arg-type]
                    _signed(gap),
                    "yes" if gap >= -0.02 else "**no**",
                    _pct(float(info["pt_test"])) if "pt_test" in info else "-",  # type: ignore[arg-type]
                    f"{float(info['r']):.3g}",  # type: ignore[arg-type]
                    _implied_gain(float(info["best_lam"]), float(info["r"])),  # type: ignore[arg-type]
                ]
            )
        lines += _table(
            [
                "format",
                "data-free lambda",
                "test %",
                "best fixed lambda (val)",
                "test %",
                "gap (points)",
                "within 2 points",
                "per-tensor data-free test %",
                "mean r_t",
                "gain implied by best lambda",
            ],
            lrows,
        )
        lines.append("")
    if res.gains:
        fmts = list(res.gains)
        gains = list(next(iter(res.gains.values())))
        grows = []
        for gain in gains:
            cells = []
            for f in fmts:
                v = res.gains[f][gain]
                best = res.gain_test[f][0]
                cells.append(f"**{_pct(v)}**" if gain == best else _pct(v))
            grows.append([f"{gain:g}" + (" (NOISE_GAIN)" if gain == NOISE_GAIN else ""), *cells])
        lines += [
            "NOISE_GAIN of the data-free lambda 1/(1 + gain r_t): mean normalized VALIDATION"
            " accuracy %, best in bold (ties: nearest the current constant).",
            "",
        ]
        lines += _table(["gain", *(f"{f} val %" for f in fmts)], grows)
        lines += [
            "",
            "; ".join(
                f"{f}: best gain {b:g} gives {_pct(t_best)} on test vs {_pct(t_cur)} at"
                f" {NOISE_GAIN:g} ({_signed(t_best - t_cur)})"
                for f, (b, t_best, t_cur) in res.gain_test.items()
            )
            + ".",
            "",
        ]
    if res.sweep:
        fmts = list(res.sweep)
        grid = list(next(iter(res.sweep.values())))
        lines += ["Fixed-lambda sweep, mean normalized test % (val in brackets):", ""]
        lines += _table(
            ["lambda", *fmts],
            [
                [
                    f"{g:g}",
                    *(f"{_pct(res.sweep[f][g][1])} ({_pct(res.sweep[f][g][0])})" for f in fmts),
                ]
                for g in grid
            ],
        )
        lines.append("")
    if res.capacity:
        lines += capacity_block(res, calibrated)
    if res.budget:
        lines += budget_block(res)
    return lines


def _edge(lam: float, info: Mapping[str, object]) -> str:
    grid = info.get("grid") or []
    return " (grid edge)" if grid and lam in (min(grid), max(grid)) else ""  # type: ignore[type-var, arg-type]


def _implied_gain(lam: float, r: float) -> str:
    """The NOISE_GAIN for which 1/(1 + gain r) equals the best fixed lambda."""
    if lam >= 1.0 or r <= 0:
        return "0 (lambda >= 1)"
    return f"{(1 / lam - 1) / r:.2f}"


def _budget_note(res: SuiteResult) -> str:
    """Why a suite cannot meet the budget whatever the format, when that is the case."""
    left = BUDGET_X - 1 - _priv_x(res)
    sups = [
        (r.total / res.base_bytes - 1 - _priv_x(res), r.fmt)
        for r in res.rows
        if r.method == "RanDeS" and r.rule == "data-free"
    ]
    smallest = min(sups) if sups else None
    if smallest is None or smallest[0] <= left:
        return ""
    return (
        f' The private tensors alone (task heads and, with rank1="private", every'
        f" task's rank-1 tensors: {_priv_x(res):.2f}x here) leave {max(left, 0):.2f}x of the"
        f" budget, less than the smallest superposition measured ({smallest[1]},"
        f' {smallest[0]:.2f}x): with `rank1="private"` no format fits on this model, whose'
        " rank-1 tensors are a far larger share of the parameters than in real transformers."
        + (
            f" Configurations that do fit: the table 'Digits-8 within {BUDGET_X}x' below."
            if res.budget
            else ""
        )
    )


def _priv_x(res: SuiteResult) -> float:
    floor = next(r for r in res.rows if r.method.startswith("base + private"))
    return floor.total / res.base_bytes - 1


def capacity_block(res: SuiteResult, calibrated: float | None) -> list[str]:
    base = res.base_bytes
    rows = []
    for c in res.capacity:
        members = c["members"]
        n_name, n_bytes, n_test = c["nearest"]  # type: ignore[misc]
        a_name, a_bytes, a_test = c["at_least"]  # type: ignore[misc]
        total = int(c["total"])  # type: ignore[arg-type]
        rows.append(
            [
                f"{c['limit']:g}"
                + (" (default)" if c["limit"] == DEFAULT_MAX_INTERFERENCE else ""),
                " / ".join("+".join(m) for m in members),  # type: ignore[union-attr]
                f"{_kib(total)} ({total / base:.2f}x)",
                _pct(mean(c["val"])),  # type: ignore[arg-type]
                f"**{_pct(mean(c['test']))}**",  # type: ignore[arg-type]
                _worst(c["test"]),  # type: ignore[arg-type]
                f"{n_name}: {_kib(n_bytes)} ({n_bytes / base:.2f}x), {_pct(mean(n_test))}",
                f"{a_name}: {_kib(a_bytes)} ({a_bytes / base:.2f}x), {_pct(mean(a_test))}",
            ]
        )
    out = [
        "Capacity planning: `randes.capacity.place` over the tasks in order at each limit on"
        f" r_t; each member folded separately, served {SERVING}, data-free lambda within"
        " its member. Against ONE bundle of all tasks (data-free lambda) in the format of"
        " nearest total bytes, and in the cheapest format with at least the group's bytes.",
        "",
    ]
    out += _table(
        [
            "limit",
            "members",
            "group KiB",
            "group val %",
            "group test %",
            "worst task",
            "one bundle, nearest bytes: test %",
            "one bundle, >= bytes: test %",
        ],
        rows,
    )
    out.append("")
    if calibrated is not None:
        out += [
            f"Calibrated limit (largest with group mean val >= {_pct(CALIBRATION_TARGET)}%):"
            f" **{calibrated:g}** (current DEFAULT_MAX_INTERFERENCE {DEFAULT_MAX_INTERFERENCE:g}).",
            "",
        ]
    return out


STYLE = {
    "RanDeS/data-free": ("o", "C0", "RanDeS, data-free lambda"),
    "RanDeS/best fixed (val)": ("o", "C1", "RanDeS, best fixed lambda (val)"),
    "RanDeS/per-tensor data-free": ("^", "C2", "RanDeS, per-tensor data-free lambdas"),
    "task arithmetic": ("s", "C3", "task arithmetic, best lambda (val)"),
    "BitDelta": ("v", "C4", "BitDelta (data-free init), best lambda (val)"),
    "individual": ("*", "k", "individual fine-tunes"),
    "floor": ("x", "0.5", "base + private tensors (lambda 0)"),
}
LABELLED = ("fp32", "bf16", "int8-g64", "int4-g64", "int3-g64")


def _curves(res: SuiteResult) -> dict[str, list[tuple[float, float, str]]]:
    curves: dict[str, list[tuple[float, float, str]]] = {}
    for r in res.rows:
        if r.method == "RanDeS":
            key = f"RanDeS/{r.rule}"
        elif r.method.startswith("task arithmetic"):
            key = "task arithmetic"
        elif r.method.startswith("BitDelta"):
            if r.rule != "best fixed (val)":
                continue
            key = "BitDelta"
        elif r.method.startswith("individual"):
            key = "individual"
        else:
            key = "floor"
        curves.setdefault(key, []).append((r.total / res.base_bytes, 100 * mean(r.test), r.fmt))
    return curves


def plot(results: Sequence[SuiteResult], path: Path) -> None:
    """One panel per suite: x = total bytes / fp32 base (log), y = mean normalized test acc."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for key, pts in _curves(res).items():
            marker, color, label = STYLE[key]
            pts.sort()
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=marker,
                color=color,
                ls="-" if key.startswith("RanDeS") else "none",
                mfc="none" if key == "RanDeS/best fixed (val)" else color,
                label=label,
                alpha=0.9,
            )
            if key in ("RanDeS/data-free", "task arithmetic"):
                shown = [p for p in pts if p[2] in LABELLED]
                for i, (x, y, f) in enumerate(shown):
                    dy = -10 if i % 2 == 0 else 5
                    ax.annotate(f, (x, y), fontsize=6, xytext=(2, dy), textcoords="offset points")
        if res.capacity:
            xs = [int(c["total"]) / res.base_bytes for c in res.capacity]  # type: ignore[call-overload]
            ys = [100 * mean(c["test"]) for c in res.capacity]  # type: ignore[arg-type]
            ax.plot(xs, ys, "D", color="C5", label=f"bundle group ({SERVING}, data-free), by limit")
            seen: set[tuple[float, float]] = set()
            for x, y, c in zip(xs, ys, res.capacity, strict=True):
                if (round(x, 3), round(y, 1)) in seen:
                    continue
                seen.add((round(x, 3), round(y, 1)))
                ax.annotate(
                    f"{c['limit']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
        ax.axvline(BUDGET_X, color="r", ls="--", lw=1)
        ax.set_xscale("log")
        ticks = [1, BUDGET_X, 1.5, 2, 3, 4, 6, 8, 12]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        lo = min(100 * mean(r.test) for r in res.rows)
        ax.set_ylim(max(0.0, lo - 3), 102)
        ax.text(BUDGET_X, lo - 2, f" {BUDGET_X}x", color="r", fontsize=7)
        ax.set_xlabel("total bytes / fp32 base (base + superposition + private)")
        ax.set_ylabel("mean normalized test accuracy (%)")
        ax.set_title(f"{res.suite.name}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- summary


def summarize(res: SuiteResult, calibrated: float | None = None) -> dict[str, object]:
    """The numbers the section's findings are written from (kept per suite on disk)."""
    d = default_row(res)
    out: dict[str, object] = {"name": res.suite.name, "seconds": res.seconds}
    if d is not None:
        out["default"] = {
            "mean": mean(d.test),
            "worst": min(d.test.values()),
            "x": d.total / res.base_bytes,
        }
    out["fp32_df"] = {
        r.fmt: mean(r.test) for r in res.rows if r.method == "RanDeS" and r.rule == "data-free"
    }
    out["x"] = {
        r.fmt: r.total / res.base_bytes
        for r in res.rows
        if r.method == "RanDeS" and r.rule == "data-free"
    }
    out["gaps"] = {
        f: float(i["df_test"]) - float(i["best_test"])  # type: ignore[arg-type]
        for f, i in res.lam.items()
    }
    out["best_lam"] = {f: i["best_lam"] for f, i in res.lam.items()}
    out["pt_gap"] = {
        f: float(i["pt_test"]) - float(i["df_test"])  # type: ignore[arg-type]
        for f, i in res.lam.items()
        if "pt_test" in i
    }
    out["df_lam"] = {
        f: _lam_range(list(i["df_lams"].values()))  # type: ignore[union-attr]
        for f, i in res.lam.items()
    }
    out["gains"] = {f: list(v) for f, v in res.gain_test.items()}
    out["gain_val"] = {f: {str(g): v for g, v in d.items()} for f, d in res.gains.items()}
    ta = [r for r in res.rows if r.method == "task arithmetic" and r.fmt == "fp32"]
    if ta:
        out["ta"] = mean(ta[0].test)
    if res.capacity:
        out["capacity"] = [
            {
                "limit": c["limit"],
                "members": len(c["members"]),  # type: ignore[arg-type]
                "x": int(c["total"]) / res.base_bytes,  # type: ignore[arg-type]
                "test": mean(c["test"]),  # type: ignore[arg-type]
                "val": mean(c["val"]),  # type: ignore[arg-type]
                "nearest": [
                    c["nearest"][0],  # type: ignore[index]
                    c["nearest"][1] / res.base_bytes,  # type: ignore[index]
                    mean(c["nearest"][2]),  # type: ignore[index]
                ],
                "at_least": [
                    c["at_least"][0],  # type: ignore[index]
                    c["at_least"][1] / res.base_bytes,  # type: ignore[index]
                    mean(c["at_least"][2]),  # type: ignore[index]
                ],
            }
            for c in res.capacity
        ]
    if res.budget:
        fits = [b for b in res.budget if int(b["total"]) <= BUDGET_X * res.base_bytes]  # type: ignore[call-overload]
        if fits:
            b = max(fits, key=lambda b: mean(b["test"]))  # type: ignore[arg-type]
            out["budget_best"] = {
                "config": b["config"],
                "fmt": b["fmt"],
                "members": b["members"],
                "x": int(b["total"]) / res.base_bytes,  # type: ignore[call-overload]
                "test": mean(b["test"]),  # type: ignore[arg-type]
            }
    if calibrated is not None:
        out["calibrated"] = calibrated
    return out


ORDER = ("digits-8", "digits-13", "digits-8-large", "minilm")


def findings(sums: Mapping[str, Mapping[str, object]]) -> list[str]:
    """Bullets computed from every suite's summary (so no sentence can go stale)."""
    out = ["**Findings** (computed from the tables below).", ""]
    for name in ORDER:
        s = sums.get(name)
        if s is None or "default" not in s:
            continue
        d = s["default"]  # type: ignore[assignment]
        verdict = "reaches" if d["mean"] >= 0.97 else "does not reach"  # type: ignore[index]
        budget = "within" if d["x"] <= BUDGET_X else "over"  # type: ignore[index]
        out.append(
            f"- Default settings on {name} ({SERVING}, data-free lambda): {_pct(d['mean'])}%"  # type: ignore[index]
            f" mean, worst task {_pct(d['worst'])}%, {d['x']:.2f}x the fp32 base ({budget}"  # type: ignore[index]
            f" {BUDGET_X}x); it {verdict} 97%."
        )
        bb = s.get("budget_best")
        if bb is not None:
            out.append(
                f"- Best {name} configuration within {BUDGET_X}x the fp32 base:"
                f" **{_pct(bb['test'])}%** with {bb['config']} served {bb['fmt']}"  # type: ignore[index]
                f" ({bb['x']:.3f}x; members {bb['members']})."  # type: ignore[index]
            )
    for name in ORDER:
        s = sums.get(name)
        if s is None or not s.get("gaps"):
            continue
        gaps: Mapping[str, float] = s["gaps"]  # type: ignore[assignment]
        worst = min(gaps, key=lambda f: gaps[f])
        ok = all(g >= -0.02 for g in gaps.values())
        out.append(
            f"- Data-free vs best fixed lambda on {name}: gaps "
            + ", ".join(f"{f} {_signed(g)}" for f, g in gaps.items())
            + f" points (worst {worst}); within 2 points everywhere: **{'yes' if ok else 'no'}**."
            f" Data-free lambdas {s['df_lam'].get('fp32', '?')}, best fixed"  # type: ignore[union-attr]
            f" {s['best_lam'].get('fp32', '?')} (fp32)."  # type: ignore[union-attr]
        )
    pt = []
    for name in ORDER:
        s = sums.get(name)
        if s is not None and s.get("pt_gap"):
            gaps = s["pt_gap"]  # type: ignore[assignment]
            pt.append(f"{name} {_signed(min(gaps.values()))} to {_signed(max(gaps.values()))}")
    if pt:
        out.append(
            "- Per-tensor data-free lambdas minus per-task data-free lambda (test points, over"
            " formats): " + "; ".join(pt) + "."
        )
    gain_txt = []
    for name in ORDER:
        s = sums.get(name)
        if s is None or not s.get("gains"):
            continue
        g = s["gains"]  # type: ignore[assignment]
        gain_txt.append(
            f"{name} "
            + ", ".join(
                f"{f} {v[0]:g} ({_signed(v[1] - v[2])} on test vs {NOISE_GAIN:g})"
                for f, v in g.items()  # type: ignore[union-attr]
            )
        )
    if gain_txt:
        out.append("- Best NOISE_GAIN on validation: " + "; ".join(gain_txt) + ".")
        pooled: dict[str, list[float]] = {}
        for s in sums.values():
            for d in s.get("gain_val", {}).values():  # type: ignore[union-attr]
                for g, v in d.items():
                    pooled.setdefault(g, []).append(v)
        n_max = max(len(v) for v in pooled.values())
        common = {g: mean(v) for g, v in pooled.items() if len(v) == n_max}
        best = max(common, key=lambda g: common[g])
        out.append(
            f"- Pooled over every suite and format above ({n_max} validation curves), the"
            f" best gain is **{float(best):g}** (mean val {_pct(common[best])}% against"
            f" {_pct(common.get(str(NOISE_GAIN), float('nan')))}% at {NOISE_GAIN:g})."
        )
    cheap = _cheapest_safe_format(sums)
    if cheap is not None:
        out.append(
            f"- Cheapest superposition format within 0.5 points of fp32 (data-free lambda)"
            f" on every suite above: **{cheap}**."
        )
    for name in ORDER:
        s = sums.get(name)
        if s is None or "capacity" not in s:
            continue
        caps = [c for c in s["capacity"] if c["members"] >= 2]  # type: ignore[union-attr]
        for c in caps:
            if c["limit"] != DEFAULT_MAX_INTERFERENCE and c["members"] != 2:
                continue
            a = c["at_least"]
            n = c["nearest"]
            beats = c["test"] > a[2] and c["test"] > n[2]
            if a[0] == n[0]:
                versus = f"ONE bundle at {n[0]} ({n[1]:.2f}x) {_pct(n[2])}%"
            else:
                versus = (
                    f"ONE bundle at {n[0]} ({n[1]:.2f}x) {_pct(n[2])}% and at {a[0]}"
                    f" ({a[1]:.2f}x) {_pct(a[2])}%"
                )
            if a[1] < c["x"]:
                versus += " (no single-bundle format costs as much as the group)"
            out.append(
                f"- Bundle group on {name} at limit {c['limit']:g}: {c['members']} members at"
                f" {SERVING}, {c['x']:.2f}x, {_pct(c['test'])}% vs {versus}: the group"
                f" {'beats' if beats else 'does not beat'} the single bundle."
            )
        wins = sum(c["test"] > c["nearest"][2] for c in caps)
        out.append(
            f"- On {name} the group beats the single bundle of nearest bytes at {wins} of"
            f" {len(caps)} limits that split the tasks."
        )
        if "calibrated" in s:
            cal = s["calibrated"]
            checks = [
                f"{other}: {c['members']} members, {c['x']:.2f}x, {_pct(c['test'])}% test"
                f" ({_pct(c['val'])}% val)"
                for other, o in sums.items()
                if other != name
                for c in o.get("capacity", [])  # type: ignore[attr-defined]
                if c["limit"] == cal
            ]
            out.append(
                f"- Planner limit calibrated on {name} (largest limit whose group keeps"
                f" {_pct(CALIBRATION_TARGET)}% mean val): **{cal:g}**"
                f" (DEFAULT_MAX_INTERFERENCE is {DEFAULT_MAX_INTERFERENCE:g}). At that limit: "
                + "; ".join(checks)
                + "."
            )
    out.append("")
    return out


def _cheapest_safe_format(sums: Mapping[str, Mapping[str, object]]) -> str | None:
    ok: dict[str, float] = {}
    for f, fmt in FORMATS.items():
        diffs = []
        for s in sums.values():
            accs: Mapping[str, float] = s.get("fp32_df", {})  # type: ignore[assignment]
            if f in accs and "fp32" in accs:
                diffs.append(accs["fp32"] - accs[f])
        if diffs and max(diffs) <= 0.005:
            ok[f] = fmt.bits((64, 64))
    return min(ok, key=lambda f: ok[f]) if ok else None


def compose_section(command: str, wall: float) -> str:
    blocks, sums = {}, {}
    for name in ORDER:
        f = OUT / f"{name}.json"
        if f.exists():
            data = json.loads(f.read_text())
            if data.get("constants") != CONSTANTS:
                print(f"{f}: computed with other constants, not reused", flush=True)
                continue
            blocks[name] = data["block"]
            sums[name] = data["summary"]
    lines = [
        SECTION,
        "",
        f"Measured {DATE} on a {MACHINE}. Command (last run; each suite's own command and"
        " time are under its heading):",
        "",
        "```",
        command,
        "```",
        "",
        f"Last run: {wall:.0f} s wall. Total bytes = fp32 base + superposition in its serving"
        ' format + private tensors (task heads; rank-1 tensors under `rank1="private"`),'
        " tensor payloads only: safetensors headers and manifests are excluded. Quantized"
        " formats are `randes.quantize` applied to every slot of the folded fp32"
        " superposition (`fake_quantize`: exactly what a serving artifact decodes to); bf16"
        " is a round trip of the same master. Task arithmetic stores one merged fp32 model"
        " (it needs no base), or the base plus its merged delta quantized. BitDelta is the"
        " data-free initialization (sign bits + one fp32 scale, mean |delta|, per task and"
        " matrix; no distillation) with the same private tensors as RanDeS. Every fixed"
        " lambda is chosen on the validation split and reported on test; the data-free"
        " lambda (`randes.scaling.data_free_scale`, NOISE_GAIN"
        f" {NOISE_GAIN:g}) uses stored norms only. Lambdas are applied rounded to 3"
        " decimals. Normalized accuracy = retrieved test accuracy / fine-tuned test"
        " accuracy, mean over tasks; the worst task is named.",
        "",
    ]
    if "minilm" not in blocks:
        lines += [
            "MiniLM suite: not run yet (`--suite minilm` needs `benchmarks/minilm_suite.py`).",
            "",
        ]
    lines += findings(sums)
    for name in ORDER:
        if name in blocks:
            lines += blocks[name]
            if name in ("digits-8", "minilm"):
                img = f"storage_frontier_{'digits' if name == 'digits-8' else 'minilm'}.png"
                lines += [f"![quality against storage, {name}](img/{img})", ""]
    return "\n".join(lines)


def _save(res: SuiteResult, command: str, calibrated: float | None = None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    data = {
        "constants": CONSTANTS,
        "block": suite_block(res, command, calibrated),
        "summary": summarize(res, calibrated),
    }
    (OUT / f"{res.suite.name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(data["block"]), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--suite", choices=("digits", "minilm", "all"), default="digits")
    ap.add_argument("--quick", action="store_true", help="fewer formats and lambdas; prints only")
    ap.add_argument("--no-large", action="store_true", help="skip the large-delta digits suite")
    ap.add_argument("--retrain", action="store_true", help="ignore cached models")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs/benchmarks.md")
    ap.add_argument("--img-dir", type=Path, default=ROOT / "docs/img")
    ap.add_argument("--no-write", action="store_true", help="print, write no docs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks import storage_suites as ss

    log = Log()
    t0 = time.perf_counter()
    command = ".venv/bin/python -m benchmarks.quality_storage --suite " + args.suite
    command += " --quick" if args.quick else ""
    command += " --no-large" if args.no_large else ""
    command += f" --threads {args.threads}" if args.threads != 1 else ""
    main_plan = QUICK if args.quick else Plan()
    side_plan = QUICK if args.quick else LAMBDA_ONLY
    write = not (args.quick or args.no_write)
    results: dict[str, SuiteResult] = {}
    with tempfile.TemporaryDirectory(prefix="randes-storage-") as tmp:
        work = Path(tmp)
        if args.suite in ("digits", "all"):
            s8 = ss.digits(8, retrain=args.retrain)
            res8, m8, f8, ev8 = run_suite(s8, main_plan, work / "d8", log)
            run_capacity(res8, m8, f8, ev8, LIMITS, work / "d8c", log)
            if not args.quick:
                run_budget(res8, m8, f8, ev8, work / "d8b", log)
            results[s8.name] = res8
            s13 = ss.digits(13, retrain=args.retrain)
            res13, m13, f13, ev13 = run_suite(s13, side_plan, work / "d13", log)
            run_capacity(res13, m13, f13, ev13, LIMITS, work / "d13c", log)
            cal = calibrate(res13.capacity)
            results[s13.name] = res13
            if write:
                _save(res8, command)
                _save(res13, command, cal)
            if not args.no_large:
                t_train = time.perf_counter()
                sl = ss.digits(8, large=True, retrain=args.retrain)
                log(f"large-delta models ready in {time.perf_counter() - t_train:.0f}s")
                resl, ml, fl, evl = run_suite(sl, side_plan, work / "dl", log)
                run_capacity(resl, ml, fl, evl, LIMITS, work / "dlc", log)
                results[sl.name] = resl
                if write:
                    _save(resl, command)
        if args.suite in ("minilm", "all"):
            if not ss.minilm_available():
                log("benchmarks/minilm_suite.py not found: MiniLM suite skipped")
            else:
                sm = ss.minilm()
                resm, *_ = run_suite(sm, QUICK if args.quick else MINILM_PLAN, work / "mm", log)
                results[sm.name] = resm
                if write:
                    _save(resm, command)
    wall = time.perf_counter() - t0
    log(f"done in {wall:.0f}s (load average {os.getloadavg()[0]:.1f})")
    if not write:
        for res in results.values():
            print("\n".join(suite_block(res, command)))
        return 0
    digits_panels = [results[n] for n in ORDER if n.startswith("digits") and n in results]
    if digits_panels:
        plot(digits_panels, args.img_dir / "storage_frontier_digits.png")
    if "minilm" in results:
        plot([results["minilm"]], args.img_dir / "storage_frontier_minilm.png")
    section = compose_section(command, wall)
    write_section(args.doc, section, after="## Quality beyond 8 tasks")
    print(f"wrote {args.doc} ({SECTION})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
