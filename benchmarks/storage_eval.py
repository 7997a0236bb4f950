"""Evaluation of the quality-against-storage stores: normalized accuracy, computed once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from benchmarks.storage_core import Scale, StorageSuite, Store, rounded, scale_key


class Evaluator:
    """Normalized accuracy per (store, task, lambda, split), each computed once."""

    def __init__(self, suite: StorageSuite) -> None:
        self.suite = suite
        self.cache: dict[tuple[object, ...], float] = {}
        self.evals = 0

    def task(self, store: Store, task: str, scale: Scale, split: str) -> float:
        scale = rounded(scale)
        key = (store.key, task, scale_key(scale), split)
        if key not in self.cache:
            acc = self.suite.accuracy(task, store.state(task, scale), split)
            self.cache[key] = acc / self.suite.ref[split][task]
            self.evals += 1
        return self.cache[key]

    def point(
        self, store: Store, scales: Mapping[str, Scale], split: str, tasks: Sequence[str]
    ) -> dict[str, float]:
        return {t: self.task(store, t, scales[t], split) for t in tasks}


def mean(xs: Mapping[str, float] | Sequence[float]) -> float:
    vals = list(xs.values()) if isinstance(xs, Mapping) else list(xs)
    return sum(vals) / len(vals)


def best_fixed(
    ev: Evaluator, store: Store, tasks: Sequence[str], grid: Sequence[float]
) -> tuple[float, dict[str, float]]:
    """Grid lambda with the best VALIDATION mean (ties: nearest 1); val per-task scores."""
    vals = {g: ev.point(store, dict.fromkeys(tasks, g), "val", tasks) for g in grid}
    lam = max(grid, key=lambda g: (round(mean(vals[g]), 9), -abs(g - 1.0)))
    return lam, vals[lam]
