"""The "Quality by map" page, from a stored quality_maps result (benchmarks.quality_maps_suite).

Everything said is computed from the measured numbers (benchmarks.quality_maps), and the
constants the code uses (randes.scaling.NOISE_GAINS, randes.capacity.MAX_INTERFERENCE,
randes.config.DEFAULT_MAP) are checked against what the numbers select, so a rerun on
other models cannot leave a stale claim behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.quality_maps import (
    CALIBRATION_TARGET,
    GAINS,
    SEED_SETS,
    SUITES,
    _sd,
    choose_gain,
    fit_gains,
)
from benchmarks.storage_eval import mean
from randes.capacity import MAX_INTERFERENCE
from randes.config import DEFAULT_MAP, MAPS, TransformConfig
from randes.scaling import NOISE_GAINS

BUDGET_X = 1.25
REALISTIC = ("minilm",)
"""Suites with realistic (~1%) fine-tune deltas."""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ms(xs: Sequence[float]) -> str:
    return f"{100 * mean(xs):.1f} ± {100 * _sd(xs):.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _gain_of(variant: str) -> float:
    kind = variant.split(",")[0]
    return NOISE_GAINS[kind]  # type: ignore[index]


def summarize(res: Mapping[str, Any], variant: str) -> dict[str, Any]:
    v = res["variants"][variant]
    g = str(_gain_of(variant))
    sets = v["sets"]
    best = [mean(s["test_best"]) for s in sets]
    free = [mean(s["gain_test"][g]) for s in sets] if g in sets[0]["gain_test"] else []
    lams = [lam for s in sets for lam in s["gain_lams"].get(g, {}).values()]
    return {
        "best_lam": v["best_lam"],
        "best": best,
        "free": free,
        "lam_lo": min(lams) if lams else float("nan"),
        "lam_hi": max(lams) if lams else float("nan"),
        "x_base": v["total_bytes"] / v["base_bytes"],
        "r": mean([mean(list(s["r"].values())) for s in sets]),
        "worst_task": min((mean([s["gain_test"][g][t] for s in sets]), t) for t in res["tasks"])
        if free
        else (float("nan"), "-"),
    }


def report(results: Mapping[str, Any], cap: Mapping[str, Any] | None, n_sets: int) -> str:
    """The page from the measured suites (``results``) and the capacity run (``cap``)."""
    if not results:
        return "No suite measured."
    missing = [n for n in SUITES if n not in results]
    curves = fit_gains(results)
    lines: list[str] = []
    lines += [
        "Protocol (`benchmarks/quality_maps.py` docstring): each suite folded through"
        f" `randes.fold` with {n_sets} sets of task seeds per variant, served int4-g64"
        " (what `pull` / `materialize` serve), retrieved through `randes.retrieve`. Normalized"
        " accuracy = retrieved / fine-tuned accuracy, mean over the suite's tasks; **mean ±"
        " sd over the seed sets** (the models and the images are the same, only the random"
        " maps change). Best fixed lambda: one grid lambda per suite and variant, chosen on"
        " the VALIDATION mean over the seed sets, reported on test. Data-free lambda:"
        " `1/(1 + gain r_t)` from stored norms only, with the map's gain"
        " (`randes.scaling.NOISE_GAINS`). Bytes: fp32 base + int4-g64 superposition + private"
        " tensors (tensor payloads), as a multiple of the fp32 base."
        + (f" Not measured: {', '.join(missing)}." if missing else ""),
        "",
    ]
    lines += [
        "Why maps differ: fine-tune deltas are close to low rank, with dominant directions"
        " often shared between tasks. Column flips (`columns`, the paper's) keep a delta's row"
        " structure, so task t hears the others' cross-talk in the very output directions its"
        " own delta uses; `two-sided` (a sign per row and per column) and `elementwise` (a"
        " sign per entry) scramble both sides and make the cross-talk incoherent noise, at"
        " the same storage (a seed per task).",
        "",
    ]
    # ---- main table
    rows = []
    summ: dict[tuple[str, str], dict[str, Any]] = {}
    for name, res in results.items():
        for variant in res["variants"]:
            s = summarize(res, variant)
            summ[(name, variant)] = s
            gap = (mean(s["free"]) - mean(s["best"])) if s["free"] else float("nan")
            rows.append(
                [
                    name,
                    f"`{variant}`" + (" **(default)**" if variant == DEFAULT_MAP else ""),
                    f"{s['best_lam']:g}",
                    _ms(s["best"]),
                    f"{_gain_of(variant):g}: {s['lam_lo']:.2f}-{s['lam_hi']:.2f}",
                    _ms(s["free"]) if s["free"] else "-",
                    f"{100 * gap:+.1f}",
                    f"{s['x_base']:.3f}",
                    f"{100 * s['worst_task'][0]:.1f} (`{s['worst_task'][1]}`)",
                ]
            )
    lines += [
        "### Every map x every suite: normalized test accuracy %, mean ± sd over seed sets",
        "",
        *_table(
            [
                "suite",
                "variant (map; rank1 flip unless named)",
                "best fixed lambda (val)",
                "at best fixed lambda",
                "data-free: gain, lambdas",
                "at data-free lambda",
                "data-free - best (points)",
                "x fp32 base",
                "worst task, data-free",
            ],
            rows,
        ),
        "",
    ]
    for name, res in results.items():
        lines.append(
            f"- `{name}`: {res['description']}; {res['evals']} task evaluations,"
            f" {res['seconds']} s."
        )
    lines.append("")
    # ---- gains
    grows = []
    chosen: dict[str, float] = {}
    for variant, curve in curves.items():
        pick = choose_gain(curve, _gain_of(variant))
        chosen[variant] = pick
        grows.append(
            [f"`{variant}`"]
            + [(f"**{_pct(curve[str(g)])}**" if g == pick else _pct(curve[str(g)])) for g in GAINS]
            + [f"{_gain_of(variant):g}"]
        )
    lines += [
        "### Data-free gain per map (validation only)",
        "",
        "Mean normalized VALIDATION accuracy % at the data-free lambda 1/(1 + gain r_t),"
        " mean over seed sets, then over the suites measured (each suite weighs the same);"
        " best in bold (ties within 0.01 points: nearest the constant in use).",
        "",
        *_table(["variant", *(f"gain {g:g}" for g in GAINS), "NOISE_GAINS"], grows),
        "",
    ]
    # ---- findings
    lines += ["**Findings** (computed from the tables above).", ""]
    means = {v: mean([mean(summ[(n, v)]["free"]) for n in results if (n, v) in summ]) for v in MAPS}
    best_map = max(means, key=lambda v: means[v])
    lines.append(
        "- Mean over the suites at the data-free lambda: "
        + ", ".join(f"`{v}` {_pct(m)}%" for v, m in means.items())
        + f". Best: `{best_map}`; the default map (`randes.config.DEFAULT_MAP`) is"
        f" `{DEFAULT_MAP}`" + (" (agrees)." if best_map == DEFAULT_MAP else " (DISAGREES).")
    )
    for name in results:
        per = {v: mean(summ[(name, v)]["free"]) for v in MAPS if (name, v) in summ}
        lines.append(
            f"- `{name}`: "
            + ", ".join(f"`{v}` {_pct(m)}" for v, m in per.items())
            + f"; seed-set sd of the default {100 * _sd(summ[(name, DEFAULT_MAP)]['free']):.1f}"
            f" points (columns {100 * _sd(summ[(name, 'columns')]['free']):.1f})."
        )
    sds = {n: _sd(summ[(n, DEFAULT_MAP)]["free"]) for n in results}
    worst_sd = max(sds.values())
    lines.append(
        f"- Seed variance of the default: sd over {len(SEED_SETS)} seed sets at most"
        f" {100 * worst_sd:.1f} points ("
        + ", ".join(f"{n} {100 * v:.1f}" for n, v in sds.items())
        + ")"
        + (
            ": under 2 points on every suite, so no candidate-seed search at fold time is needed."
            if worst_sd < 0.02
            else ": above 2 points somewhere: a candidate-seed search at fold time may pay."
        )
    )
    large = "digits-8-large"
    if large in results:
        s = summ[(large, DEFAULT_MAP)]
        ok = mean(s["free"]) >= 0.80 and s["x_base"] <= BUDGET_X
        lines.append(
            f"- Large-delta suite, project default (`TransformConfig()`, data-free lambda, int4"
            f" serving): **{_pct(mean(s['free']))}%** mean over seed sets (range"
            f" {_pct(min(s['free']))}-{_pct(max(s['free']))}) at {s['x_base']:.3f}x the fp32"
            f" base: >= 80% within {BUDGET_X}x: **{'yes' if ok else 'no'}**."
        )
    for name in REALISTIC:
        if name in results:
            s = summ[(name, DEFAULT_MAP)]
            lines.append(
                f"- Realistic deltas (`{name}`), default: {_pct(mean(s['free']))}% (min over"
                f" seed sets {_pct(min(s['free']))}): >= 99%:"
                f" **{'yes' if mean(s['free']) >= 0.99 else 'no'}**."
            )
    gaps = {
        n: mean(summ[(n, DEFAULT_MAP)]["free"]) - mean(summ[(n, DEFAULT_MAP)]["best"])
        for n in results
    }
    lines.append(
        "- Default map, data-free minus best fixed lambda: "
        + ", ".join(f"{n} {100 * g:+.1f}" for n, g in gaps.items())
        + " points; within 1.5 points on every suite:"
        + f" **{'yes' if min(gaps.values()) >= -0.015 else 'no'}**."
    )
    for variant, pick in chosen.items():
        if abs(pick - _gain_of(variant)) > 1e-9:
            note = (
                " (kept: bundles of this map exist, their lambdas must not change)"
                if variant == "columns"
                else " (gains are per map, and this rank-1 policy is not the default)"
                if "rank1=" in variant
                else " (NOT what the code uses)"
            )
            lines.append(
                f"- `{variant}`: the pooled validation curve picks gain {pick:g}, the code"
                f" uses {_gain_of(variant):g}{note}."
            )
    if f"{DEFAULT_MAP}, rank1=private" in next(iter(results.values()))["variants"] or any(
        f"{DEFAULT_MAP}, rank1=private" in r["variants"] for r in results.values()
    ):
        for name, res in results.items():
            key = f"{DEFAULT_MAP}, rank1=private"
            if key in res["variants"]:
                p, f = summ[(name, key)], summ[(name, DEFAULT_MAP)]
                lines.append(
                    f"- rank-1 policy on `{name}` (`{DEFAULT_MAP}`): flip {_ms(f['free'])} at"
                    f" {f['x_base']:.3f}x vs private {_ms(p['free'])} at {p['x_base']:.3f}x."
                )
    lines.append("")
    # ---- capacity
    if cap is not None:
        lines += [
            f"### Bundle groups: capacity limit of the default map (`{cap['config']['map']}`)",
            "",
            "`randes.capacity.place` over the tasks in order at each limit on r_t, each member"
            " folded separately, int4-g64, data-free lambda within its member (first seed set)."
            " Calibration: the largest limit whose digits-13 group keeps"
            f" {100 * CALIBRATION_TARGET:.0f}%"
            " mean normalized VALIDATION accuracy; digits-8 and the large-delta suite check it.",
            "",
        ]
        crow = []
        for name, rows_ in cap["suites"].items():
            for r in rows_:
                crow.append(
                    [
                        name,
                        f"{r['limit']:g}",
                        str(len(r["members"])),
                        f"{r['x_base']:.2f}",
                        _pct(r["val"]),
                        _pct(r["test"]),
                    ]
                )
        lines += _table(["suite", "limit", "members", "x base", "val %", "test %"], crow)
        cal = cap["suites"].get("digits-13", [])
        ok = [r["limit"] for r in cal if r["val"] >= CALIBRATION_TARGET]
        limit = max(ok) if ok else min(r["limit"] for r in cal)
        lines += [
            "",
            f"Calibrated limit: **{limit:g}** (`randes.capacity.MAX_INTERFERENCE[{DEFAULT_MAP!r}]`"
            f" is {MAX_INTERFERENCE[DEFAULT_MAP]:g}"
            + (")." if abs(limit - MAX_INTERFERENCE[DEFAULT_MAP]) < 1e-12 else ": DIFFERS)."),
            "",
        ]
    assert TransformConfig().map == DEFAULT_MAP
    return "\n".join(lines)
