"""Bundle groups: a group over a base, its members ``<group>-<n>`` in placement order."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from randes.names import validate_name
from storage.registry.bundles import BundlesMixin
from storage.registry.errors import (
    GroupExistsError,
    GroupMemberConflictError,
    GroupNotFoundError,
    InvalidValueError,
)
from storage.registry.models import (
    UQ_BUNDLE_NAME,
    UQ_GROUP_NAME,
    UQ_GROUP_POSITION,
    BaseModel,
    Bundle,
    BundleGroup,
    BundleGroupMember,
)
from storage.registry.records import BundleRecord, GroupRecord
from storage.registry.rows import (
    GROUP_NAME_MAX,
    bundle_record,
    bundle_row,
    check_finite,
    group_record,
    group_row,
    inserted,
    raising_on,
    with_base_name,
)


class GroupsMixin(BundlesMixin):
    """`Registry` methods for bundle groups and their members (bundles themselves,
    created the same way)."""

    def create_group(
        self,
        name: str,
        base_name: str,
        transform: dict[str, Any],
        *,
        max_interference: float,
        gate_threshold: float | None = None,
    ) -> GroupRecord:
        """Create an empty bundle group over a registered base.

        Its members are named ``<name>-<n>``, so the name leaves room for the suffix.
        """
        validate_name(name, "group name")
        if len(name) > GROUP_NAME_MAX:
            raise InvalidValueError(
                f"group name {name[:40]!r}... is too long: its members are named "
                f"<group>-<n>, so a group name has at most {GROUP_NAME_MAX} characters"
            )
        limit = check_finite("max_interference", max_interference)
        if limit is None or limit <= 0:
            raise InvalidValueError(
                f"max_interference must be a number greater than 0, got {max_interference}"
            )
        gate = check_finite("gate_threshold", gate_threshold)
        row = BundleGroup(
            name=name, transform=dict(transform), gate_threshold=gate, max_interference=limit
        )
        return self._create_over_base(
            row, base_name, group_record, GroupExistsError(name), UQ_GROUP_NAME
        )

    def get_group(self, name: str) -> GroupRecord:
        return self._get_over_base(BundleGroup, group_record, name, GroupNotFoundError(name))

    def list_groups(self) -> list[GroupRecord]:
        return self._list_over_base(BundleGroup, group_record)

    def group_members(self, group: str) -> list[BundleRecord]:
        """The group's bundles in the order they were created (their positions)."""
        with self._tx() as s:
            g = group_row(s, group)
            rows = s.execute(
                with_base_name(Bundle)
                .join(BundleGroupMember, BundleGroupMember.bundle_id == Bundle.id)
                .where(BundleGroupMember.group_id == g.id)
                .order_by(BundleGroupMember.position)
            ).all()
            return [bundle_record(b, base) for b, base in rows]

    def group_of(self, bundle: str) -> str | None:
        """The group ``bundle`` belongs to, or None."""
        with self._tx() as s:
            b = bundle_row(s, bundle)
            return s.scalar(
                select(BundleGroup.name)
                .join(BundleGroupMember, BundleGroupMember.group_id == BundleGroup.id)
                .where(BundleGroupMember.bundle_id == b.id)
            )

    def create_group_member(self, group: str, position: int) -> BundleRecord:
        """Add member number ``position`` (1-based) to the group: a new empty bundle with
        the group's base, transform and gate, named ``<group>-<n>``.

        ``position`` must be the number of members the caller saw plus one, checked in
        the transaction: if another placement added a member meanwhile, this raises
        GroupMemberConflictError (as does losing the insert race on PostgreSQL), and the
        caller places again over the members as they are now, the new one included. The
        name is ``<group>-<position>``, or the next free suffix when a bundle outside
        the group already has that name.
        """
        if isinstance(position, bool) or not isinstance(position, int) or position < 1:
            raise InvalidValueError(f"member position must be an integer >= 1, got {position!r}")
        conflict = GroupMemberConflictError(group, position)
        with (
            raising_on((UQ_GROUP_POSITION, UQ_BUNDLE_NAME), conflict),
            self._tx(write=True) as s,
        ):
            g = group_row(s, group)
            last = s.scalar(
                select(BundleGroupMember.position)
                .where(BundleGroupMember.group_id == g.id)
                .order_by(BundleGroupMember.position.desc())
                .limit(1)
            )
            if (last or 0) + 1 != position:
                raise conflict
            taken = set(
                s.scalars(
                    select(Bundle.name).where(Bundle.name.startswith(f"{group}-", autoescape=True))
                )
            )
            suffix = position
            while f"{group}-{suffix}" in taken:
                suffix += 1
            row = inserted(
                s,
                Bundle(
                    name=f"{group}-{suffix}",
                    base_id=g.base_id,
                    transform=dict(g.transform),
                    gate_threshold=g.gate_threshold,
                ),
            )
            inserted(s, BundleGroupMember(bundle_id=row.id, group_id=g.id, position=position))
            base_name = s.scalar(select(BaseModel.name).where(BaseModel.id == g.base_id))
            assert base_name is not None
            return bundle_record(row, base_name)
