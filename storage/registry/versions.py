"""Versions and aliases: reading and resolving versions, moving their status, publishing
through an alias, and what retention may (`protected_versions`) or does
(`delete_versions`) delete. Committing a version is `tasks.TasksMixin.commit_version`."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from randes.names import validate_name
from storage.registry.connection import RegistryCore
from storage.registry.errors import (
    AliasNotFoundError,
    InvalidValueError,
    RejectedVersionError,
    VersionConflictError,
    VersionInUseError,
    VersionNotFoundError,
)
from storage.registry.models import (
    UQ_ALIAS,
    VERSION_STATUSES,
    Alias,
    Bundle,
    BundleVersion,
    utcnow,
)
from storage.registry.records import AliasRecord, VersionRecord
from storage.registry.rows import (
    DIGITS,
    bundle_row,
    head_row,
    version_record,
    version_row,
    violated,
)


def _publish(row: BundleVersion, bundle: str) -> None:
    """Mark ``row`` published: only a validated (or published) version may be."""
    if row.status not in ("validated", "published"):
        raise RejectedVersionError(bundle, row.version, row.status)
    row.status = "published"


def _aliased(s: Session, b: Bundle) -> dict[int, str]:
    """Version number -> the name of an alias that points at it."""
    return {
        v: name
        for v, name in s.execute(
            select(BundleVersion.version, Alias.name)
            .join(Alias, Alias.version_id == BundleVersion.id)
            .where(Alias.bundle_id == b.id)
        )
    }


class VersionsMixin(RegistryCore):
    """`Registry` methods for versions, their status and aliases."""

    def head(self, bundle: str) -> VersionRecord | None:
        """The highest-numbered version of the bundle (whatever its status), or None."""
        with self._tx() as s:
            row = head_row(s, bundle_row(s, bundle))
            return None if row is None else version_record(row, bundle)

    def get_version(self, bundle: str, version: int) -> VersionRecord:
        with self._tx() as s:
            return version_record(version_row(s, bundle_row(s, bundle), version), bundle)

    def list_versions(self, bundle: str) -> list[VersionRecord]:
        with self._tx() as s:
            b = bundle_row(s, bundle)
            rows = s.scalars(
                select(BundleVersion)
                .where(BundleVersion.bundle_id == b.id)
                .order_by(BundleVersion.version)
            )
            return [version_record(r, bundle) for r in rows]

    def resolve(self, bundle: str, ref: str | None) -> VersionRecord:
        """A version from a user reference: None -> head, digits -> that number, else an alias."""
        with self._tx() as s:
            b = bundle_row(s, bundle)
            if ref is None or ref == "":
                row = head_row(s, b)
                if row is None:
                    raise VersionNotFoundError(bundle, None)
                return version_record(row, bundle)
            if DIGITS.fullmatch(ref):
                return version_record(version_row(s, b, int(ref)), bundle)
            row = s.scalar(
                select(BundleVersion)
                .join(Alias, Alias.version_id == BundleVersion.id)
                .where(Alias.bundle_id == b.id, Alias.name == ref)
            )
            if row is None:
                raise AliasNotFoundError(bundle, ref)
            return version_record(row, bundle)

    def set_status(self, bundle: str, version: int, status: str) -> VersionRecord:
        """Move a version to `status`; ``published`` only from validated (or published)."""
        if status not in VERSION_STATUSES:
            raise InvalidValueError(
                f"unknown status {status!r}: expected one of {', '.join(VERSION_STATUSES)}"
            )
        with self._tx(write=True) as s:
            row = version_row(s, bundle_row(s, bundle), version, lock=True)
            if status == "published":
                _publish(row, bundle)
            row.status = status
            s.flush()
            return version_record(row, bundle)

    # -- retention ----------------------------------------------------------------------

    def protected_versions(self, bundle: str) -> set[int]:
        """The versions retention must keep: those an alias points at, those published,
        and the head (its number must stay taken, or the next fold would reuse it).

        What `randes gc --keep-last K` keeps besides the last K; `delete_versions`
        refuses the aliased ones and the head whatever the caller asks.
        """
        with self._tx() as s:
            b = bundle_row(s, bundle)
            kept = set(_aliased(s, b))
            kept.update(
                s.scalars(
                    select(BundleVersion.version).where(
                        BundleVersion.bundle_id == b.id, BundleVersion.status == "published"
                    )
                )
            )
            head = head_row(s, b)
            if head is not None:
                kept.add(head.version)
            return kept

    def delete_versions(self, bundle: str, versions: Sequence[int]) -> None:
        """Delete version rows (with their object keys and evaluations), for retention/gc.

        Refuses (VersionInUseError, nothing deleted) a version an alias names, a
        published one (its row locked, so a concurrent publish is seen), and the
        head: its number must stay taken, or the next fold would reuse it. Tasks and
        ledger rows stay: they are the bundle's history, not the version's.
        """
        if not versions:
            return
        with self._tx(write=True) as s:
            b = bundle_row(s, bundle)
            head = head_row(s, b)
            aliased = _aliased(s, b)
            ids = []
            for v in dict.fromkeys(versions):
                row = version_row(s, b, v, lock=True)
                if row.status == "published":
                    raise VersionInUseError(bundle, row.version, "it is published")
                if row.version in aliased:
                    raise VersionInUseError(
                        bundle, row.version, f"alias {aliased[row.version]!r} names it"
                    )
                if head is not None and row.version == head.version:
                    raise VersionInUseError(bundle, row.version, "it is the head")
                ids.append(row.id)
            s.execute(delete(BundleVersion).where(BundleVersion.id.in_(ids)))

    # -- aliases ------------------------------------------------------------------------

    def set_alias(self, bundle: str, alias: str, version: int) -> AliasRecord:
        """Point `alias` at `version` (created or moved atomically) and publish that version.

        Only a validated or published version may be aliased (RejectedVersionError).
        Alias names are never all digits, so `resolve` cannot confuse them with numbers.
        """
        validate_name(alias, "alias name")
        if DIGITS.fullmatch(alias):
            raise InvalidValueError(f"alias {alias!r} would read as a version number")
        for _attempt in range(3):
            try:
                with self._tx(write=True) as s:
                    b = bundle_row(s, bundle)
                    v = version_row(s, b, version, lock=True)
                    _publish(v, bundle)
                    row = s.scalar(
                        select(Alias)
                        .where(Alias.bundle_id == b.id, Alias.name == alias)
                        .with_for_update()
                    )
                    now = utcnow()
                    if row is None:
                        row = Alias(bundle_id=b.id, name=alias, version_id=v.id, updated_at=now)
                        s.add(row)
                    else:
                        row.version_id = v.id
                        row.updated_at = now
                    s.flush()
                    return AliasRecord(bundle, alias, version, row.updated_at)
            except IntegrityError as exc:
                # Two writers created the alias at once (PostgreSQL): move it instead.
                if violated(exc) != UQ_ALIAS:
                    raise
        raise VersionConflictError(bundle, version, None)

    def aliases(self, bundle: str) -> list[AliasRecord]:
        with self._tx() as s:
            b = bundle_row(s, bundle)
            rows = s.execute(
                select(Alias.name, BundleVersion.version, Alias.updated_at)
                .join(BundleVersion, Alias.version_id == BundleVersion.id)
                .where(Alias.bundle_id == b.id)
                .order_by(Alias.name)
            ).all()
            return [AliasRecord(bundle, name, v, at) for name, v, at in rows]
