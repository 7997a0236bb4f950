"""The data-free lambda: exact for a lone task, ~1 for small deltas, shrinks for large."""

from __future__ import annotations

import pytest

from randes.config import MAPS, TransformConfig
from randes.scaling import (
    DEFAULT_SCALE,
    NOISE_GAIN,
    NOISE_GAINS,
    data_free_scale,
    data_free_tensor_scales,
    noise_gain,
    relative_interference,
    resolve_scale,
    shrinkage,
)

NAMES = ["a.weight", "b.weight"]
BASE = {"a.weight": 10.0, "b.weight": 10.0, "ln.weight": 3.0}


def _bundle(n: int, rel: float) -> dict[str, dict[str, float]]:
    """n tasks whose delta on every tensor is ``rel`` times the base's norm."""
    return {f"t{i}": {k: rel * BASE[k] for k in NAMES} for i in range(n)}


def test_lone_task_is_exact() -> None:
    assert data_free_scale("t0", _bundle(1, 0.15), BASE, NAMES) == DEFAULT_SCALE == 1.0


def test_small_deltas_keep_lambda_near_one() -> None:
    lam = data_free_scale("t0", _bundle(8, 0.01), BASE, NAMES)
    assert 0.995 < lam < 1.0


def test_large_deltas_shrink_lambda() -> None:
    lam = data_free_scale("t0", _bundle(8, 0.15), BASE, NAMES)
    assert lam == pytest.approx(1 / (1 + NOISE_GAIN * 7 * 0.15**2))
    assert 0.75 < lam < 0.85


def test_interference_counts_only_other_tasks_and_superposed_tensors() -> None:
    norms = _bundle(3, 0.1)
    norms["t0"]["a.weight"] = 100.0  # the task's own delta is not noise to itself
    norms["t1"]["ln.weight"] = 50.0  # a private tensor carries no cross-talk
    assert relative_interference("t0", norms, BASE, NAMES) == pytest.approx(2 * 0.1**2)


def test_tensor_scales_follow_each_tensor() -> None:
    norms = _bundle(4, 0.01)
    for task in norms.values():
        task["b.weight"] = 0.3 * BASE["b.weight"]
    scales = data_free_tensor_scales("t0", norms, BASE, NAMES)
    assert scales["a.weight"] > 0.99
    assert scales["b.weight"] == pytest.approx(shrinkage(3 * 0.3**2))


def test_override_order() -> None:
    assert resolve_scale(TransformConfig(), None, 0.8) == 0.8
    assert resolve_scale(TransformConfig(scale=0.7), None, 0.8) == 0.7
    assert resolve_scale(TransformConfig(scale=0.7), 0.4, 0.8) == 0.4
    with pytest.raises(ValueError):
        resolve_scale(TransformConfig(), 0.0, 0.8)
    with pytest.raises(ValueError):
        shrinkage(-1.0)


def test_one_gain_per_map() -> None:
    """Column flips keep the gain fitted for them (old bundles keep their lambdas); the maps
    that scramble both sides have their own (refitted: no larger than the columns')."""
    assert set(NOISE_GAINS) == set(MAPS)
    assert noise_gain("columns") == NOISE_GAIN == 1.5
    for kind in ("two-sided", "elementwise"):
        assert 0 <= noise_gain(kind) <= NOISE_GAIN
    norms = _bundle(8, 0.15)
    lams = {k: data_free_scale("t0", norms, BASE, NAMES, gain=noise_gain(k)) for k in MAPS}
    assert lams["columns"] == pytest.approx(1 / (1 + 1.5 * 7 * 0.15**2))
    assert lams["elementwise"] >= lams["columns"]
