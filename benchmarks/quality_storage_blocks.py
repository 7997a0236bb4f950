"""Markdown tables and the frontier figure of the quality-against-storage suite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.quality_storage import (
    BUDGET_X,
    CALIBRATION_TARGET,
    Row,
    SuiteResult,
    _lam_range,
    _pct,
    _signed,
)
from benchmarks.storage_core import (
    SERVING,
)
from benchmarks.storage_eval import mean
from randes.capacity import DEFAULT_MAX_INTERFERENCE
from randes.scaling import NOISE_GAIN


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


def _edge(lam: float, info: Mapping[str, Any]) -> str:
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
