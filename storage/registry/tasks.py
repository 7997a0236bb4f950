"""Tasks and the ingestion ledger: committing a version with the tasks it adds and
removes (`commit_version`, the registry's one multi-row write), listing the tasks present
in a version, and asking the ledger whether a checkpoint was folded already."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import CursorResult, delete, exists, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from randes.names import validate_name
from storage.registry.connection import RegistryCore
from storage.registry.errors import (
    AlreadyIngestedError,
    InvalidValueError,
    SeedConflictError,
    TaskExistsError,
    TaskNotFoundError,
    VersionConflictError,
)
from storage.registry.models import (
    UQ_LEDGER_SOURCE,
    UQ_TASK_LIVE_NAME,
    UQ_TASK_SEED,
    UQ_VERSION,
    Bundle,
    BundleVersion,
    IngestionLedger,
    Task,
    VersionObject,
)
from storage.registry.records import NewTask, TaskRecord, VersionRecord
from storage.registry.rows import (
    INT64_MAX,
    INT64_MIN,
    bundle_row,
    check_version_number,
    chunks,
    dupes,
    head_row,
    inserted,
    task_record,
    unique,
    version_record,
    version_row,
    violated,
)


class TasksMixin(RegistryCore):
    """`Registry` methods for committing versions, tasks and the ledger."""

    def commit_version(
        self,
        bundle: str,
        *,
        version: int,
        parent_version: int | None,
        manifest_key: str,
        manifest_sha256: str,
        object_keys: Sequence[str],
        added: Sequence[NewTask] = (),
        removed: Sequence[str] = (),
        ledger: Sequence[tuple[str, str]] = (),
    ) -> VersionRecord:
        """Make a new version visible, atomically, with everything it changes.

        In ONE transaction: the version row (status ``staged``), the store keys it
        references, its new tasks, the removal marks of `removed` tasks, and the ledger
        rows (source_sha256, task_name). Either all of it commits or none of it does.

        `version` must be head + 1 (0 or 1 for a bundle's first version), checked inside
        the transaction, so a writer working from a stale head can neither overwrite
        nor skip a number. Errors: AlreadyIngestedError (a ledger sha256 is already in
        the bundle; checked first, since it tells a fold to stop rather than retry),
        VersionConflictError (another writer took the number: rebuild on the new head),
        TaskExistsError, SeedConflictError, TaskNotFoundError (a removed task is not
        live), VersionNotFoundError (unknown parent).
        """
        check_version_number(version)
        if parent_version is not None:
            check_version_number(parent_version)
        for task in added:
            validate_name(task.name, "task name")
            if isinstance(task.seed, bool) or not isinstance(task.seed, int):
                raise InvalidValueError(f"seed of task {task.name!r} must be an integer")
            if not INT64_MIN <= task.seed <= INT64_MAX:
                raise InvalidValueError(
                    f"seed {task.seed} of task {task.name!r} does not fit a signed 64-bit integer"
                )
        ledger_shas = [sha for sha, _task in ledger]
        if dup := dupes(ledger_shas):
            raise InvalidValueError(f"checkpoint {dup[0]} appears twice in the ledger rows")
        keys = unique(object_keys)

        try:
            with self._tx(write=True) as s:
                b = bundle_row(s, bundle)

                def check_ledger() -> None:
                    if not ledger_shas:
                        return
                    _drop_stale_ledger_rows(s, b.id, ledger_shas)
                    hit = s.execute(
                        select(
                            IngestionLedger.source_sha256,
                            IngestionLedger.task_name,
                            IngestionLedger.version,
                        )
                        .where(
                            IngestionLedger.bundle_id == b.id,
                            IngestionLedger.source_sha256.in_(ledger_shas),
                        )
                        .limit(1)
                    ).first()
                    if hit is not None:
                        raise AlreadyIngestedError(bundle, hit[0], hit[1], hit[2])

                # 1. The ledger first: the same checkpoint twice is a no-op, not a retry.
                check_ledger()
                # 2. The head: only head + 1 may be committed.
                head = head_row(s, b)
                next_ok = (0, 1) if head is None else (head.version + 1,)
                if version not in next_ok:
                    # Under READ COMMITTED (PostgreSQL) a racer may have committed this
                    # very checkpoint between the ledger check and the head read: say so
                    # (stop), rather than "version taken" (rebuild and find it anyway).
                    check_ledger()
                    raise VersionConflictError(
                        bundle, version, head.version if head is not None else None
                    )
                if parent_version is not None:
                    version_row(s, b, parent_version)
                # 3. Tasks: clear errors for the common cases (the constraints back them).
                removed_set = set(removed)
                if added:
                    live = set(
                        s.scalars(
                            select(Task.name).where(
                                Task.bundle_id == b.id,
                                Task.removed_in_version.is_(None),
                                Task.name.in_([t.name for t in added]),
                            )
                        )
                    )
                    for t in added:
                        if t.name in live and t.name not in removed_set:
                            raise TaskExistsError(bundle, t.name)
                    used = set(
                        s.scalars(
                            select(Task.seed).where(
                                Task.bundle_id == b.id, Task.seed.in_([t.seed for t in added])
                            )
                        )
                    )
                    for t in added:
                        if t.seed in used:
                            raise SeedConflictError(bundle, t.seed)

                # Inserts, in the order that makes a racing loser fail most specifically.
                if ledger:
                    s.execute(
                        insert(IngestionLedger),
                        [
                            {
                                "bundle_id": b.id,
                                "source_sha256": sha,
                                "task_name": task_name,
                                "version": version,
                                "digest_kind": "content",
                            }
                            for sha, task_name in ledger
                        ],
                    )
                row = inserted(
                    s,
                    BundleVersion(
                        bundle_id=b.id,
                        version=version,
                        parent_version=parent_version,
                        status="staged",
                        manifest_key=manifest_key,
                        manifest_sha256=manifest_sha256,
                    ),
                )
                for chunk in chunks(keys):
                    s.execute(
                        insert(VersionObject),
                        [{"version_id": row.id, "key": k} for k in chunk],
                    )
                for name in removed:
                    result: CursorResult[Any] = s.execute(  # type: ignore[assignment]
                        update(Task)
                        .where(
                            Task.bundle_id == b.id,
                            Task.name == name,
                            Task.removed_in_version.is_(None),
                        )
                        .values(removed_in_version=version)
                    )
                    if result.rowcount != 1:
                        raise TaskNotFoundError(bundle, name)
                    # What remove takes out leaves the ledger too: folding that
                    # checkpoint again is a new fold, not "already folded".
                    s.execute(
                        delete(IngestionLedger).where(
                            IngestionLedger.bundle_id == b.id, IngestionLedger.task_name == name
                        )
                    )
                if added:
                    s.execute(
                        insert(Task),
                        [
                            {
                                "bundle_id": b.id,
                                "name": t.name,
                                "seed": t.seed,
                                "source_uri": t.source_uri,
                                "source_sha256": t.source_sha256,
                                "added_in_version": version,
                                "removed_in_version": None,
                            }
                            for t in added
                        ],
                    )
                return version_record(row, bundle)
        except IntegrityError as exc:
            constraint = violated(exc)
            if constraint == UQ_LEDGER_SOURCE:
                ingested = self._ingested(bundle, ledger_shas)
                raise ingested or AlreadyIngestedError(
                    bundle, ledger_shas[0] if ledger_shas else "?", None, None
                ) from None
            if constraint == UQ_VERSION:
                # the racer that took the number may have folded this very checkpoint
                if (ingested := self._ingested(bundle, ledger_shas)) is not None:
                    raise ingested from None
                raise VersionConflictError(bundle, version, None) from None
            if constraint == UQ_TASK_LIVE_NAME:
                dup_names = dupes(t.name for t in added)
                raise TaskExistsError(
                    bundle, dup_names[0] if dup_names else ", ".join(t.name for t in added)
                ) from None
            if constraint == UQ_TASK_SEED:
                dup_seeds = dupes(t.seed for t in added)
                raise SeedConflictError(bundle, dup_seeds[0] if dup_seeds else None) from None
            raise

    def _ingested(self, bundle: str, shas: Sequence[str]) -> AlreadyIngestedError | None:
        """The error for the first of ``shas`` the ledger holds (a racing writer folded it
        after our checks), or None."""
        for sha in shas:
            hit = self.ledger_lookup(bundle, sha)
            if hit is not None:
                return AlreadyIngestedError(bundle, sha, hit[0], hit[1])
        return None

    def tasks(
        self,
        bundle: str | None = None,
        *,
        version: int | None = None,
        include_removed: bool = False,
    ) -> list[TaskRecord]:
        """Tasks of one bundle (or all), as of `version` (default: now).

        A task is present in version v when added_in_version <= v and it was not removed
        by v (removed_in_version is NULL or > v). With `include_removed`, tasks removed
        by then are listed too (with their removed_in_version).
        """
        if version is not None and bundle is None:
            raise InvalidValueError("a version can only be given together with a bundle")
        with self._tx() as s:
            query = select(Task, Bundle.name).join(Bundle, Task.bundle_id == Bundle.id)
            if bundle is not None:
                b = bundle_row(s, bundle)
                query = query.where(Task.bundle_id == b.id)
                if version is not None:
                    version_row(s, b, version)
                    query = query.where(Task.added_in_version <= version)
                    if not include_removed:
                        query = query.where(
                            (Task.removed_in_version.is_(None))
                            | (Task.removed_in_version > version)
                        )
            if version is None and not include_removed:
                query = query.where(Task.removed_in_version.is_(None))
            rows = s.execute(query.order_by(Bundle.name, Task.added_in_version, Task.id)).all()
            return [task_record(t, name) for t, name in rows]

    def ledger_lookup(self, bundle: str, source_sha256: str) -> tuple[str, int] | None:
        """(task name, version) under which that checkpoint was folded in, or None."""
        with self._tx() as s:
            b = bundle_row(s, bundle)
            hit = s.execute(
                select(IngestionLedger.task_name, IngestionLedger.version).where(
                    IngestionLedger.bundle_id == b.id,
                    IngestionLedger.source_sha256 == source_sha256,
                    ~_task_removed_since(),
                )
            ).first()
            return None if hit is None else (hit[0], hit[1])

    def holds_file_digests(self, bundle: str) -> bool:
        """Whether the bundle's ledger may hold file-bytes digests (rows written before
        content digests, migration 0004): only then must a fold compute that digest of a
        checkpoint too, to find it in the ledger."""
        with self._tx() as s:
            b = bundle_row(s, bundle)
            hit = s.execute(
                select(IngestionLedger.id)
                .where(
                    IngestionLedger.bundle_id == b.id,
                    IngestionLedger.digest_kind.is_(None),
                    ~_task_removed_since(),
                )
                .limit(1)
            ).first()
            return hit is not None

    def used_seeds(self, bundle: str) -> set[int]:
        """Every seed the bundle ever used, removed tasks included (seeds are never reused)."""
        with self._tx() as s:
            b = bundle_row(s, bundle)
            return set(s.scalars(select(Task.seed).where(Task.bundle_id == b.id)))


def _task_removed_since(ledger: Any = IngestionLedger) -> Any:
    """The ledger row's task was removed: a registry whose `remove` predates removing
    ledger rows still holds rows for checkpoints no version has any more."""
    return exists().where(
        Task.bundle_id == ledger.bundle_id,
        Task.name == ledger.task_name,
        Task.added_in_version == ledger.version,
        Task.removed_in_version.is_not(None),
    )


def _drop_stale_ledger_rows(s: Session, bundle_id: int, shas: Sequence[str]) -> None:
    """Delete ledger rows of ``shas`` whose task was removed (see above), so that the
    checkpoint can be folded again instead of colliding with its old row."""
    s.execute(
        delete(IngestionLedger).where(
            IngestionLedger.bundle_id == bundle_id,
            IngestionLedger.source_sha256.in_(list(shas)),
            _task_removed_since(),
        )
    )
