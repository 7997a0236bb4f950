"""randes.validation_policy: which tasks a validation measures, and the window it keeps.

The selection is pure, so it is checked here over many simulated versions (a bundle
growing by one task a version, validations every version or every few, an outsized
task joining); tests/pipeline/test_validation_scale.py checks the same through the
validate flow and the registry.
"""

from __future__ import annotations

import math

import pytest

from randes.scaling import relative_interference
from randes.validation_policy import (
    DEFAULT_DRIFT,
    DEFAULT_WINDOW,
    Decision,
    LastCheck,
    PolicyError,
    TaskState,
    ValidationPolicy,
    drift_of,
    predicted_interference,
    select,
)


def _tasks(n: int, r: float = 0.01, *, added: int = 1) -> list[TaskState]:
    return [TaskState(f"t{i:02d}", 100 + i, added + i, r) for i in range(n)]


def _history(tasks: list[TaskState], version: int, *, passed: bool = True) -> dict[str, LastCheck]:
    return {t.name: LastCheck(version, t.seed, t.interference, passed) for t in tasks}


def _measured(decisions: list[Decision]) -> dict[str, str]:
    return {d.task: d.reason for d in decisions if d.measured}


def test_defaults() -> None:
    policy = ValidationPolicy()
    assert (policy.drift, policy.window, policy.sample) == (DEFAULT_DRIFT, DEFAULT_WINDOW, None)
    assert (DEFAULT_DRIFT, DEFAULT_WINDOW) == (0.25, 8)


@pytest.mark.parametrize(
    "fields", [{"drift": -0.1}, {"drift": math.nan}, {"window": 0}, {"sample": -1}]
)
def test_out_of_range_policy_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(PolicyError):
        ValidationPolicy(**fields)  # type: ignore[arg-type]


def test_overridden_keeps_what_is_not_given() -> None:
    policy = ValidationPolicy(drift=0.1, window=4, sample=2)
    assert policy.overridden(window=6) == ValidationPolicy(drift=0.1, window=6, sample=2)
    assert policy.overridden() == policy


def test_never_validated_tasks_are_all_new() -> None:
    tasks = _tasks(5)
    decisions = select(5, tasks, {}, ValidationPolicy())
    assert [d.reason for d in decisions] == ["new"] * 5
    assert all(d.measured for d in decisions)
    assert decisions[2].detail == "added in version 3, never validated"
    assert decisions[4].detail == "added in version 5"


def test_a_task_of_the_same_name_but_another_seed_is_new() -> None:
    """Folded out and in again: its old measurements say nothing about the new delta."""
    tasks = _tasks(3)
    history = _history(tasks, 3)
    history["t01"] = LastCheck(3, 999, 0.01, True)
    assert _measured(select(4, tasks, history, ValidationPolicy(sample=0))) == {"t01": "new"}


def test_32_task_bundle_one_new_task_costs_five() -> None:
    old = _tasks(31)
    new = TaskState("fresh", 7, 32, 0.01)
    decisions = select(32, [*old, new], _history(old, 31), ValidationPolicy())
    measured = _measured(decisions)
    assert len(measured) == 5 <= 8
    assert measured["fresh"] == "new"
    assert sorted(r for t, r in measured.items() if t != "fresh") == ["rotation"] * 4
    skipped = [d for d in decisions if not d.measured]
    assert len(skipped) == 27
    assert skipped[0].reason == "skipped"
    assert "last validated at version 31" in skipped[0].detail


def test_rotation_takes_the_oldest_measurements_first() -> None:
    tasks = _tasks(6)
    history = {t.name: LastCheck(10 - i, t.seed, t.interference, True) for i, t in enumerate(tasks)}
    decisions = select(11, tasks, history, ValidationPolicy(sample=2))
    assert _measured(decisions) == {"t05": "rotation", "t04": "rotation"}
    rotated = next(d for d in decisions if d.task == "t05")
    assert rotated.detail == "last validated at version 5" and rotated.last_version == 5


def test_interference_that_moved_past_the_threshold_is_measured() -> None:
    tasks = _tasks(4, r=0.01)
    history = _history(tasks, 4)
    moved = [
        TaskState(t.name, t.seed, t.added_in_version, 0.0126 if t.name == "t00" else 0.0124)
        for t in tasks
    ]
    decisions = select(5, moved, history, ValidationPolicy(sample=0))
    assert _measured(decisions) == {"t00": "interference"}
    detail = next(d.detail for d in decisions if d.task == "t00")
    assert "moved by 26.0% since version 4" in detail and "threshold 25.0%" in detail
    assert "24.0%" in next(d.detail for d in decisions if d.task == "t01")  # told when skipped


def test_interference_that_dropped_counts_as_moved_too() -> None:
    tasks = _tasks(2, r=0.01)
    lower = [TaskState(t.name, t.seed, t.added_in_version, 0.005) for t in tasks]
    assert set(_measured(select(3, lower, _history(tasks, 2), ValidationPolicy(sample=0)))) == {
        "t00",
        "t01",
    }


def test_a_task_that_was_alone_is_measured_when_company_arrives() -> None:
    alone = TaskState("solo", 1, 1, 0.0)
    history = {"solo": LastCheck(1, 1, 0.0, True)}
    now = [TaskState("solo", 1, 1, 0.02), TaskState("loud", 2, 2, 0.0)]
    decisions = select(2, now, history, ValidationPolicy(sample=0))
    assert _measured(decisions) == {"solo": "interference", "loud": "new"}
    assert "inf (from 0)" in decisions[0].detail
    assert drift_of(0.0, 0.0) == 0.0 and drift_of(alone.interference, 0.0) == 0.0


def test_a_task_that_failed_last_time_is_always_measured() -> None:
    tasks = _tasks(3)
    history = _history(tasks, 3)
    history["t02"] = LastCheck(3, tasks[2].seed, tasks[2].interference, False)
    decisions = select(4, tasks, history, ValidationPolicy(sample=0))
    assert _measured(decisions) == {"t02": "failed"}
    assert decisions[2].detail == "failed the gate at version 3"


def test_all_measures_every_task() -> None:
    tasks = _tasks(4)
    decisions = select(5, tasks, _history(tasks, 5), ValidationPolicy(), everything=True)
    assert [(d.measured, d.reason, d.detail) for d in decisions] == [
        (True, "all", "all requested")
    ] * 4


def test_due_tasks_are_measured_whatever_the_sample() -> None:
    """A window is a promise: sample 0 still measures what reached it."""
    tasks = _tasks(3)
    history = {
        "t00": LastCheck(2, 100, 0.01, True),
        "t01": LastCheck(5, 101, 0.01, True),
        "t02": LastCheck(9, 102, 0.01, True),
    }
    decisions = select(10, tasks, history, ValidationPolicy(window=5, sample=0))
    assert _measured(decisions) == {"t00": "rotation", "t01": "rotation"}
    assert decisions[0].detail == "last validated at version 2 (due: window 5)"


def test_history_after_the_version_does_not_count() -> None:
    """Re-validating an older version: a later measurement says nothing about it."""
    tasks = _tasks(2)
    history = _history(tasks, 9)
    assert set(_measured(select(4, tasks, history, ValidationPolicy(sample=0)))) == {"t00", "t01"}


def _simulate(
    versions: int,
    policy: ValidationPolicy,
    *,
    start: int,
    every: int = 1,
    norms: dict[int, float] | None = None,
) -> tuple[list[int], int]:
    """A bundle of ``start`` tasks (all validated at version ``start``) growing by one
    task of equal energy a version, validated every ``every`` versions. Returns the
    retrievals of each validation and the worst age (versions since its last
    measurement) any task had in a validated version."""
    energy = {i: 1.0 for i in range(start)}
    history: dict[str, LastCheck] = {}

    def states(version: int) -> list[TaskState]:
        total = sum(energy.values())
        return [
            TaskState(f"t{i:03d}", i, max(i + 1, 1), (total - e) * 1e-4) for i, e in energy.items()
        ]

    for t in states(start):
        history[t.name] = LastCheck(start, t.seed, t.interference, True)
    costs: list[int] = []
    worst = 0
    for version in range(start + 1, start + 1 + versions):
        energy[version - 1] = (norms or {}).get(version, 1.0)
        if (version - start) % every:
            continue
        decisions = select(version, states(version), history, policy)
        costs.append(sum(d.measured for d in decisions))
        for d, t in zip(decisions, states(version), strict=True):
            if d.measured:
                history[d.task] = LastCheck(version, t.seed, t.interference, True)
        worst = max(worst, max(version - history[t.name].version for t in states(version)))
    return costs, worst


def test_steady_ingestion_into_32_tasks_stays_within_budget_and_window() -> None:
    """From 32 tasks to 47, one task a version: at most 8 retrievals each (1 new +
    ceil(existing / 8)), and no task's measurement ever DEFAULT_WINDOW versions old."""
    costs, worst = _simulate(16, ValidationPolicy(), start=31)
    assert costs[0] == 5 and max(costs) <= 8, costs
    assert worst < DEFAULT_WINDOW


@pytest.mark.parametrize("window", [1, 3, 8, 13])
@pytest.mark.parametrize("every", [1, 2, 5])
def test_every_task_is_measured_within_the_window(window: int, every: int) -> None:
    """Whatever the cadence: in each validated version, each task's last measurement is
    less than ``window`` versions old."""
    policy = ValidationPolicy(window=window)
    tasks = _tasks(20, r=0.01)
    history = _history(tasks, 20)
    last_seen = {t.name: 20 for t in tasks}
    for version in range(21, 21 + 6 * window * every, every):
        decisions = select(version, tasks, history, policy)
        for d in decisions:
            if d.measured:
                history[d.task] = LastCheck(version, d.seed, d.interference, True)
                last_seen[d.task] = version
        ages = {name: version - seen for name, seen in last_seen.items()}
        # measured now, or measured at most `window - 1` versions ago
        assert max(ages.values()) < window, (version, ages)
        if every == 1:
            assert sum(d.measured for d in decisions) == math.ceil(20 / window)


def test_an_outsized_task_triggers_the_drift_rule_for_everyone() -> None:
    costs, _ = _simulate(3, ValidationPolicy(), start=31, norms={33: 31.0})
    # versions 32, 33, 34: the task added at version 33 carries as much energy as the
    # 32 others together, doubling everyone's r_t: all 33 tasks are measured there
    assert costs == [5, 33, 6], costs


def test_predicted_interference_matches_scaling() -> None:
    """The manifest-only r_t is the data-free lambda's (randes.scaling)."""
    from randes.config import TransformConfig
    from randes.manifest import BaseRef, BundleManifest, ShardRef, TaskEntry

    def entry(name: str, seed: int, norm: float) -> TaskEntry:
        return TaskEntry(
            name=name,
            seed=seed,
            source_uri=f"file:///{name}",
            source_sha256="0" * 64,
            added_in_version=seed,
            delta_norms={"w": norm, "v": norm / 2},
        )

    manifest = BundleManifest(
        bundle="b",
        version=2,
        parent_version=1,
        created_at="2026-12-01T00:00:00Z",
        base=BaseRef(
            name="base",
            uri="file:///base",
            sha256="1" * 64,
            manifest_key="bases/base.json",
            manifest_sha256="3" * 64,
        ),
        transform=TransformConfig(),
        tasks=[entry("a", 1, 1.0), entry("b", 2, 3.0)],
        superposition=[ShardRef(key="shards/s", sha256="2" * 64, size=1, tensors=["w", "v"])],
    )
    base_norms = {"w": 10.0, "v": 5.0, "private": 100.0}
    r = predicted_interference(manifest, base_norms)
    norms = {"a": {"w": 1.0, "v": 0.5}, "b": {"w": 3.0, "v": 1.5}}
    assert r == {t: relative_interference(t, norms, base_norms, ["v", "w"]) for t in norms}
    assert r["a"] == pytest.approx((9 + 2.25) / 125)
