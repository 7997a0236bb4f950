"""Quality benchmark: RanDeS against task arithmetic on 8 real fine-tunes.

    .venv/bin/python -m benchmarks.quality            # full run, writes docs/
    .venv/bin/python -m benchmarks.quality --quick    # smaller grids, prints only
    .venv/bin/python -m benchmarks.quality --storage  # quality against storage (see
                                                      # benchmarks/quality_storage.py)

Normalized accuracy = accuracy(retrieved model) / accuracy(fine-tuned model), on each
task's held-out TEST split. Every scale lambda that is "tuned" (task arithmetic's, the
best RanDeS lambda) is chosen on the VALIDATION split and then reported on test, so
no number below is selected on the data it is reported on. The project default
(TransformConfig() + the data-free lambda per task of randes.scaling.data_free_scale,
from stored norms only) is never tuned at all.

RanDeS goes through the real core (randes.fold / randes.retrieve, files on disk,
the same code path as `randes fold` / `randes materialize`); task arithmetic is the
textbook baseline computed in memory: theta_base + lambda * sum_t delta_t, each task
keeping its own head (the base has none), exactly as RanDeS keeps it private.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python benchmarks/quality.py` as well as `-m`
    sys.path.insert(0, str(ROOT))

from flows.digits.data import ALL_TASKS, TASKS, get_task, task_split  # noqa: E402
from flows.digits.evaluator import evaluate  # noqa: E402
from flows.digits.model import WEIGHTS_FILE, load_state_dict  # noqa: E402
from flows.digits.train import Recipe, build_models, relative_delta_norm  # noqa: E402
from randes.checkpoint import CheckpointReader  # noqa: E402
from randes.config import TransformConfig  # noqa: E402
from randes.fold import FoldResult, fold, l2_norm, layout_of  # noqa: E402
from randes.retrieve import retrieve  # noqa: E402
from randes.scaling import NOISE_GAIN, data_free_scale  # noqa: E402

DATE = "2026-11-26"
MACHINE = "2-core CPU, 24 GiB RAM, torch 2.13 CPU"
SEEDS: tuple[int, ...] = (11, 23, 37, 41, 53, 67, 79, 83, 97, 101, 103, 107, 109)
"""RanDeS task seeds, one per task in fold order (distinct, fixed: reproducible bundles)."""
SEED_SETS: tuple[tuple[int, ...], ...] = (
    SEEDS,
    (1009, 2003, 3001, 4001, 5003, 6007, 7001, 8009, 9001, 10007, 11003, 12007, 13001),
    (424242, 8675309, 31337, 271828, 314159, 161803, 141421, 173205, 223606, 99991, 7, 5, 3),
)
"""Seed sets of the robustness tables: the cross-talk a task sees depends on the seeds,
so a choice between close variants (rank-1 policy, lambda) is read off their mean."""
ROBUST_LAMBDAS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
ROBUST_RANK1_LAMBDAS = (0.8, 0.9, 1.0)

TA_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)
RD_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)
QUICK_TA_GRID = (0.1, 0.2, 0.3, 0.5, 1.0)
QUICK_RD_GRID = (0.4, 0.6, 0.8, 1.0)
HEAD = ("head.weight", "head.bias")
DEFAULT_CONFIG = TransformConfig()


def _variants() -> dict[str, TransformConfig]:
    """The RanDeS configurations compared; the project default is whichever equals it."""
    return {
        "flip + shuffle, rank1=flip": TransformConfig(rank1="flip"),
        "flip + shuffle, rank1=plain": TransformConfig(rank1="plain"),
        "flip + shuffle, rank1=private": TransformConfig(rank1="private"),
        "flip only, rank1=" + DEFAULT_CONFIG.rank1: TransformConfig(layer_shuffle=False),
        "shuffle only, rank1=" + DEFAULT_CONFIG.rank1: TransformConfig(sign_flip=False),
    }


def default_variant() -> str:
    for name, cfg in _variants().items():
        if cfg == DEFAULT_CONFIG:
            return name
    raise RuntimeError("the project's default TransformConfig is not among the variants")


# --------------------------------------------------------------------------- models


@dataclass
class Suite:
    """Base + fine-tunes on disk and in memory, with the reference accuracies."""

    base_dir: Path
    task_dirs: dict[str, Path]
    base: dict[str, Tensor]
    tuned: dict[str, dict[str, Tensor]]
    ref: dict[str, dict[str, float]]  # split -> task -> fine-tuned accuracy
    rel_delta: dict[str, float]
    train_s: float

    @property
    def tasks(self) -> list[str]:
        return list(self.task_dirs)


def load_suite(models_dir: Path, tasks: Sequence[str], recipe: Recipe, reuse: bool) -> Suite:
    t0 = time.perf_counter()
    base_dir, task_dirs = build_models(models_dir, tasks, recipe, reuse=reuse, log=True)
    train_s = time.perf_counter() - t0
    base = load_state_dict(base_dir)
    tuned = {t: load_state_dict(d) for t, d in task_dirs.items()}
    ref = {
        split: {t: evaluate(tuned[t], t, split)["accuracy"] for t in tasks}
        for split in ("val", "test")
    }
    rel = {t: relative_delta_norm(base, tuned[t]) for t in tasks}
    return Suite(base_dir, task_dirs, base, tuned, ref, rel, train_s)


# --------------------------------------------------------------------------- scoring


Models = dict[str, dict[str, Tensor]]
"""task -> the state dict a method gives back for it."""


class Score:
    """Normalized accuracy of one method's models for k tasks, evaluated lazily per split.

    Evaluation (a forward pass over 360 images per task) dominates the benchmark's time,
    while rebuilding the models (a retrieval or a merge) costs milliseconds; so the models
    are rebuilt on demand and never kept, and a split is evaluated only when a table or a
    selection asks for it.
    """

    def __init__(self, suite: Suite, make: Callable[[], Models]) -> None:
        self.suite = suite
        self.make = make
        self.per_task: dict[str, dict[str, float]] = {}

    def split(self, split: str) -> dict[str, float]:
        if split not in self.per_task:
            out: dict[str, float] = {}
            for task, sd in self.make().items():
                acc = evaluate(sd, task, split)["accuracy"]
                out[task] = acc / self.suite.ref[split][task]
            self.per_task[split] = out
        return self.per_task[split]

    def mean(self, split: str) -> float:
        vals = list(self.split(split).values())
        return sum(vals) / len(vals)


def task_arithmetic(suite: Suite, k: int, lam: float) -> Score:
    """theta_base + lam * sum of the first k deltas; each task evaluated with its own head."""

    def make() -> Models:
        tasks = suite.tasks[:k]
        merged = {
            name: w + lam * sum((suite.tuned[t][name] - w for t in tasks), torch.zeros_like(w))
            for name, w in suite.base.items()
        }
        return {t: {**merged, **{h: suite.tuned[t][h] for h in HEAD}} for t in tasks}

    return Score(suite, make)


def base_with_heads(suite: Suite, k: int) -> Score:
    """The floor: the untouched base with each task's fine-tuned head (lambda = 0)."""

    def make() -> Models:
        heads = {t: {h: suite.tuned[t][h] for h in HEAD} for t in suite.tasks[:k]}
        return {t: {**suite.base, **hd} for t, hd in heads.items()}

    return Score(suite, make)


@dataclass
class Bundle:
    """A RanDeS variant folded task after task: the superposition after each fold."""

    config: TransformConfig
    seeds: tuple[int, ...] = SEEDS
    folds: list[FoldResult] = field(default_factory=list)
    fold_s: float = 0.0

    def superposition(self, k: int) -> CheckpointReader:
        return CheckpointReader.from_files([s.path for s in self.folds[k - 1].superposition])

    def private(self, i: int) -> CheckpointReader | None:
        files = [s.path for s in self.folds[i].private]
        return CheckpointReader.from_files(files) if files else None

    def bytes(self, k: int) -> tuple[int, int]:
        """(superposition bytes, private bytes of the first k tasks), as stored on disk."""
        sup = sum(s.size for s in self.folds[k - 1].superposition)
        priv = sum(s.size for r in self.folds[:k] for s in r.private)
        return sup, priv


def build_bundle(
    suite: Suite, config: TransformConfig, work: Path, seeds: tuple[int, ...] = SEEDS
) -> Bundle:
    """Fold every task in order through randes.fold, parent = the previous superposition."""
    bundle = Bundle(config, seeds)
    t0 = time.perf_counter()
    with CheckpointReader.open(suite.base_dir) as base:
        for i, task in enumerate(suite.tasks):
            parent = bundle.superposition(i) if i else None
            with CheckpointReader.open(suite.task_dirs[task]) as ckpt:
                res = fold(
                    base=base,
                    checkpoint=ckpt,
                    parent=parent,
                    seed=seeds[i],
                    config=config,
                    out_dir=work / f"v{i + 1:02d}",
                )
            if parent is not None:
                parent.close()
            bundle.folds.append(res)
    bundle.fold_s = time.perf_counter() - t0
    return bundle


def randes_score(suite: Suite, bundle: Bundle, k: int, lam: float | Mapping[str, float]) -> Score:
    """Retrieve each of the first k tasks from the k-task superposition at scale lam.

    ``lam`` is one lambda for every task, or a lambda per task (the data-free rule).
    """

    def make() -> Models:
        models: Models = {}
        with CheckpointReader.open(suite.base_dir) as base, bundle.superposition(k) as sup:
            for i, task in enumerate(suite.tasks[:k]):
                private = bundle.private(i)
                try:
                    models[task] = dict(
                        retrieve(
                            base=base,
                            superposition=sup,
                            private=private,
                            seed=bundle.seeds[i],
                            key_map=bundle.folds[i].key_map,
                            config=bundle.config,
                            scale=lam[task] if isinstance(lam, Mapping) else lam,
                        )
                    )
                finally:
                    if private is not None:
                        private.close()
        return models

    return Score(suite, make)


def data_free_lambdas(suite: Suite, bundle: Bundle, k: int) -> dict[str, float]:
    """The project default lambda of each of the first k tasks: randes.scaling's data-free
    rule, from the fold's per-tensor delta norms and the base's per-tensor norms."""
    with CheckpointReader.open(suite.base_dir) as base:
        names = layout_of(base, bundle.config).superposed
        base_norms = {n: l2_norm(base.get(n).to(torch.float32)) for n in names}
    norms = {t: bundle.folds[i].delta_norms for i, t in enumerate(suite.tasks[:k])}
    return {t: data_free_scale(t, norms, base_norms, names) for t in norms}


def lam_text(lams: Mapping[str, float]) -> str:
    """A per-task lambda rule as its range over the tasks."""
    lo, hi = min(lams.values()), max(lams.values())
    return f"{lo:.2f}" if hi - lo < 0.005 else f"{lo:.2f}-{hi:.2f}"


class Sweep:
    """Memoized scores of one method over (k, lambda)."""

    def __init__(self, fn: Callable[[int, float], Score]) -> None:
        self.fn = fn
        self.cache: dict[tuple[int, float], Score] = {}

    def __call__(self, k: int, lam: float) -> Score:
        key = (k, round(lam, 6))
        if key not in self.cache:
            self.cache[key] = self.fn(k, lam)
        return self.cache[key]

    def best(self, k: int, grid: Sequence[float]) -> tuple[float, Score]:
        """The grid lambda with the best VALIDATION mean (ties: the one nearest 1).

        lambda = 1 is the neutral choice for both methods (a lone task comes back exact),
        so when validation cannot tell lambdas apart (one or two easy tasks) it wins.
        """
        lam = max(grid, key=lambda g: (round(self(k, g).mean("val"), 9), -abs(g - 1.0)))
        return lam, self(k, lam)


# --------------------------------------------------------------------------- lambda(n)


def _interp(grid: Sequence[float], values: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation, clamped at the ends."""
    if x <= grid[0]:
        return values[0]
    for i in range(1, len(grid)):
        if x <= grid[i]:
            g0, g1, v0, v1 = grid[i - 1], grid[i], values[i - 1], values[i]
            return v0 + (v1 - v0) * (x - g0) / (g1 - g0)
    return values[-1]


def fit_inverse_law(
    value: Callable[[int, float], float], ks: Sequence[int], grid: Sequence[float]
) -> float:
    """c in [0, 0.2] of lambda(n) = 1 / (1 + c (n - 1)) maximizing the mean of value(n, .).

    Scores between grid points are interpolated, so c is not limited to the grid. The
    law is the optimum of a quadratic loss model: retrieved = base + lam (delta_t + eps),
    eps the decorrelated cross-talk of n-1 other tasks, so the best lam is
    |delta_t|_H^2 / (|delta_t|_H^2 + (n-1) |delta_u|_H^2 rho) = 1 / (1 + c (n-1)).
    """
    curves = {k: [value(k, g) for g in grid] for k in ks}
    best_c, best_v = 0.0, -math.inf
    for step in range(0, 201):
        c = step * 0.001
        v = sum(_interp(grid, curves[k], 1.0 / (1.0 + c * (k - 1))) for k in ks) / len(ks)
        if v > best_v + 1e-12:
            best_c, best_v = c, v
    return best_c


def law(c: float, n: int) -> float:
    return 1.0 / (1.0 + c * (n - 1))


# --------------------------------------------------------------------------- report


def _nbytes(tensors: Mapping[str, Tensor]) -> int:
    """Size of these tensors as one safetensors file (header included)."""
    from safetensors.torch import save

    return len(save({k: v.contiguous() for k, v in tensors.items()}))


def _signed(x: float) -> str:
    """A difference in points, '+0.0' rather than '-0.0'."""
    v = round(100 * x, 1)
    return f"{v + 0.0:+.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def plot(
    path_curve: Path,
    path_lambda: Path,
    ks: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    lam_curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    n_curves: Mapping[int, tuple[Sequence[float], Sequence[float]]],
    law_c: float,
) -> None:
    """quality_curve.png (accuracy over n) and quality_lambda.png (lambda sweeps).

    The right panel of the lambda figure shows, for several task counts n, the seed-set
    mean accuracy against lambda, with the fitted law's lambda(n) marked on each curve:
    that is where the default-lambda recommendation can be checked by eye.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, ys in curves.items():
        ax.plot(ks, [100 * y for y in ys], marker="o", label=label)
    ax.set_xlabel("tasks in the bundle")
    ax.set_ylabel("normalized test accuracy (%)")
    ax.set_title("RanDeS vs task arithmetic, digits ViT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_curve, dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    for label, (xs, ys) in lam_curves.items():
        a1.plot(xs, [100 * y for y in ys], marker=".", label=label)
    a1.set_xlabel("lambda")
    a1.set_ylabel(f"normalized test accuracy (%), {max(ks)} tasks")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=7)
    for k, (xs, ys) in n_curves.items():
        (line,) = a2.plot(xs, [100 * y for y in ys], marker=".", label=f"n = {k}")
        lam = law(law_c, k)
        a2.plot([lam], [100 * _interp(xs, ys, lam)], "x", color=line.get_color(), ms=10)
    a2.set_xlabel("lambda")
    a2.set_ylabel("normalized test accuracy (%), seed-set mean")
    a2.set_title(f"x: lambda(n) = 1/(1+{law_c:.3f}(n-1))", fontsize=9)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_lambda, dpi=120)
    plt.close(fig)


def write_section(doc: Path, section: str, after: str | None = None) -> None:
    """Write one '## ...' section of docs/benchmarks.md (its heading is its first line).

    It replaces the section of the same heading, wherever it is, and goes right after the
    section headed `after` when there is one, else first under the title. Other sections
    (the cost benchmark's) are kept verbatim.
    """
    heading = section.splitlines()[0].strip()
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)

    def span(title: str) -> tuple[int, int] | None:
        start = next((i for i, ln in enumerate(lines) if ln.strip() == title), None)
        if start is None:
            return None
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        return start, end

    old = span(heading)
    if old is not None:
        lines = lines[: old[0]] + lines[old[1] :]
    anchor = span(after) if after else None
    if anchor is not None:
        at = anchor[1]
    else:
        at = next((i for i, ln in enumerate(lines) if ln.startswith("## ")), len(lines))
    head = "".join(lines[:at]).rstrip("\n") + "\n\n"
    rest = "".join(lines[at:]).strip("\n")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(head + section.rstrip("\n") + "\n" + ("\n" + rest + "\n" if rest else ""))


# --------------------------------------------------------------------------- main


def _mean_lambda_row(sweep: Sweep, k: int, grid: Sequence[float]) -> list[str]:
    return [f"{_pct(sweep(k, g).mean('test'))} ({_pct(sweep(k, g).mean('val'))})" for g in grid]


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, sd


def _robust_tables(
    robust: Mapping[str, Sequence[Sweep]], ks: Sequence[int], n: int, n_sets: int
) -> list[str]:
    """Markdown: lambda by task count (default rank-1 policy), rank-1 policies at n."""
    pol = DEFAULT_CONFIG.rank1
    lines = [
        f"### Robustness over {n_sets} seed sets",
        "",
        f"Mean normalized test accuracy % (mean ± sd over {n_sets} sets of task seeds; the"
        " models and the test images are the same, only the random maps change). Best"
        " lambda of each row in bold.",
        "",
        f"Lambda by number of tasks, flip + shuffle, rank1={pol}:",
        "",
    ]
    rows = []
    for k in ks:
        stats = {g: _mean_sd([sw(k, g).mean("test") for sw in robust[pol]]) for g in ROBUST_LAMBDAS}
        top = max(stats, key=lambda g: stats[g][0])
        cells = [
            (f"**{_pct(m)} ± {_pct(sd)}**" if g == top else f"{_pct(m)} ± {_pct(sd)}")
            for g, (m, sd) in stats.items()
        ]
        rows.append([str(k), *cells])
    lines += _table(["n", *(f"lambda {g:g}" for g in ROBUST_LAMBDAS)], rows)
    lines += ["", f"Rank-1 policies at {n} tasks (flip + shuffle):", ""]
    rows = []
    for p, sws in robust.items():
        stats = {g: _mean_sd([sw(n, g).mean("test") for sw in sws]) for g in ROBUST_RANK1_LAMBDAS}
        rows.append([p, *(f"{_pct(m)} ± {_pct(sd)}" for m, sd in stats.values())])
    lines += _table(["rank1", *(f"lambda {g:g}" for g in ROBUST_RANK1_LAMBDAS)], rows)
    lines.append("")
    return lines


def _findings(
    suite: Suite,
    robust: Mapping[str, Sequence[Sweep]],
    ks: Sequence[int],
    n: int,
    law_c: float,
    storage: Mapping[str, tuple[int, int]],
    rd_best: Mapping[str, Mapping[int, tuple[float, Score]]],
) -> list[str]:
    """The reading of the numbers behind the defaults (randes.config's rank-1 policy; the
    inverse lambda law is a reference curve only: the default lambda is data-free per task).

    Every claim is computed from the numbers, so a rerun on other models cannot leave a
    stale sentence behind.
    """

    def stats(pol: str, k: int, g: float) -> tuple[float, float]:
        return _mean_sd([sw(k, g).mean("test") for sw in robust[pol]])

    pol = DEFAULT_CONFIG.rank1
    best_by_k: dict[int, float] = {}
    for k in ks:
        best_by_k[k] = max(ROBUST_LAMBDAS, key=lambda g: stats(pol, k, g)[0])  # noqa: B023
    lam_txt = ", ".join(f"{g:g} at n={k}" for k, g in best_by_k.items())
    law_txt = ", ".join(f"{law(law_c, k):.2f}" for k in ks)
    gaps = [
        stats(pol, k, best_by_k[k])[0]
        - _interp(ROBUST_LAMBDAS, [stats(pol, k, g)[0] for g in ROBUST_LAMBDAS], law(law_c, k))
        for k in ks
    ]
    out = ["**Reading the numbers.**", ""]
    out.append(
        f"- Lambda ({pol} rank-1 policy, seed-set means): best grid value {lam_txt}. The law"
        f" lambda(n) = 1/(1 + c(n-1)) fitted on validation gives c = {law_c:.3f}, i.e."
        f" {law_txt} at n = {', '.join(map(str, ks))}, at most {100 * max(gaps):.1f} points"
        " below the best grid lambda of each n (test). The law is a fitted reference only:"
        " the project default is the data-free lambda per task"
        f" (`randes.scaling.data_free_scale`, 1/(1 + {NOISE_GAIN:g} r_t) from stored norms only;"
        " its one constant was fitted once on pooled validation of the storage suites)."
        + (
            f" Up to {n} tasks lambda barely matters near 1, so c is loosely pinned here;"
            f" the section beyond {n} tasks (`--tasks 13`) shows where lambda matters."
            if n == len(TASKS)
            else ""
        )
    )
    g_ref = max(ROBUST_RANK1_LAMBDAS, key=lambda g: sum(stats(p, n, g)[0] for p in robust))
    pol_stats = {p: stats(p, n, g_ref) for p in robust}
    spread = {p: sum(stats(p, n, g)[1] for g in ROBUST_RANK1_LAMBDAS) for p in robust}
    hi = max(pol_stats, key=lambda p: pol_stats[p][0])
    lo = min(pol_stats, key=lambda p: pol_stats[p][0])
    diff = pol_stats[hi][0] - pol_stats[lo][0]
    noise = 2 * max(sd for _, sd in pol_stats.values())
    verdict = "within noise of each other" if diff <= noise else f"`{hi}` ahead by {100 * diff:.1f}"
    rank1_params = sum(v.numel() for v in suite.base.values() if v.dim() <= 1)
    all_params = sum(v.numel() for v in suite.base.values())
    extra = ""
    if "flip + shuffle, rank1=private" in storage and "flip + shuffle, rank1=flip" in storage:
        per_task = (
            storage["flip + shuffle, rank1=private"][1] - storage["flip + shuffle, rank1=flip"][1]
        ) / n
        extra = f" `private` stores {_mib(int(per_task))} more per task here"
    out.append(
        f"- Rank-1 policy at {n} tasks, lambda {g_ref:g}: "
        + ", ".join(f"{p} {_pct(m)} ± {_pct(sd)}" for p, (m, sd) in pol_stats.items())
        + f": {verdict}. Smallest spread over seed sets: `{min(spread, key=lambda p: spread[p])}`."
        + extra
        + f" (rank-1 tensors are {100 * rank1_params / all_params:.1f}% of this model's"
        " parameters, about 0.1% of GPT-2 small's)."
    )
    names = {
        "flip + shuffle": f"flip + shuffle, rank1={pol}",
        "flip only": f"flip only, rank1={pol}",
        "shuffle only": f"shuffle only, rank1={pol}",
    }
    if all(v in rd_best for v in names.values()):
        out.append(
            "- Maps (best lambda on validation, one seed set): "
            + ", ".join(
                f"{label} {_pct(rd_best[v][n][1].mean('test'))}" for label, v in names.items()
            )
            + "."
        )
    out.append("")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if "--storage" in args_in:  # the storage axis lives in its own module
        from benchmarks.quality_storage import main as storage_main

        args_in.remove("--storage")
        return storage_main(args_in)
    argv = args_in
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smaller grids, default variant only")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "benchmarks/out/digits-models")
    ap.add_argument("--retrain", action="store_true", help="ignore models trained earlier")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs/benchmarks.md")
    ap.add_argument("--img-dir", type=Path, default=ROOT / "docs/img")
    ap.add_argument("--no-write", action="store_true", help="print the section, write nothing")
    ap.add_argument(
        "--tasks",
        type=int,
        default=len(TASKS),
        help=f"fold this many tasks: the {len(TASKS)}-task suite, then the extras"
        f" (at most {len(ALL_TASKS)}); anything but {len(TASKS)} only prints",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (default 2, the cores of the reference machine; on a machine"
        " shared with other work 1 avoids OpenMP stalls). Weights depend on it in the last bits.",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    if not 1 <= args.tasks <= min(len(ALL_TASKS), len(SEEDS)):
        ap.error(f"--tasks must be in 1..{len(ALL_TASKS)}")
    tasks = list(ALL_TASKS)[: args.tasks]
    n = len(tasks)
    ks = [1, n // 2, n] if args.quick else list(range(1, n + 1))
    ta_grid = QUICK_TA_GRID if args.quick else TA_GRID
    rd_grid = QUICK_RD_GRID if args.quick else RD_GRID
    dflt = default_variant()
    variants = _variants()
    if args.quick:
        variants = {dflt: variants[dflt]}
    recipe = Recipe()
    suite = load_suite(args.models_dir, tasks, recipe, reuse=not args.retrain)
    print(f"models ready in {suite.train_s:.1f}s", flush=True)

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
            print(f"folded {n} tasks for {name!r} in {bundle.fold_s:.2f}s", flush=True)
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
        if not args.quick:
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
        storage = {v: b.bytes(n) for v, b in bundles.items()}
    runtime = time.perf_counter() - t_start
    load_end = os.getloadavg()[0]
    print(f"benchmark done in {runtime:.0f}s", flush=True)

    # ------------------------------------------------------------------ report
    base_bytes = (suite.base_dir / WEIGHTS_FILE).stat().st_size
    ft_bytes = sum((d / WEIGHTS_FILE).stat().st_size for d in suite.task_dirs.values())
    heads_bytes = sum(_nbytes({h: suite.tuned[t][h] for h in HEAD}) for t in tasks)
    ta_merged_bytes = _nbytes(suite.base)
    lscore = {k: rd[dflt](k, law(law_c, k)) for k in ks}
    extended = n != len(TASKS)
    command = ".venv/bin/python -m benchmarks.quality" + (" --quick" if args.quick else "")
    command += f" --tasks {n}" if extended else ""
    command += f" --threads {args.threads}" if args.threads != 2 else ""
    m = recipe.model

    title = f"## Quality beyond {len(TASKS)} tasks" if extended else "## Quality"
    lines: list[str] = [title, ""]
    if extended:
        lines += [
            f"The {len(TASKS)}-task suite followed by {n - len(TASKS)} more tasks, to see where"
            " the best lambda goes as a bundle grows (same models, seeds and protocol as above).",
            "",
        ]
    lines += [
        f"Measured {DATE} on a {MACHINE}. Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Whole run: {runtime:.0f} s, of which {suite.train_s:.0f} s training models (only"
        " what `benchmarks/out/digits-models` does not hold yet for the same recipe: training"
        " is deterministic, so reuse changes no number); the rest is evaluation (a forward"
        " pass over 360 images per task and lambda), folds and retrievals take"
        f" well under a second. Load average {load_start:.1f} at the start, {load_end:.1f} at"
        " the end: other sessions share these 2 cores, so times vary by 2x between runs.",
        "",
        "**Setup.** Real data: scikit-learn's bundled handwritten digits (1797 real 8x8"
        " images), split 60/20/20 (stratified, fixed seed). Model: the GPT-2-named pre-LN"
        f" ViT of `flows/digits` (16 tokens of 2x2 pixels, d_model {m.d_model},"
        f" {m.n_layer} layers, {m.n_head} heads,"
        f" {sum(v.numel() for v in suite.base.values()):,} backbone parameters), pretrained on"
        " upright digits only. Each task is fine-tuned from it (linear probe, then"
        f" {recipe.finetune_steps} full steps at lr {recipe.finetune_lr:g}) with its own"
        " head, which the base lacks and every method keeps per task. Tasks differ by"
        " input transform and by label, as in real multi-task suites. Normalized accuracy ="
        " test accuracy of the retrieved model / test accuracy of the fine-tuned model."
        " Every tuned lambda is chosen on the validation split and reported on test; the"
        " project default (`TransformConfig()` and `randes.scaling.data_free_scale`: lambda per"
        " task from stored delta and base norms) is not"
        f" tuned. RanDeS runs through `randes.fold` / `randes.retrieve` (seeds {list(SEEDS[:n])}"
        " in fold order); task arithmetic is theta_base + lambda * sum_t delta_t.",
        "",
    ]
    lines += _table(
        ["task", "what", "fine-tuned test acc %", "base + own head, norm. %", "‖δ‖/‖W‖"],
        [
            [
                f"`{t}`",
                get_task(t).description,
                _pct(suite.ref["test"][t]),
                _pct(floor[n].split("test")[t]),
                f"{100 * suite.rel_delta[t]:.1f}%",
            ]
            for t in tasks
        ],
    )
    lines.append("")

    def row(label: str, lam: str, sc: Score) -> list[str]:
        per = sc.split("test")
        return [label, lam, f"**{_pct(sc.mean('test'))}**", *(_pct(per[t]) for t in tasks)]

    lines += [f"### {n} tasks: normalized test accuracy (%)", ""]
    rows = [row("base + own head (floor)", "0", floor[n])]
    rows.append(row("task arithmetic, best lambda (val)", f"{ta_best[n][0]:g}", ta_best[n][1]))
    rows.append(row(f"**RanDeS project default** ({dflt})", dflt_lams[n], dscore[n]))
    for v in rd:
        rows.append(
            row(f"RanDeS {v}, best lambda (val)", f"{rd_best[v][n][0]:g}", rd_best[v][n][1])
        )
    rows.append(
        row(f"RanDeS {dflt}, lambda = 1/(1+{law_c:.3f}(n-1))", f"{law(law_c, n):.3f}", lscore[n])
    )
    lines += _table(["method", "lambda", "mean", *tasks], rows)
    lines.append("")
    gap = dscore[n].mean("test") - ta_best[n][1].mean("test")
    best_v = max(rd, key=lambda v: rd_best[v][n][1].mean("val"))
    lines += [
        f"Project default vs best-tuned task arithmetic at {n} tasks: **{_signed(gap)}"
        f" points** ({_pct(dscore[n].mean('test'))} vs {_pct(ta_best[n][1].mean('test'))})."
        f" Best RanDeS variant and lambda on validation: {best_v}, lambda"
        f" {rd_best[best_v][n][0]:g}: {_pct(rd_best[best_v][n][1].mean('test'))} on test"
        f" ({_signed(rd_best[best_v][n][1].mean('test') - dscore[n].mean('test'))} points"
        " over the default).",
        "",
        f"Lambda grids: task arithmetic {list(ta_grid)}; RanDeS {list(rd_grid)}. The test"
        f" split has {len(task_split(tasks[0], 'test')[1])} images per task, so differences"
        " of about one point in a mean are within noise.",
        "",
    ]
    if robust:
        lines += _findings(suite, robust, robust_ks, n, law_c, storage, rd_best)

    lines += [
        f"### Lambda sweeps at {n} tasks",
        "",
        "Mean normalized accuracy %, test (validation in brackets).",
        "",
    ]
    sweep_rows = [
        [f"{g:g}", *_mean_lambda_row(ta, n, [g])] if g in ta_grid else [f"{g:g}", "-"]
        for g in sorted(set(ta_grid) | set(rd_grid))
    ]
    for r, g in zip(sweep_rows, sorted(set(ta_grid) | set(rd_grid)), strict=True):
        for v in rd:
            r.append(_mean_lambda_row(rd[v], n, [g])[0] if g in rd_grid else "-")
    lines += _table(["lambda", "task arithmetic", *(f"RanDeS {v}" for v in rd)], sweep_rows)
    lines.append("")

    lines += [
        "### Over the number of tasks",
        "",
        "Mean normalized test accuracy % over the first n tasks (fold order as in the task"
        " table), lambda in brackets.",
        "",
    ]
    curve_rows = [
        [
            str(k),
            f"{_pct(floor[k].mean('test'))}",
            f"{_pct(ta_best[k][1].mean('test'))} ({ta_best[k][0]:g})",
            f"{_pct(dscore[k].mean('test'))} ({dflt_lams[k]})",
            f"{_pct(rd_best[dflt][k][1].mean('test'))} ({rd_best[dflt][k][0]:g})",
            f"{_pct(rd[dflt](k, const_lam).mean('test'))} ({const_lam:g})",
            f"{_pct(lscore[k].mean('test'))} ({law(law_c, k):.3f})",
        ]
        for k in ks
    ]
    lines += _table(
        [
            "n",
            "base + own head",
            "task arithmetic, best (val)",
            "RanDeS default",
            "RanDeS default config, best grid lambda (val)",
            "RanDeS default config, best single lambda (val)",
            f"RanDeS default config, 1/(1+{law_c:.3f}(n-1))",
        ],
        curve_rows,
    )
    lines.append("")

    if robust:
        lines += _robust_tables(robust, robust_ks, n, len(SEED_SETS))

    if not extended:  # storage is reported for the 8-task suite only
        lines += [f"### Storage for {n} tasks (safetensors files, headers included)", ""]
        st_rows = [
            [
                "individual fine-tunes",
                _mib(base_bytes),
                "-",
                _mib(ft_bytes),
                _mib(base_bytes + ft_bytes),
            ],
            [
                "task arithmetic (merged set + heads)",
                _mib(base_bytes),
                _mib(ta_merged_bytes),
                _mib(heads_bytes),
                _mib(base_bytes + ta_merged_bytes + heads_bytes),
            ],
        ]
        for v, (sup, priv) in storage.items():
            st_rows.append(
                [
                    f"RanDeS {v}",
                    _mib(base_bytes),
                    _mib(sup),
                    _mib(priv),
                    _mib(base_bytes + sup + priv),
                ]
            )
        lines += _table(
            ["method", "base", "superposition / merged", "private (all tasks)", "total"], st_rows
        )
        lines.append("")

    suffix = f"_{n}" if extended else ""
    img_curve = args.img_dir / f"quality_curve{suffix}.png"
    img_lambda = args.img_dir / f"quality_lambda{suffix}.png"
    lines += [
        f"![normalized accuracy over the number of tasks](img/{img_curve.name})",
        "",
        f"![lambda sweeps at {n} tasks; best lambda per task count](img/{img_lambda.name})",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if args.quick or args.no_write:
        return 0
    args.img_dir.mkdir(parents=True, exist_ok=True)
    curves = {
        "RanDeS project default": [dscore[k].mean("test") for k in ks],
        f"RanDeS, lambda = 1/(1+{law_c:.3f}(n-1))": [lscore[k].mean("test") for k in ks],
        "task arithmetic, best lambda": [ta_best[k][1].mean("test") for k in ks],
        "base + own head (floor)": [floor[k].mean("test") for k in ks],
    }
    lam_curves: dict[str, tuple[Sequence[float], Sequence[float]]] = {
        "task arithmetic": (ta_grid, [ta(n, g).mean("test") for g in ta_grid])
    }
    for v in rd:
        lam_curves[f"RanDeS {v}"] = (rd_grid, [rd[v](n, g).mean("test") for g in rd_grid])
    n_curves: dict[int, tuple[Sequence[float], Sequence[float]]]
    if robust:
        sweeps = robust[DEFAULT_CONFIG.rank1]
        n_curves = {
            k: (
                ROBUST_LAMBDAS,
                [sum(sw(k, g).mean("test") for sw in sweeps) / len(sweeps) for g in ROBUST_LAMBDAS],
            )
            for k in robust_ks
        }
    else:
        n_curves = {k: (rd_grid, [rd[dflt](k, g).mean("test") for g in rd_grid]) for k in ks}
    plot(img_curve, img_lambda, ks, curves, lam_curves, n_curves, law_c)
    write_section(args.doc, section, after="## Quality" if extended else None)
    print(f"wrote {args.doc}, {img_curve}, {img_lambda}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
