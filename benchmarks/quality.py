"""Quality benchmark: RanDeS against task arithmetic on 8 real fine-tunes.

    .venv/bin/python -m benchmarks.quality            # full run, writes docs/
    .venv/bin/python -m benchmarks.quality --quick    # smaller grids, prints only

Normalized accuracy = accuracy(retrieved model) / accuracy(fine-tuned model), on each
task's held-out TEST split. Every scale lambda that is "tuned" (task arithmetic's, the
best RanDeS lambda) is chosen on the VALIDATION split and then reported on test, so
no number below is selected on the data it is reported on. The project default
(TransformConfig() + randes.scaling's default lambda) is never tuned at all.

RanDeS goes through the real core (randes.fold / randes.retrieve, files on disk,
the same code path as `randes fold` / `randes materialize`); task arithmetic is the
textbook baseline computed in memory: theta_base + lambda * sum_t delta_t, each task
keeping its own head (the base has none), exactly as RanDeS keeps it private.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import math
import platform
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python benchmarks/quality.py` as well as `-m`
    sys.path.insert(0, str(ROOT))

from flows.digits.data import TASKS  # noqa: E402
from flows.digits.evaluator import evaluate  # noqa: E402
from flows.digits.model import WEIGHTS_FILE, load_state_dict  # noqa: E402
from flows.digits.train import Recipe, build_models, relative_delta_norm  # noqa: E402
from randes.checkpoint import CheckpointReader  # noqa: E402
from randes.config import TransformConfig  # noqa: E402
from randes.fold import FoldResult, fold  # noqa: E402
from randes.retrieve import retrieve  # noqa: E402
from randes.scaling import default_scale  # noqa: E402

DATE = "2026-11-26"
MACHINE = "2-core CPU, 24 GiB RAM, torch 2.13 CPU"
SEEDS: tuple[int, ...] = (11, 23, 37, 41, 53, 67, 79, 83, 97, 101)
"""RanDeS task seeds, one per task in fold order (distinct, fixed: reproducible bundles)."""

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


@dataclass
class Score:
    """Normalized accuracy of one retrieved set of k tasks, per split and task."""

    per_task: dict[str, dict[str, float]]  # split -> task -> normalized accuracy

    def mean(self, split: str) -> float:
        vals = list(self.per_task[split].values())
        return sum(vals) / len(vals)


def score_models(suite: Suite, models: Mapping[str, Mapping[str, Tensor]]) -> Score:
    per: dict[str, dict[str, float]] = {"val": {}, "test": {}}
    for task, sd in models.items():
        for split in per:
            acc = evaluate(sd, task, split)["accuracy"]
            per[split][task] = acc / suite.ref[split][task]
    return Score(per)


def task_arithmetic(suite: Suite, k: int, lam: float) -> Score:
    """theta_base + lam * sum of the first k deltas; each task evaluated with its own head."""
    tasks = suite.tasks[:k]
    merged = {
        name: w + lam * sum((suite.tuned[t][name] - w for t in tasks), torch.zeros_like(w))
        for name, w in suite.base.items()
    }
    models = {t: {**merged, **{h: suite.tuned[t][h] for h in HEAD}} for t in tasks}
    return score_models(suite, models)


def base_with_heads(suite: Suite, k: int) -> Score:
    """The floor: the untouched base with each task's fine-tuned head (lambda = 0)."""
    tasks = suite.tasks[:k]
    return score_models(suite, {t: {**suite.base, **{h: suite.tuned[t][h] for h in HEAD}} for t in tasks})


@dataclass
class Bundle:
    """A RanDeS variant folded task after task: the superposition after each fold."""

    config: TransformConfig
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


def build_bundle(suite: Suite, config: TransformConfig, work: Path) -> Bundle:
    """Fold every task in order through randes.fold, parent = the previous superposition."""
    bundle = Bundle(config)
    t0 = time.perf_counter()
    with CheckpointReader.open(suite.base_dir) as base:
        for i, task in enumerate(suite.tasks):
            parent = bundle.superposition(i) if i else None
            with CheckpointReader.open(suite.task_dirs[task]) as ckpt:
                res = fold(
                    base=base,
                    checkpoint=ckpt,
                    parent=parent,
                    seed=SEEDS[i],
                    config=config,
                    out_dir=work / f"v{i + 1:02d}",
                )
            if parent is not None:
                parent.close()
            bundle.folds.append(res)
    bundle.fold_s = time.perf_counter() - t0
    return bundle


def randes_score(suite: Suite, bundle: Bundle, k: int, lam: float) -> Score:
    """Retrieve each of the first k tasks from the k-task superposition at scale lam."""
    models: dict[str, dict[str, Tensor]] = {}
    with CheckpointReader.open(suite.base_dir) as base, bundle.superposition(k) as sup:
        for i, task in enumerate(suite.tasks[:k]):
            private = bundle.private(i)
            try:
                models[task] = dict(
                    retrieve(
                        base=base,
                        superposition=sup,
                        private=private,
                        seed=SEEDS[i],
                        key_map=bundle.folds[i].key_map,
                        config=bundle.config,
                        scale=lam,
                    )
                )
            finally:
                if private is not None:
                    private.close()
    return score_models(suite, models)


class Sweep:
    """Memoized scores of one method over (k, lambda)."""

    def __init__(self, fn: object) -> None:
        self.fn = fn
        self.cache: dict[tuple[int, float], Score] = {}

    def __call__(self, k: int, lam: float) -> Score:
        key = (k, round(lam, 6))
        if key not in self.cache:
            self.cache[key] = self.fn(k, lam)  # type: ignore[operator]
        return self.cache[key]

    def best(self, k: int, grid: Sequence[float]) -> tuple[float, Score]:
        """The grid lambda with the best VALIDATION mean (ties: the smaller lambda)."""
        lam = max(grid, key=lambda g: (self(k, g).mean("val"), -g))
        return lam, self(k, lam)


# --------------------------------------------------------------------------- lambda(n)


def _interp(grid: Sequence[float], values: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation, clamped at the ends."""
    if x <= grid[0]:
        return values[0]
    for (g0, v0), (g1, v1) in zip(zip(grid, values), zip(grid[1:], values[1:]), strict=False):
        if x <= g1:
            return v0 + (v1 - v0) * (x - g0) / (g1 - g0)
    return values[-1]


def fit_inverse_law(sweep: Sweep, ks: Sequence[int], grid: Sequence[float]) -> float:
    """c of lambda(n) = 1 / (1 + c (n - 1)) maximizing the mean VALIDATION score over n.

    Scores between grid points are interpolated, so c is not limited to the grid. The
    law is the optimum of a quadratic loss model: retrieved = base + lam (delta_t + eps),
    eps the decorrelated cross-talk of n-1 other tasks, so the best lam is
    |delta_t|_H^2 / (|delta_t|_H^2 + (n-1) |delta_u|_H^2 rho) = 1 / (1 + c (n-1)).
    """
    curves = {k: [sweep(k, g).mean("val") for g in grid] for k in ks}
    best_c, best_v = 0.0, -math.inf
    for step in range(0, 201):
        c = step * 0.005
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
    best_lams: Mapping[str, Sequence[float]],
    law_c: float,
) -> None:
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
    for label, ys in best_lams.items():
        a2.plot(ks, ys, marker="o", label=label)
    fine = [1 + 0.1 * i for i in range(10 * (max(ks) - 1) + 1)]
    a2.plot(fine, [law(law_c, n) for n in fine], "k--", label=f"1/(1+{law_c:.3f}(n-1))")
    a2.set_xlabel("tasks in the bundle (n)")
    a2.set_ylabel("best lambda (validation)")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_lambda, dpi=120)
    plt.close(fig)


def write_section(doc: Path, section: str) -> None:
    """Replace the '## Quality' section of docs/benchmarks.md (other sections are kept)."""
    title = "# Benchmarks\n\n"
    text = doc.read_text() if doc.exists() else title
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == "## Quality"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller grids and variants; no docs")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "benchmarks/out/digits-models")
    ap.add_argument("--retrain", action="store_true", help="ignore models trained earlier")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs/benchmarks.md")
    ap.add_argument("--img-dir", type=Path, default=ROOT / "docs/img")
    ap.add_argument("--no-write", action="store_true", help="print the section, write nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t_start = time.perf_counter()

    tasks = list(TASKS)
    n = len(tasks)
    ks = list(range(1, n + 1))
    ta_grid = QUICK_TA_GRID if args.quick else TA_GRID
    rd_grid = QUICK_RD_GRID if args.quick else RD_GRID
    variants = _variants()
    dflt = default_variant()
    if args.quick:
        variants = {dflt: variants[dflt]}
    recipe = Recipe()
    suite = load_suite(args.models_dir, tasks, recipe, reuse=not args.retrain)
    print(f"models ready in {suite.train_s:.1f}s")

    # Task arithmetic over (k, lambda).
    ta = Sweep(lambda k, lam: task_arithmetic(suite, k, lam))
    floor = {k: base_with_heads(suite, k) for k in ks}

    rd: dict[str, Sweep] = {}
    bundles: dict[str, Bundle] = {}
    with tempfile.TemporaryDirectory(prefix="randes-quality-") as tmp:
        for i, (name, cfg) in enumerate(variants.items()):
            bundle = build_bundle(suite, cfg, Path(tmp) / f"variant{i}")
            bundles[name] = bundle
            rd[name] = Sweep(lambda k, lam, b=bundle: randes_score(suite, b, k, lam))
            print(f"folded {n} tasks for {name!r} in {bundle.fold_s:.2f}s")

        # Which k each variant is swept at: the default and rank-1 variants on every k
        # (for the curve and lambda(n)), the map ablations at n only.
        curve_variants = [v for v in variants if v.startswith("flip + shuffle")] or [dflt]
        for v in variants:
            for k in ks if v in curve_variants else [n]:
                for g in rd_grid:
                    rd[v](k, g)
        for k in ks:
            for g in ta_grid:
                ta(k, g)
        dflt_lams = {k: default_scale(k, DEFAULT_CONFIG) for k in ks}
        dflt_scores = {k: rd[dflt](k, dflt_lams[k]) for k in ks}
        law_c = {v: fit_inverse_law(rd[v], ks, rd_grid) for v in curve_variants}
        law_scores = {v: {k: rd[v](k, law(law_c[v], k)) for k in ks} for v in curve_variants}
        # The best single lambda across k (validation, averaged over k) for comparison.
        const_lam = {
            v: max(rd_grid, key=lambda g, v=v: sum(rd[v](k, g).mean("val") for k in ks))
            for v in curve_variants
        }
        elapsed_eval = time.perf_counter() - t_start
    runtime = time.perf_counter() - t_start

    # ------------------------------------------------------------------ assemble
    ta_best = {k: ta.best(k, ta_grid) for k in ks}
    rd_best = {v: {k: rd[v].best(k, rd_grid) for k in (ks if v in curve_variants else [n])} for v in variants}
    base_bytes = (suite.base_dir / WEIGHTS_FILE).stat().st_size
    ft_bytes = sum((d / WEIGHTS_FILE).stat().st_size for d in suite.task_dirs.values())
    heads_bytes = sum(_nbytes({h: suite.tuned[t][h] for h in HEAD}) for t in tasks)
    ta_merged_bytes = _nbytes(suite.base)

    lines: list[str] = ["## Quality", ""]
    lines += [
        f"Measured {DATE} on a {MACHINE}. Command:",
        "",
        "```",
        ".venv/bin/python -m benchmarks.quality" + (" --quick" if args.quick else ""),
        "```",
        "",
        f"Whole run: {runtime:.0f} s (training of base + {n} fine-tunes: {suite.train_s:.0f} s;"
        f" evaluation and folds: {elapsed_eval - suite.train_s:.0f} s).",
        "",
        "**Setup.** Real data: scikit-learn's bundled handwritten digits (1797 real 8x8 images),"
        " split 60/20/20 (stratified, fixed seed). Model: the GPT-2-named pre-LN ViT of"
        f" `flows/digits` (16 tokens of 2x2 pixels, d_model {recipe.model.d_model},"
        f" {recipe.model.n_layer} layers, {recipe.model.n_head} heads,"
        f" {sum(v.numel() for v in suite.base.values()):,} backbone parameters), pretrained on"
        " upright digits only; each task is fine-tuned from it (linear probe, then"
        f" {recipe.finetune_steps} full steps at lr {recipe.finetune_lr:g}) with its own head, which"
        " the base lacks and every method keeps per task. Normalized accuracy = test accuracy of"
        " the retrieved model / test accuracy of the fine-tuned model. Every tuned lambda is"
        " chosen on the validation split and reported on test; the project default is not tuned.",
        "",
    ]
    rows = []
    for t in tasks:
        rows.append(
            [
                f"`{t}`",
                TASKS[t].description,
                _pct(suite.ref["test"][t]),
                _pct(floor[n].per_task["test"][t]),
                f"{100 * suite.rel_delta[t]:.1f}%",
            ]
        )
    lines += _table(
        ["task", "what", "fine-tuned test acc %", "base + own head (norm. %)", "||delta||/||W||"],
        rows,
    )
    lines.append("")

    # Main table: 8 tasks.
    lines += [f"### {n} tasks: normalized test accuracy (%)", ""]
    hdr = ["method", "lambda", "mean", *tasks]

    def row(label: str, lam: str, sc: Score) -> list[str]:
        return [label, lam, f"**{_pct(sc.mean('test'))}**", *(_pct(sc.per_task["test"][t]) for t in tasks)]

    main_rows = [row("base + own head (floor)", "0", floor[n])]
    lam, sc = ta_best[n]
    main_rows.append(row("task arithmetic, best lambda", f"{lam:g}", sc))
    main_rows.append(
        row(f"**RanDeS project default** ({dflt})", f"{dflt_lams[n]:g} (default)", dflt_scores[n])
    )
    for v in variants:
        lam, sc = rd_best[v][n]
        main_rows.append(row(f"RanDeS {v}, best lambda", f"{lam:g}", sc))
    for v in curve_variants:
        main_rows.append(
            row(
                f"RanDeS {v}, lambda = 1/(1+{law_c[v]:.3f}(n-1))",
                f"{law(law_c[v], n):.3f}",
                law_scores[v][n],
            )
        )
    lines += _table(hdr, main_rows)
    lines.append("")
    gap = dflt_scores[n].mean("test") - ta_best[n][1].mean("test")
    best_v = max(variants, key=lambda v: rd_best[v][n][1].mean("val"))
    lines += [
        f"Project default vs best-tuned task arithmetic at {n} tasks: **{100 * gap:+.1f} points**."
        f" Best variant on validation: {best_v} at lambda {rd_best[best_v][n][0]:g}"
        f" ({_pct(rd_best[best_v][n][1].mean('test'))} on test).",
        "",
        f"Lambda grids: task arithmetic {list(ta_grid)}; RanDeS {list(rd_grid)}.",
        "",
    ]

    # Lambda grid tables at n.
    lines += [f"### Lambda sweeps at {n} tasks (mean normalized test accuracy %, validation in brackets)", ""]
    ta_rows = [[f"{g:g}", f"{_pct(ta(n, g).mean('test'))} ({_pct(ta(n, g).mean('val'))})"] for g in ta_grid]
    lines += _table(["lambda", "task arithmetic"], ta_rows)
    lines.append("")
    rd_rows = [
        [f"{g:g}", *(f"{_pct(rd[v](n, g).mean('test'))} ({_pct(rd[v](n, g).mean('val'))})" for v in variants)]
        for g in rd_grid
    ]
    lines += _table(["lambda", *variants], rd_rows)
    lines.append("")

    # Curve over k.
    lines += ["### Over the number of tasks (mean normalized test accuracy %)", ""]
    curve_rows = []
    for k in ks:
        cells = [
            str(k),
            f"{_pct(ta_best[k][1].mean('test'))} (lambda {ta_best[k][0]:g})",
            f"{_pct(dflt_scores[k].mean('test'))} (lambda {dflt_lams[k]:g})",
        ]
        for v in curve_variants:
            lam, sc = rd_best[v][k]
            cells.append(f"{_pct(sc.mean('test'))} (lambda {lam:g})")
            cells.append(f"{_pct(law_scores[v][k].mean('test'))} ({law(law_c[v], k):.2f})")
        curve_rows.append(cells)
    curve_hdr = ["tasks", "task arithmetic, best", "RanDeS default"]
    for v in curve_variants:
        curve_hdr += [f"{v}, best grid", f"{v}, 1/(1+c(n-1)), c={law_c[v]:.3f}"]
    lines += _table(curve_hdr, curve_rows)
    lines.append("")
    for v in curve_variants:
        lines.append(
            f"- {v}: best single lambda over all n (validation) = {const_lam[v]:g};"
            f" fitted c = {law_c[v]:.3f}"
        )
    lines.append("")

    # Storage.
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
    for v, b in bundles.items():
        sup, priv = b.bytes(n)
        st_rows.append([f"RanDeS {v}", _mib(base_bytes), _mib(sup), _mib(priv), _mib(base_bytes + sup + priv)])
    lines += _table(["method", "base", "superposition / merged", "private (all tasks)", "total"], st_rows)
    lines.append("")

    img_curve = args.img_dir / "quality_curve.png"
    img_lambda = args.img_dir / "quality_lambda.png"
    lines += [
        f"![normalized accuracy over the number of tasks](img/{img_curve.name})",
        "",
        f"![lambda sweeps at {n} tasks and best lambda per task count](img/{img_lambda.name})",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.quick and not args.no_write:
        args.img_dir.mkdir(parents=True, exist_ok=True)
        curves = {
            "task arithmetic, best lambda": [ta_best[k][1].mean("test") for k in ks],
            "RanDeS project default": [dflt_scores[k].mean("test") for k in ks],
        }
        for v in curve_variants:
            curves[f"RanDeS {v}, 1/(1+{law_c[v]:.2f}(n-1))"] = [law_scores[v][k].mean("test") for k in ks]
        curves["base + own head"] = [floor[k].mean("test") for k in ks]
        lam_curves: dict[str, tuple[Sequence[float], Sequence[float]]] = {
            "task arithmetic": (ta_grid, [ta(n, g).mean("test") for g in ta_grid])
        }
        for v in variants:
            lam_curves[f"RanDeS {v}"] = (rd_grid, [rd[v](n, g).mean("test") for g in rd_grid])
        best_lams = {f"RanDeS {v}": [rd_best[v][k][0] for k in ks] for v in curve_variants}
        best_lams["task arithmetic"] = [ta_best[k][0] for k in ks]
        plot(img_curve, img_lambda, ks, curves, lam_curves, best_lams, law_c[dflt] if dflt in law_c else 0.0)
        write_section(args.doc, section)
        print(f"wrote {args.doc}, {img_curve}, {img_lambda}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
