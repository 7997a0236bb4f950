"""The quality page's two figures (matplotlib, Agg): accuracy by task count, lambda sweeps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.quality import _interp, law


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(path_curve: Path, ks: Sequence[int], curves: Mapping[str, Sequence[float]]) -> None:
    """quality_curve.png: accuracy over the number of tasks."""
    plt = _pyplot()

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


def plot_lambda(
    path_lambda: Path,
    ks: Sequence[int],
    lam_curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    n_curves: Mapping[int, tuple[Sequence[float], Sequence[float]]],
    law_c: float,
) -> None:
    """quality_lambda.png: lambda sweeps at n tasks, and by task count with the law marked.

    The right panel shows, for several task counts n, the seed-set mean accuracy against
    lambda, with the fitted law's lambda(n) marked on each curve: that is where the
    default-lambda recommendation can be checked by eye.
    """
    plt = _pyplot()
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
