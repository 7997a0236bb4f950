"""The per-suite summary and the findings read across suites (quality against storage)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.quality_storage import (
    BUDGET_X,
    CALIBRATION_TARGET,
    SuiteResult,
    _lam_range,
    _pct,
    _signed,
)
from benchmarks.quality_storage_blocks import default_row
from benchmarks.storage_core import (
    FORMATS,
    SERVING,
)
from benchmarks.storage_eval import mean
from randes.capacity import DEFAULT_MAX_INTERFERENCE
from randes.scaling import NOISE_GAIN


def summarize(res: SuiteResult, calibrated: float | None = None) -> dict[str, Any]:
    """The numbers the section's findings are written from (kept per suite on disk)."""
    d = default_row(res)
    out: dict[str, Any] = {"name": res.suite.name, "seconds": res.seconds}
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


def findings(sums: Mapping[str, Mapping[str, Any]]) -> list[str]:
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


def _cheapest_safe_format(sums: Mapping[str, Mapping[str, Any]]) -> str | None:
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
