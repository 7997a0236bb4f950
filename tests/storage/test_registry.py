"""The registry facade against real SQLite and real PostgreSQL (every test runs on both)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Literal

import pytest

from randes.errors import InvalidNameError, RandesError
from storage.registry import (
    AliasNotFoundError,
    AlreadyIngestedError,
    BaseExistsError,
    BaseNotFoundError,
    BundleExistsError,
    BundleNotFoundError,
    DatabaseUnavailableError,
    InvalidValueError,
    NewTask,
    NotFoundError,
    Registry,
    RegistryError,
    RejectedVersionError,
    SeedConflictError,
    TaskExistsError,
    TaskNotFoundError,
    VersionConflictError,
    VersionInUseError,
    VersionNotFoundError,
)
from tests.storage.registries import upgraded_registry


def sha(label: str) -> str:
    """A distinct, well-formed sha256 hex digest per label."""
    import hashlib

    return hashlib.sha256(label.encode()).hexdigest()


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    with upgraded_registry(registry_url) as reg:
        yield reg


@pytest.fixture
def bundle(registry: Registry) -> str:
    """A bundle `b` over base `base`, with no version yet."""
    registry.add_base("base", "file:///base", sha("base"), "bases/base.json", sha("bm"), ["k/b1"])
    registry.create_bundle("b", "base", {"maps": ["sign", "shuffle"], "scale": 0.5})
    return "b"


def commit(
    reg: Registry,
    version: int,
    *,
    added: list[NewTask] | None = None,
    removed: list[str] | None = None,
    keys: list[str] | None = None,
    bundle: str = "b",
    parent: int | None | Literal["previous"] = "previous",
    ledger: list[tuple[str, str]] | None = None,
) -> None:
    """Commit `version` on top of `parent` (by default version - 1), with a ledger row
    per added task unless `ledger` says which rows."""
    added = added or []
    reg.commit_version(
        bundle,
        version=version,
        parent_version=(version - 1 if version > 1 else None) if parent == "previous" else parent,
        manifest_key=f"manifests/{bundle}/{version}.json",
        manifest_sha256=sha(f"manifest {bundle} {version}"),
        object_keys=keys if keys is not None else [f"shards/{bundle}-{version}"],
        added=added,
        removed=removed or [],
        ledger=ledger if ledger is not None else [(t.source_sha256, t.name) for t in added],
    )


def task(name: str, seed: int) -> NewTask:
    return NewTask(name, seed, f"file:///ckpt/{name}-{seed}", sha(f"ckpt {name} {seed}"))


# -- schema ----------------------------------------------------------------------------


def test_upgrade_is_idempotent_and_reports_revision(registry: Registry) -> None:
    assert registry.schema_revision() == "0004"
    registry.upgrade()
    assert registry.schema_revision() == "0004"
    assert registry.backend in ("sqlite", "postgresql")


# -- bases -------------------------------------------------------------------------------


def test_bases(registry: Registry) -> None:
    rec = registry.add_base("gpt", "hf://org/gpt", sha("gpt"), "bases/gpt.json", sha("m"), ["a"])
    assert rec.name == "gpt" and rec.sha256 == sha("gpt")
    assert rec.created_at.tzinfo is not None and rec.created_at.utcoffset() == UTC.utcoffset(None)
    # Identical again (even from another uri): the same record, nothing new.
    again = registry.add_base("gpt", "file:///elsewhere", sha("gpt"), "x", sha("x"), ["zzz"])
    assert again == rec
    with pytest.raises(BaseExistsError) as err:
        registry.add_base("gpt", "hf://org/gpt", sha("other"), "bases/gpt.json", sha("m"), [])
    assert err.value.existing_sha256 == sha("gpt")
    registry.add_base("bert", "hf://org/bert", sha("bert"), "bases/bert.json", sha("m2"), [])
    assert [b.name for b in registry.list_bases()] == ["bert", "gpt"]
    assert registry.get_base("gpt") == rec
    with pytest.raises(BaseNotFoundError):
        registry.get_base("nope")
    assert {"a", "bases/gpt.json", "bases/bert.json"} <= registry.referenced_keys()
    assert "zzz" not in registry.referenced_keys()
    with pytest.raises(InvalidNameError):
        registry.add_base("../evil", "u", sha("e"), "k", sha("k"), [])


# -- bundles -----------------------------------------------------------------------------


def test_bundles(registry: Registry) -> None:
    registry.add_base("base", "file:///base", sha("base"), "bases/base.json", sha("bm"), [])
    transform = {"maps": ["sign"], "nested": {"dtype": "bf16", "rank1": False}, "k": 3}
    rec = registry.create_bundle("b1", "base", transform, gate_threshold=0.9)
    assert rec.base_name == "base" and rec.transform == transform and rec.gate_threshold == 0.9
    registry.create_bundle("a0", "base", {})
    assert registry.get_bundle("b1") == rec
    assert [b.name for b in registry.list_bundles()] == ["a0", "b1"]
    assert registry.get_bundle("a0").gate_threshold is None
    with pytest.raises(BundleExistsError):
        registry.create_bundle("b1", "base", {})
    with pytest.raises(BaseNotFoundError):
        registry.create_bundle("b2", "missing", {})
    with pytest.raises(BundleNotFoundError):
        registry.get_bundle("b2")
    for call in (
        lambda: registry.head("b2"),
        lambda: registry.list_versions("b2"),
        lambda: registry.tasks("b2"),
        lambda: registry.used_seeds("b2"),
        lambda: registry.ledger_lookup("b2", sha("x")),
        lambda: registry.aliases("b2"),
    ):
        with pytest.raises(BundleNotFoundError):
            call()


# -- versions ------------------------------------------------------------------------------


def test_versions_and_resolve(registry: Registry, bundle: str) -> None:
    assert registry.head(bundle) is None
    assert registry.list_versions(bundle) == []
    with pytest.raises(VersionNotFoundError):
        registry.resolve(bundle, None)
    commit(registry, 1, added=[task("t1", 11)])
    commit(registry, 2, added=[task("t2", 22)])
    head = registry.head(bundle)
    assert head is not None and head.version == 2 and head.parent_version == 1
    assert head.status == "staged" and head.bundle == bundle
    assert [v.version for v in registry.list_versions(bundle)] == [1, 2]
    assert registry.get_version(bundle, 1).manifest_key == "manifests/b/1.json"
    assert registry.resolve(bundle, None) == head
    assert registry.resolve(bundle, "1") == registry.get_version(bundle, 1)
    with pytest.raises(VersionNotFoundError):
        registry.get_version(bundle, 7)
    with pytest.raises(VersionNotFoundError):
        registry.resolve(bundle, "7")
    with pytest.raises(AliasNotFoundError):
        registry.resolve(bundle, "production")
    assert issubclass(AliasNotFoundError, NotFoundError)


def test_first_version_may_be_zero(registry: Registry, bundle: str) -> None:
    commit(registry, 0, keys=[])
    commit(registry, 1, added=[task("t", 1)])
    assert [v.version for v in registry.list_versions(bundle)] == [0, 1]


def test_commit_version_checks_the_head(registry: Registry, bundle: str) -> None:
    with pytest.raises(VersionConflictError):
        commit(registry, 2)  # nothing yet: the first version is 0 or 1
    commit(registry, 1, added=[task("t1", 1)])
    with pytest.raises(VersionConflictError) as err:
        commit(registry, 1, added=[task("t2", 2)])  # taken
    assert err.value.head == 1
    with pytest.raises(VersionConflictError):
        commit(registry, 3, added=[task("t2", 2)])  # a stale writer cannot skip 2
    with pytest.raises(VersionNotFoundError):
        commit(registry, 2, parent=9, keys=[])
    with pytest.raises(InvalidValueError):
        commit(registry, -1)
    with pytest.raises(BundleNotFoundError):
        commit(registry, 1, bundle="nope")
    # None of the failures left anything behind.
    assert [v.version for v in registry.list_versions(bundle)] == [1]
    assert registry.used_seeds(bundle) == {1}
    assert registry.ledger_lookup(bundle, task("t2", 2).source_sha256) is None


# -- tasks ---------------------------------------------------------------------------------


def test_tasks_present_in_each_version(registry: Registry, bundle: str) -> None:
    commit(registry, 1, added=[task("a", 1), task("b", 2)])
    commit(registry, 2, added=[task("c", 3)])
    commit(registry, 3, removed=["a"])
    commit(registry, 4, added=[task("a", 4)], removed=["b"])  # "a" comes back, new seed

    def names(version: int | None = None, include_removed: bool = False) -> list[tuple[str, int]]:
        return [
            (t.name, t.seed)
            for t in registry.tasks(bundle, version=version, include_removed=include_removed)
        ]

    assert names(1) == [("a", 1), ("b", 2)]
    assert names(2) == [("a", 1), ("b", 2), ("c", 3)]
    assert names(3) == [("b", 2), ("c", 3)]
    assert names(4) == [("c", 3), ("a", 4)]
    assert names() == [("c", 3), ("a", 4)]
    assert names(include_removed=True) == [("a", 1), ("b", 2), ("c", 3), ("a", 4)]
    assert names(3, include_removed=True) == [("a", 1), ("b", 2), ("c", 3)]
    old_a = registry.tasks(bundle, include_removed=True)[0]
    assert (old_a.added_in_version, old_a.removed_in_version) == (1, 3)
    assert old_a.present_in(2) and not old_a.present_in(3)
    assert registry.used_seeds(bundle) == {1, 2, 3, 4}
    with pytest.raises(VersionNotFoundError):
        registry.tasks(bundle, version=5)
    with pytest.raises(InvalidValueError):
        registry.tasks(version=1)

    # All bundles at once, grouped by bundle.
    registry.create_bundle("a-first", "base", {})
    commit(registry, 1, added=[task("x", 1)], bundle="a-first")
    assert [(t.bundle, t.name) for t in registry.tasks()] == [
        ("a-first", "x"),
        ("b", "c"),
        ("b", "a"),
    ]


def test_task_conflicts(registry: Registry, bundle: str) -> None:
    commit(registry, 1, added=[task("a", 1), task("b", 2)])
    commit(registry, 2, removed=["b"])
    with pytest.raises(TaskExistsError) as exists:
        commit(registry, 3, added=[task("a", 9)])
    assert exists.value.task == "a"
    with pytest.raises(SeedConflictError) as seed:
        commit(registry, 3, added=[task("c", 2)])  # b's seed: never reused, even removed
    assert seed.value.seed == 2
    with pytest.raises(TaskNotFoundError):
        commit(registry, 3, removed=["b"])  # already removed
    with pytest.raises(TaskNotFoundError):
        commit(registry, 3, removed=["zz"])
    with pytest.raises(InvalidValueError):
        commit(registry, 3, added=[task("big", 2**63)])
    with pytest.raises(InvalidNameError):
        commit(registry, 3, added=[task("a/b", 5)])
    # Remove and re-add the same name in one version (a retrained task): fine.
    commit(registry, 3, added=[task("a", 5)], removed=["a"])
    assert [(t.name, t.seed, t.added_in_version) for t in registry.tasks(bundle)] == [("a", 5, 3)]
    # Seeds span the whole signed 64-bit range.
    commit(registry, 4, added=[task("lo", -(2**63)), task("hi", 2**63 - 1)])
    assert {-(2**63), 2**63 - 1} <= registry.used_seeds(bundle)


def test_ledger(registry: Registry, bundle: str) -> None:
    t1 = task("t1", 1)
    commit(registry, 1, added=[t1])
    assert registry.ledger_lookup(bundle, t1.source_sha256) == ("t1", 1)
    assert registry.ledger_lookup(bundle, sha("unknown")) is None
    with pytest.raises(AlreadyIngestedError) as err:
        again = task("t1-again", 5)
        commit(registry, 2, added=[again], keys=[], ledger=[(t1.source_sha256, "t1-again")])
    assert (err.value.task_name, err.value.version) == ("t1", 1)
    assert err.value.source_sha256 == t1.source_sha256
    # The ledger is checked before the version number: a duplicate is a no-op, not a retry.
    with pytest.raises(AlreadyIngestedError):
        commit(registry, 1, keys=[], ledger=[(t1.source_sha256, "t1")])
    with pytest.raises(InvalidValueError):
        commit(registry, 2, keys=[], ledger=[(sha("z"), "z"), (sha("z"), "z2")])
    # Ledgers are per bundle.
    registry.create_bundle("other", "base", {})
    commit(registry, 1, added=[t1], bundle="other")
    assert registry.ledger_lookup("other", t1.source_sha256) == ("t1", 1)


def test_commit_version_is_atomic(registry: Registry, bundle: str) -> None:
    """A constraint failing on the last insert undoes every earlier insert of the call."""
    commit(registry, 1, added=[task("a", 1)], keys=["shards/one"])
    before = registry.referenced_keys()
    new_x, new_y = task("x", 7), task("y", 7)  # same seed twice: only the database sees it
    with pytest.raises(SeedConflictError) as err:
        commit(registry, 2, added=[new_x, new_y], removed=["a"], keys=["shards/two", "shards/one"])
    assert err.value.seed == 7
    assert [v.version for v in registry.list_versions(bundle)] == [1]
    assert registry.referenced_keys() == before
    assert registry.ledger_lookup(bundle, new_x.source_sha256) is None
    assert [t.name for t in registry.tasks(bundle)] == ["a"]  # removal undone too
    assert registry.used_seeds(bundle) == {1}
    with pytest.raises(TaskExistsError):
        commit(registry, 2, added=[task("d", 8), task("d", 9)])  # same name twice
    assert registry.head(bundle) is not None and registry.head(bundle).version == 1  # type: ignore[union-attr]
    # And the same commit, corrected, goes through with version 2.
    commit(registry, 2, added=[new_x], removed=["a"], keys=["shards/two", "shards/two"])
    assert {"shards/two", "manifests/b/2.json"} <= registry.referenced_keys()


# -- status, evaluations, aliases -----------------------------------------------------------


def test_status_and_publishing(registry: Registry, bundle: str) -> None:
    commit(registry, 1, added=[task("a", 1)])
    with pytest.raises(RejectedVersionError):
        registry.set_status(bundle, 1, "published")  # staged: not validated
    assert registry.set_status(bundle, 1, "rejected").status == "rejected"
    with pytest.raises(RejectedVersionError):
        registry.set_status(bundle, 1, "published")
    with pytest.raises(RejectedVersionError):
        registry.set_alias(bundle, "production", 1)
    assert registry.set_status(bundle, 1, "validated").status == "validated"
    assert registry.set_status(bundle, 1, "published").status == "published"
    assert registry.get_version(bundle, 1).status == "published"
    with pytest.raises(InvalidValueError):
        registry.set_status(bundle, 1, "shipped")
    with pytest.raises(VersionNotFoundError):
        registry.set_status(bundle, 2, "validated")


def test_evaluations(registry: Registry, bundle: str) -> None:
    commit(registry, 1, added=[task("a", 1), task("b", 2)])
    e1 = registry.add_evaluation(
        bundle, 1, "a", "accuracy", 0.9, reference=0.95, normalized=0.9 / 0.95
    )
    e2 = registry.add_evaluation(bundle, 1, "b", "accuracy", 0.5)
    assert (e1.bundle, e1.version, e1.reference) == (bundle, 1, 0.95)
    assert e2.reference is None and e2.normalized is None
    assert registry.evaluations(bundle, 1) == [e1, e2]
    with pytest.raises(InvalidValueError):
        registry.add_evaluation(bundle, 1, "a", "accuracy", float("nan"))
    with pytest.raises(VersionNotFoundError):
        registry.add_evaluation(bundle, 2, "a", "accuracy", 0.1)
    with pytest.raises(VersionNotFoundError):
        registry.evaluations(bundle, 2)


def test_aliases(registry: Registry, bundle: str) -> None:
    commit(registry, 1, added=[task("a", 1)])
    commit(registry, 2, added=[task("b", 2)])
    registry.set_status(bundle, 1, "validated")
    registry.set_status(bundle, 2, "validated")
    a1 = registry.set_alias(bundle, "production", 1)
    assert (a1.name, a1.version) == ("production", 1)
    assert registry.get_version(bundle, 1).status == "published"
    assert registry.resolve(bundle, "production").version == 1
    registry.set_alias(bundle, "canary", 2)
    a2 = registry.set_alias(bundle, "production", 2)  # moved, not duplicated
    assert a2.updated_at >= a1.updated_at
    assert [(a.name, a.version) for a in registry.aliases(bundle)] == [
        ("canary", 2),
        ("production", 2),
    ]
    assert registry.resolve(bundle, "production").version == 2
    with pytest.raises(InvalidValueError):
        registry.set_alias(bundle, "42", 2)
    with pytest.raises(VersionNotFoundError):
        registry.set_alias(bundle, "production", 9)


# -- gc support --------------------------------------------------------------------------


def test_referenced_keys_and_delete_versions(registry: Registry, bundle: str) -> None:
    commit(registry, 1, added=[task("a", 1)], keys=["s/shared", "s/one"])
    commit(registry, 2, added=[task("b", 2)], keys=["s/shared", "s/two"])
    commit(registry, 3, added=[task("c", 3)], keys=["s/shared", "s/three"])
    keys = registry.referenced_keys()
    assert {"s/shared", "s/one", "s/two", "s/three", "k/b1", "bases/base.json"} <= keys
    assert {"manifests/b/1.json", "manifests/b/2.json", "manifests/b/3.json"} <= keys
    registry.add_evaluation(bundle, 1, "a", "accuracy", 1.0)
    registry.set_status(bundle, 2, "validated")
    registry.set_alias(bundle, "production", 2)

    with pytest.raises(VersionInUseError):
        registry.delete_versions(bundle, [1, 2])  # 2 is aliased: nothing deleted
    with pytest.raises(VersionInUseError):
        registry.delete_versions(bundle, [3])  # the head keeps its number taken
    with pytest.raises(VersionNotFoundError):
        registry.delete_versions(bundle, [1, 8])
    assert [v.version for v in registry.list_versions(bundle)] == [1, 2, 3]

    registry.delete_versions(bundle, [1])
    assert [v.version for v in registry.list_versions(bundle)] == [2, 3]
    keys = registry.referenced_keys()
    assert "s/one" not in keys and "manifests/b/1.json" not in keys
    assert {"s/shared", "s/two", "s/three"} <= keys
    registry.delete_versions(bundle, [])
    # History stays: tasks and the ledger still know version 1.
    assert registry.tasks(bundle)[0].added_in_version == 1
    assert registry.ledger_lookup(bundle, task("a", 1).source_sha256) == ("a", 1)
    commit(registry, 4, added=[task("d", 4)])
    assert registry.head(bundle).version == 4  # type: ignore[union-attr]


def test_protected_versions(registry: Registry, bundle: str) -> None:
    assert registry.protected_versions(bundle) == set()  # no version yet
    for v in range(1, 6):
        commit(registry, v, added=[task(f"t{v}", v)])
    assert registry.protected_versions(bundle) == {5}  # the head only
    registry.set_status(bundle, 1, "validated")
    registry.set_status(bundle, 1, "published")  # published without an alias
    registry.set_status(bundle, 3, "validated")
    registry.set_alias(bundle, "production", 3)
    registry.set_status(bundle, 4, "validated")  # validated only: not protected
    assert registry.protected_versions(bundle) == {1, 3, 5}
    registry.set_status(bundle, 2, "validated")
    registry.set_alias(bundle, "production", 2)  # moved: 3 stays published
    assert registry.protected_versions(bundle) == {1, 2, 3, 5}
    registry.set_status(bundle, 3, "rejected")  # published no more, no alias
    assert registry.protected_versions(bundle) == {1, 2, 5}
    # What is not protected can be deleted; the head and aliased ones cannot.
    registry.delete_versions(bundle, [3, 4])
    assert [v.version for v in registry.list_versions(bundle)] == [1, 2, 5]
    assert registry.protected_versions(bundle) == {1, 2, 5}
    with pytest.raises(BundleNotFoundError):
        registry.protected_versions("nope")


def test_leases(registry: Registry) -> None:
    assert registry.leased_keys() == set()
    registry.lease(["s/a", "s/b", "s/a"], "fold-1", ttl_s=60)
    registry.lease(["s/b", "s/c"], "fold-2", ttl_s=60)
    assert registry.leased_keys() == {"s/a", "s/b", "s/c"}
    registry.lease(["s/a"], "fold-1", ttl_s=60)  # renewal: no duplicate-key error
    registry.release("fold-1")
    assert registry.leased_keys() == {"s/b", "s/c"}
    registry.lease(["s/short"], "fold-3", ttl_s=0.05)
    time.sleep(0.1)
    assert registry.leased_keys() == {"s/b", "s/c"}  # expired leases protect nothing
    registry.release("fold-2")
    registry.release("nobody")
    assert registry.leased_keys() == set()
    with pytest.raises(InvalidValueError):
        registry.lease(["s/a"], "fold-1", ttl_s=0)


def test_records_are_frozen(registry: Registry, bundle: str) -> None:
    commit(registry, 1, added=[task("a", 1)])
    record = registry.get_version(bundle, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "published"  # type: ignore[misc]
    assert registry.get_version(bundle, 1).status == "staged"


def test_errors_are_randes_errors() -> None:
    for cls in (
        AlreadyIngestedError,
        BaseExistsError,
        BundleExistsError,
        DatabaseUnavailableError,
        RejectedVersionError,
        SeedConflictError,
        TaskExistsError,
        VersionConflictError,
        VersionInUseError,
        BaseNotFoundError,
        TaskNotFoundError,
    ):
        assert issubclass(cls, RegistryError) and issubclass(cls, RandesError)


# -- unavailable databases (no fixture server needed) ----------------------------------


def test_unreachable_postgresql_hides_the_password() -> None:
    reg = Registry("postgresql+psycopg://randes:s3cr3t-pw@127.0.0.1:1/registry")
    with pytest.raises(DatabaseUnavailableError) as err:
        reg.list_bundles()
    assert "s3cr3t-pw" not in str(err.value)
    assert "127.0.0.1" in str(err.value)
    with pytest.raises(DatabaseUnavailableError):
        reg.upgrade()
    reg.close()


def test_unopenable_sqlite(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    reg = Registry(f"sqlite:///{blocker}/registry.db")
    with pytest.raises(DatabaseUnavailableError):
        reg.upgrade()
    with pytest.raises(DatabaseUnavailableError):
        reg.list_bases()
    reg.close()
