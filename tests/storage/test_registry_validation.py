"""Validation checks and policies in the registry, on real SQLite and PostgreSQL.

- a bundle's policy: the defaults until set, fields set one at a time, a reset, values
  out of range refused before any write;
- checks: one validation run's decisions recorded in one go; `last_checks` answers each
  task's latest *measurement* at or before a version (skips do not count, a second run
  of the same version wins over the first);
- the history outlives retention: deleting an old version keeps its checks;
- migration 0003 goes up and down with checks in it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from randes.validation_policy import Decision, LastCheck, ValidationPolicy
from storage.registry import (
    BundleNotFoundError,
    InvalidValueError,
    Registry,
    VersionNotFoundError,
)
from storage.registry.validation import CheckRow
from tests.storage.registries import TRANSFORM, commit_empty, table_names, upgraded_registry


@pytest.fixture
def reg(registry_url: str) -> Iterator[Registry]:
    with upgraded_registry(registry_url, tiny_base=True) as registry:
        registry.create_bundle("b", "tiny", TRANSFORM)
        for v in (1, 2, 3):
            commit_empty(registry, "b", v, f"manifests/b/{v}.json")
        yield registry


def _row(
    task: str, *, measured: bool = True, passed: bool = True, r: float = 0.01, seed: int = 1
) -> CheckRow:
    reason = "rotation" if measured else "skipped"
    return CheckRow(Decision(task, seed, measured, reason, f"{reason} detail", r), passed)


def test_policy_defaults_set_and_reset(reg: Registry) -> None:
    assert reg.validation_policy("b") == ValidationPolicy()
    assert reg.set_validation_policy("b", window=4) == ValidationPolicy(window=4)
    assert reg.set_validation_policy("b", drift=0.1, sample=3) == ValidationPolicy(
        drift=0.1, window=4, sample=3
    )
    assert reg.validation_policy("b") == ValidationPolicy(drift=0.1, window=4, sample=3)
    assert reg.set_validation_policy("b", reset=True, sample=1) == ValidationPolicy(sample=1)
    assert reg.validation_policy("b") == ValidationPolicy(sample=1)


@pytest.mark.parametrize(
    "fields", [{"drift": -1.0}, {"drift": float("nan")}, {"window": 0}, {"sample": -2}]
)
def test_policy_out_of_range_is_refused_and_nothing_changes(
    reg: Registry, fields: dict[str, float]
) -> None:
    reg.set_validation_policy("b", window=5)
    with pytest.raises(InvalidValueError, match="validation policy of 'b'"):
        reg.set_validation_policy("b", **fields)  # type: ignore[arg-type]
    assert reg.validation_policy("b") == ValidationPolicy(window=5)


def test_policy_of_an_unknown_bundle(reg: Registry) -> None:
    with pytest.raises(BundleNotFoundError):
        reg.validation_policy("nope")
    with pytest.raises(BundleNotFoundError):
        reg.set_validation_policy("nope", window=2)


def test_checks_are_recorded_and_the_last_measurement_is_found(reg: Registry) -> None:
    reg.record_checks("b", 1, [_row("a", r=0.01), _row("c", r=0.02, passed=False)])
    reg.record_checks("b", 2, [_row("a", measured=False), _row("c", r=0.03)])
    reg.record_checks("b", 3, [_row("a", r=0.05), _row("c", measured=False)])

    assert reg.last_checks("b", up_to=1) == {
        "a": LastCheck(1, 1, 0.01, True),
        "c": LastCheck(1, 1, 0.02, False),
    }
    # version 2 skipped "a": its last measurement stays version 1
    assert reg.last_checks("b", up_to=2) == {
        "a": LastCheck(1, 1, 0.01, True),
        "c": LastCheck(2, 1, 0.03, True),
    }
    assert reg.last_checks("b", up_to=3) == {
        "a": LastCheck(3, 1, 0.05, True),
        "c": LastCheck(2, 1, 0.03, True),
    }
    rows = reg.validation_checks("b", 2)
    assert [(c.task, c.measured, c.reason, c.passed) for c in rows] == [
        ("a", False, "skipped", None),
        ("c", True, "rotation", True),
    ]
    assert [c.version for c in reg.validation_checks("b")] == [1, 1, 2, 2, 3, 3]


def test_a_second_run_of_a_version_wins(reg: Registry) -> None:
    reg.record_checks("b", 2, [_row("a", passed=False)])
    reg.record_checks("b", 2, [_row("a", passed=True, r=0.04)])
    assert reg.last_checks("b", up_to=3) == {"a": LastCheck(2, 1, 0.04, True)}


def test_checks_of_unknown_versions_and_bundles_are_refused(reg: Registry) -> None:
    with pytest.raises(VersionNotFoundError):
        reg.record_checks("b", 9, [_row("a")])
    with pytest.raises(BundleNotFoundError):
        reg.record_checks("nope", 1, [_row("a")])
    assert reg.validation_checks("b") == []


def test_the_history_outlives_retention(reg: Registry) -> None:
    reg.record_checks("b", 1, [_row("a", seed=7)])
    reg.delete_versions("b", [1])
    assert reg.last_checks("b", up_to=3) == {"a": LastCheck(1, 7, 0.01, True)}


def test_migration_0003_up_and_down_with_checks(registry_url: str) -> None:
    with upgraded_registry(registry_url, tiny_base=True) as registry:
        registry.create_bundle("b", "tiny", TRANSFORM)
        commit_empty(registry, "b", 1, "m/1.json")
        registry.record_checks("b", 1, [_row("a")])
        registry.set_validation_policy("b", window=3)

        registry.downgrade("0002")
        tables = table_names(registry_url)
        assert not tables & {"validation_checks", "validation_policies"}
        assert registry.get_bundle("b").name == "b"  # the bundle stays

        registry.upgrade()
        assert registry.validation_checks("b") == []
        assert registry.validation_policy("b") == ValidationPolicy()
