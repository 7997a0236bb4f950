"""What validations measured, and each bundle's validation policy, in the registry.

A validation measures only part of a version (randes.validation_policy): new tasks,
tasks whose predicted interference moved, and a rotating sample of the rest. Choosing
needs, per task, the version it was last measured at, its predicted interference then
and whether it passed: `validation_checks` keeps one row per task per validation run,
measured or skipped, with the reason in words, so the registry also answers "why was
this task (not) measured in version v". Rows hang on the bundle and a version number,
not on the version row: retention may delete old versions, and the history of when a
task was last measured must outlive them (or every task would turn "new" again).

`validation_policies` holds a bundle's own drift / window / sample; a missing row or a
NULL column means the default of randes.validation_policy, so defaults can improve
without a migration. Both are tables of their own, so `bundles` is never rebuilt.

`ValidationMixin` is mixed into `Registry`: the methods share its transactions and
error translation (`RegistryCore`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from randes.validation_policy import REASONS, Decision, LastCheck, ValidationPolicy
from storage.registry.connection import RegistryCore
from storage.registry.errors import InvalidValueError
from storage.registry.models import NAME_LEN, Base, UTCDateTime, utcnow
from storage.registry.rows import bundle_row, version_row


class ValidationCheck(Base):
    """One task's selection in one validation run: measured or skipped, and why."""

    __tablename__ = "validation_checks"
    __table_args__ = (
        CheckConstraint("reason IN (" + ", ".join(f"'{r}'" for r in REASONS) + ")", name="reason"),
        CheckConstraint("version >= 0", name="version_nonnegative"),
        Index("ix_validation_checks_bundle_id_version", "bundle_id", "version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"))
    version: Mapped[int] = mapped_column(Integer)
    task_name: Mapped[str] = mapped_column(String(NAME_LEN))
    seed: Mapped[int] = mapped_column(BigInteger)
    measured: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str] = mapped_column(Text)
    interference: Mapped[float] = mapped_column(Float)
    passed: Mapped[bool | None] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ValidationPolicyRow(Base):
    """A bundle's own validation policy; NULL columns take the defaults."""

    __tablename__ = "validation_policies"
    __table_args__ = (
        CheckConstraint("drift >= 0", name="drift_nonnegative"),
        CheckConstraint("window_versions >= 1", name="window_positive"),
        CheckConstraint("sample_size >= 0", name="sample_nonnegative"),
    )

    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"), primary_key=True)
    drift: Mapped[float | None] = mapped_column(Float)
    window_versions: Mapped[int | None] = mapped_column(Integer)
    sample_size: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


@dataclass(frozen=True)
class CheckRow:
    """A decision to record (what `ValidationMixin.record_checks` takes): whether the
    measured task passed the gate, None for a skipped one."""

    decision: Decision
    passed: bool | None


@dataclass(frozen=True)
class CheckRecord:
    bundle: str
    version: int
    task: str
    seed: int
    measured: bool
    reason: str
    detail: str
    interference: float
    passed: bool | None
    created_at: datetime


class ValidationMixin(RegistryCore):
    """`Registry` methods over the two tables."""

    # -- policy -------------------------------------------------------------------------

    def validation_policy(self, bundle: str) -> ValidationPolicy:
        """The bundle's policy: its own settings over the defaults."""
        with self._tx() as s:
            row = s.get(ValidationPolicyRow, bundle_row(s, bundle).id)
            return _policy(row)

    def set_validation_policy(
        self,
        bundle: str,
        *,
        drift: float | None = None,
        window: int | None = None,
        sample: int | None = None,
        reset: bool = False,
    ) -> ValidationPolicy:
        """Set the given fields (None keeps one); ``reset`` first returns to the defaults.

        Values are checked as the policy checks them (InvalidValueError), before any
        write."""
        with self._tx(write=True) as s:
            bundle_id = bundle_row(s, bundle).id
            row = s.get(ValidationPolicyRow, bundle_id, with_for_update=True)
            if row is None:
                row = ValidationPolicyRow(bundle_id=bundle_id)
                s.add(row)
            if reset:
                row.drift = row.window_versions = row.sample_size = None
            row.drift = row.drift if drift is None else drift
            row.window_versions = row.window_versions if window is None else window
            row.sample_size = row.sample_size if sample is None else sample
            try:
                policy = _policy(row)
            except ValueError as exc:
                raise InvalidValueError(f"validation policy of {bundle!r}: {exc}") from None
            row.updated_at = utcnow()
            return policy

    # -- checks -------------------------------------------------------------------------

    def record_checks(self, bundle: str, version: int, checks: Sequence[CheckRow]) -> None:
        """Record one validation run's decisions for ``version``, in one transaction."""
        with self._tx(write=True) as s:
            b = bundle_row(s, bundle)
            version_row(s, b, version)  # an existing version only
            bundle_id = b.id
            s.add_all(
                ValidationCheck(
                    bundle_id=bundle_id,
                    version=version,
                    task_name=c.decision.task,
                    seed=c.decision.seed,
                    measured=c.decision.measured,
                    reason=c.decision.reason,
                    detail=c.decision.detail,
                    interference=c.decision.interference,
                    passed=c.passed if c.decision.measured else None,
                )
                for c in checks
            )

    def validation_checks(self, bundle: str, version: int | None = None) -> list[CheckRecord]:
        """Every recorded decision of one version (or all versions), oldest first."""
        with self._tx() as s:
            query = select(ValidationCheck).where(
                ValidationCheck.bundle_id == bundle_row(s, bundle).id
            )
            if version is not None:
                query = query.where(ValidationCheck.version == version)
            rows = s.scalars(query.order_by(ValidationCheck.version, ValidationCheck.id))
            return [_record(r, bundle) for r in rows]

    def last_checks(self, bundle: str, *, up_to: int) -> dict[str, LastCheck]:
        """Each task name's latest measurement at a version <= ``up_to``.

        Latest by version, then by run (a version validated twice: the second run's)."""
        with self._tx() as s:
            rank = (
                func.row_number()
                .over(
                    partition_by=ValidationCheck.task_name,
                    order_by=(ValidationCheck.version.desc(), ValidationCheck.id.desc()),
                )
                .label("rank")
            )
            ranked = (
                select(ValidationCheck.id, rank)
                .where(
                    ValidationCheck.bundle_id == bundle_row(s, bundle).id,
                    ValidationCheck.measured.is_(True),
                    ValidationCheck.version <= up_to,
                )
                .subquery()
            )
            rows = s.scalars(
                select(ValidationCheck)
                .join(ranked, ValidationCheck.id == ranked.c.id)
                .where(ranked.c.rank == 1)
            )
            return {
                r.task_name: LastCheck(r.version, r.seed, r.interference, bool(r.passed))
                for r in rows
            }


def _policy(row: ValidationPolicyRow | None) -> ValidationPolicy:
    default = ValidationPolicy()
    if row is None:
        return default
    return ValidationPolicy(
        drift=default.drift if row.drift is None else row.drift,
        window=default.window if row.window_versions is None else row.window_versions,
        sample=row.sample_size,
    )


def _record(row: ValidationCheck, bundle: str) -> CheckRecord:
    return CheckRecord(
        bundle=bundle,
        version=row.version,
        task=row.task_name,
        seed=row.seed,
        measured=row.measured,
        reason=row.reason,
        detail=row.detail,
        interference=row.interference,
        passed=row.passed,
        created_at=row.created_at,
    )


__all__ = [
    "CheckRecord",
    "CheckRow",
    "ValidationCheck",
    "ValidationPolicyRow",
    "ValidationMixin",
]
