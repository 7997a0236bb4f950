"""Bundle groups in the registry, on real SQLite and real PostgreSQL (``registry_url``).

- a group is created once over a registered base, with a positive finite limit and a
  name that leaves room for its members' ``-<n>`` suffix;
- members are created at position len(members) + 1 only: a stale position is a
  GroupMemberConflictError (what a placement that lost the race sees), never a second
  member at the same position; a bundle outside the group holding ``<group>-<n>``
  pushes the member to the next free suffix;
- migration 0002 goes up and down with groups in it: downgrading drops the groups and
  leaves their member bundles as ordinary bundles.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from randes.errors import InvalidNameError
from storage.registry import (
    BaseNotFoundError,
    GroupExistsError,
    GroupMemberConflictError,
    GroupNotFoundError,
    InvalidValueError,
    Registry,
)
from tests.storage.registries import TRANSFORM, add_tiny_base, table_names, upgraded_registry


@pytest.fixture
def reg(registry_url: str) -> Iterator[Registry]:
    with upgraded_registry(registry_url, tiny_base=True) as registry:
        yield registry


def test_create_get_list_groups(reg: Registry) -> None:
    created = reg.create_group("g", "tiny", TRANSFORM, max_interference=0.05, gate_threshold=0.6)
    assert (created.name, created.base_name, created.max_interference) == ("g", "tiny", 0.05)
    assert reg.get_group("g") == created
    assert [g.name for g in reg.list_groups()] == ["g"]
    assert reg.group_members("g") == []

    with pytest.raises(GroupExistsError, match="'g' already exists"):
        reg.create_group("g", "tiny", TRANSFORM, max_interference=0.05)
    with pytest.raises(GroupNotFoundError, match="bundle group 'nope' does not exist"):
        reg.get_group("nope")
    with pytest.raises(GroupNotFoundError):
        reg.group_members("nope")
    with pytest.raises(BaseNotFoundError):
        reg.create_group("h", "nobase", TRANSFORM, max_interference=0.05)


@pytest.mark.parametrize("limit", [0.0, -1.0, float("nan"), float("inf")])
def test_limit_must_be_positive_and_finite(reg: Registry, limit: float) -> None:
    with pytest.raises(InvalidValueError, match="max_interference"):
        reg.create_group("g", "tiny", TRANSFORM, max_interference=limit)
    assert reg.list_groups() == []


def test_group_names_are_checked(reg: Registry) -> None:
    with pytest.raises(InvalidNameError, match="group name"):
        reg.create_group("../g", "tiny", TRANSFORM, max_interference=0.05)
    with pytest.raises(InvalidValueError, match="too long"):
        reg.create_group("g" * 125, "tiny", TRANSFORM, max_interference=0.05)
    assert reg.list_groups() == []


def test_members_take_consecutive_positions_once(reg: Registry) -> None:
    reg.create_group("g", "tiny", TRANSFORM, max_interference=0.05, gate_threshold=0.6)
    reg.create_bundle("g-2", "tiny", {})  # a bundle outside the group holds the next name

    first = reg.create_group_member("g", 1)
    assert (first.name, first.base_name, first.gate_threshold) == ("g-1", "tiny", 0.6)
    assert first.transform == TRANSFORM
    with pytest.raises(GroupMemberConflictError, match="member 1 of bundle group 'g'"):
        reg.create_group_member("g", 1)  # a placement that saw no member: look again
    with pytest.raises(GroupMemberConflictError):
        reg.create_group_member("g", 3)  # positions never skip
    second = reg.create_group_member("g", 2)
    assert second.name == "g-3"  # "g-2" belongs to another bundle
    assert [m.name for m in reg.group_members("g")] == ["g-1", "g-3"]
    assert reg.group_of("g-3") == "g" and reg.group_of("g-2") is None
    with pytest.raises(GroupNotFoundError):
        reg.create_group_member("nope", 1)
    with pytest.raises(InvalidValueError):
        reg.create_group_member("g", 0)


def test_migration_0002_up_and_down_with_data(registry_url: str) -> None:
    reg = Registry(registry_url)
    try:
        reg.upgrade("0001")
        assert "bundle_groups" not in table_names(registry_url)
        add_tiny_base(reg)
        reg.create_bundle("plain", "tiny", {})
        reg.upgrade("0002")
        assert reg.schema_revision() == "0002"
        assert {"bundle_groups", "bundle_group_members"} <= table_names(registry_url)
        reg.create_group("g", "tiny", TRANSFORM, max_interference=0.05)
        reg.create_group_member("g", 1)

        reg.downgrade("0001")
        assert reg.schema_revision() == "0001"
        assert not {"bundle_groups", "bundle_group_members"} & table_names(registry_url)
        assert [b.name for b in reg.list_bundles()] == ["g-1", "plain"]  # members stay

        reg.upgrade()
        assert reg.list_groups() == []
        reg.create_group("g", "tiny", TRANSFORM, max_interference=0.05)
        assert reg.create_group_member("g", 1).name == "g-2"  # g-1 is now a plain bundle
    finally:
        reg.close()
