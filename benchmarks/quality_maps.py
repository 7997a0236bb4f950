"""Quality by map: every sign map x every suite, over several seed sets.

    .venv/bin/python -m benchmarks run quality_maps                     # every suite + capacity
    .venv/bin/python -m benchmarks run quality_maps --suite digits-8    # one suite
    .venv/bin/python -m benchmarks run quality_maps --quick             # digits-8, one seed set

Question answered: which sign map (randes.config.MapName) should a new bundle use, what
gain should its data-free lambda have, and how much do the seeds alone move the result?

Protocol, per suite (digits 8 and 13 tasks, the large-delta digits suite, MiniLM) and
per variant (each map, with the rank-1 policy of the default config; plus the default
map with rank1="private", the previous default policy): the suite's tasks are folded
through the real randes.fold with each of SEED_SETS' task seeds, served in the default
format (int4-g64: what `randes pull` / `materialize` serve), and every task retrieved
through randes.retrieve. Normalized accuracy = retrieved accuracy / fine-tuned accuracy.

- best fixed lambda: the grid lambda with the best VALIDATION mean over all seed sets
  (one lambda per suite and variant), reported on test, mean +- sd over seed sets;
- data-free lambda: randes.scaling's 1/(1 + gain r_t) from stored norms only, at each
  gain of GAINS on val and test; the gain of each map is the one with the best val mean
  pooled over the suites (each suite weighs the same), and the test numbers at that
  gain are the ones reported.
- total bytes: fp32 base + int4-g64 superposition + private tensors (tensor payloads).

The raw numbers go to the result file (benchmarks/results/); the page is rendered by
benchmarks.quality_maps_report from them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from benchmarks.quality import SEED_SETS as BASE_SEED_SETS
from benchmarks.storage_core import (
    FORMATS,
    SERVING,
    Folded,
    Models,
    RandesGroup,
    StorageSuite,
    fold_bundle,
    load_models,
)
from benchmarks.storage_eval import Evaluator, mean
from randes.config import MAPS, TransformConfig

SEED_SETS: tuple[tuple[int, ...], ...] = (
    *BASE_SEED_SETS,
    (17, 19, 29, 31, 43, 47, 59, 61, 71, 73, 89, 113, 127),
    (5001, 5011, 5021, 5023, 5039, 5051, 5059, 5077, 5081, 5087, 5099, 5101, 5107),
)
"""Five sets of task seeds (the first three are benchmarks.quality's)."""
GRID = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
MINILM_GRID = (0.8, 0.9, 1.0, 1.1)
"""MiniLM evaluations cost ~15x the digits ones; its deltas are ~1%, lambda ~1."""
GAINS = (0.0, 0.25, 0.5, 1.0, 1.5)
DEFAULT = TransformConfig()


PRIVATE_SUITES = ("digits-8", "digits-8-large")
"""Suites that also measure the default map with rank1="private" (the previous default
policy): the small digits ViT is where its bytes matter (its rank-1 tensors are 0.16x
of the base, the budget is 0.25x)."""


def variants(suite: str) -> dict[str, TransformConfig]:
    """Each map with the default rank-1 policy (and the default map with rank1="private"
    on PRIVATE_SUITES)."""
    out: dict[str, TransformConfig] = {m: TransformConfig(map=m) for m in MAPS}
    if DEFAULT.rank1 != "private" and suite in PRIVATE_SUITES:
        out[f"{DEFAULT.map}, rank1=private"] = TransformConfig(rank1="private")
    return out


def load_suite(name: str, quick: bool = False) -> StorageSuite:
    from benchmarks import storage_suites as ss

    makers: dict[str, Callable[[], StorageSuite]] = {
        "digits-8": lambda: ss.digits(8, quick=quick),
        "digits-13": lambda: ss.digits(13),
        "digits-8-large": lambda: ss.digits(8, large=True),
        "minilm": ss.minilm,
    }
    return makers[name]()


SUITES = ("digits-8", "digits-13", "digits-8-large", "minilm")


def with_seeds(suite: StorageSuite, j: int) -> StorageSuite:
    seeds = {t: SEED_SETS[j][i] for i, t in enumerate(suite.tasks)}
    return dataclasses.replace(suite, seeds=seeds)


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] quality_maps: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- one suite


def run_suite(name: str, n_sets: int, work: Path, quick: bool = False) -> dict[str, object]:
    suite = load_suite(name, quick)
    tasks = suite.tasks
    grid = MINILM_GRID if name == "minilm" else GRID
    ev = Evaluator(suite)
    t0 = time.perf_counter()
    result: dict[str, object] = {
        "suite": name,
        "description": suite.description,
        "tasks": tasks,
        "grid": list(grid),
        "gains": list(GAINS),
        "sets": n_sets,
        "variants": {},
    }
    models: Models | None = None
    for variant, cfg in variants(name).items():
        groups: list[RandesGroup] = []
        folds: list[Folded] = []
        for j in range(n_sets):
            folded = fold_bundle(with_seeds(suite, j), tasks, cfg, work / f"{variant}-{j}")
            if models is None or models.config != cfg:
                models = load_models(suite, cfg, folded)
            folds.append(folded)
            groups.append(RandesGroup(models, [folded], FORMATS[SERVING], label=f"{variant}/{j}"))
        per_set: list[dict[str, object]] = []
        for g in groups:
            val = {str(lam): ev.point(g, dict.fromkeys(tasks, lam), "val", tasks) for lam in grid}
            lams = {str(k): {t: round(g.data_free(t, k), 3) for t in tasks} for k in GAINS}
            per_set.append(
                {
                    "val": val,
                    "gain_lams": lams,
                    "gain_val": {k: ev.point(g, v, "val", tasks) for k, v in lams.items()},
                    "gain_test": {k: ev.point(g, v, "test", tasks) for k, v in lams.items()},
                    "r": {t: g.interference(t) for t in tasks},
                }
            )
            log(f"{name}: {variant} set {len(per_set)}: val done [{ev.evals} evals]")
        best = max(
            grid,
            key=lambda lam: (
                round(mean([mean(s["val"][str(lam)]) for s in per_set]), 9),  # type: ignore[index]
                -abs(lam - 1.0),
            ),
        )
        for g, s in zip(groups, per_set, strict=True):
            s["test_best"] = ev.point(g, dict.fromkeys(tasks, best), "test", tasks)
        bytes_ = groups[0].total_bytes()
        result["variants"][variant] = {  # type: ignore[index]
            "config": cfg.model_dump(mode="json"),
            "best_lam": best,
            "sets": per_set,
            "total_bytes": bytes_,
            "base_bytes": groups[0].models.base_bytes,
            "fold_s": mean([f.fold_s for f in folds]),
        }
        x_base = bytes_ / groups[0].models.base_bytes
        log(f"{name}: {variant}: best fixed lambda {best:g}, {x_base:.3f}x base")
        del groups, folds
    result["evals"] = ev.evals
    result["seconds"] = round(time.perf_counter() - t0)
    return result


# --------------------------------------------------------------------------- capacity

LIMITS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2)
CALIBRATION_TARGET = 0.98


def run_capacity(work: Path) -> dict[str, object]:
    """Group limit of the default map: randes.capacity.place at each limit on digits-13
    (calibration: the largest limit keeping 98% mean val), checked on digits-8 and the
    large-delta suite; members folded separately, int4-g64, data-free lambda."""
    from benchmarks.quality_storage import plan_groups

    out: dict[str, object] = {"config": DEFAULT.model_dump(mode="json"), "suites": {}}
    for name in ("digits-13", "digits-8", "digits-8-large"):
        suite = load_suite(name)
        tasks = suite.tasks
        ev = Evaluator(suite)
        single = fold_bundle(suite, tasks, DEFAULT, work / f"cap-{name}")
        models = load_models(suite, DEFAULT, single)
        folds: dict[tuple[str, ...], Folded] = {tuple(tasks): single}
        rows = []
        for limit in LIMITS:
            members = plan_groups(single, models, tasks, limit)
            for m in members:
                if tuple(m) not in folds:
                    folds[tuple(m)] = fold_bundle(suite, m, DEFAULT, work / f"m{len(folds)}")
            g = RandesGroup(
                models, [folds[tuple(m)] for m in members], FORMATS[SERVING], label="cap"
            )
            lams = {t: g.data_free(t) for t in tasks}
            row = {
                "limit": limit,
                "members": members,
                "x_base": g.total_bytes() / models.base_bytes,
                "val": mean(ev.point(g, lams, "val", tasks)),
                "test": mean(ev.point(g, lams, "test", tasks)),
            }
            rows.append(row)
            log(f"capacity {name} limit {limit:g}: {len(members)} members, val {row['val']:.3f}")
        out["suites"][name] = rows  # type: ignore[index]
    return out


# --------------------------------------------------------------------------- report


def _sd(xs: Sequence[float]) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def _ms(xs: Sequence[float]) -> str:
    return f"{100 * mean(xs):.1f} ± {100 * _sd(xs):.1f}"


def fit_gains(results: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, float]]:
    """Per variant: gain -> val mean pooled over suites (each suite weighs the same)."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for res in results.values():
        for variant, v in res["variants"].items():  # type: ignore[attr-defined]
            for k in map(str, GAINS):
                vals = [mean(s["gain_val"][k]) for s in v["sets"]]
                pooled.setdefault(variant, {}).setdefault(k, []).append(mean(vals))
    return {var: {k: mean(xs) for k, xs in d.items()} for var, d in pooled.items()}


def choose_gain(curve: Mapping[str, float], prefer: float) -> float:
    """Best pooled val gain; ties (to 1e-4) go to the one nearest ``prefer``."""
    return float(max(curve, key=lambda k: (round(curve[k], 4), -abs(float(k) - prefer))))
