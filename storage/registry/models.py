"""ORM schema of the registry (SQLAlchemy 2 typed declarative).

This module describes the schema; Alembic migrations (``migrations/versions``) are
what create and change it. A test checks that both agree (autogenerate finds no diff),
which is why every constraint has a deterministic name: unnamed constraints get
database-chosen names that differ between SQLite and PostgreSQL and make
autogenerate and downgrades unstable.

Timestamps are stored in UTC. Object keys get a table per owner kind
(`version_objects`, `base_objects`) so foreign keys cascade on delete and `gc` can
take the union of both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

VERSION_STATUSES: tuple[str, ...] = ("staged", "validated", "published", "rejected")

NAME_LEN = 128
SHA256_LEN = 64
KEY_LEN = 512

# Constraint names the registry maps to specific errors (see registry._violated).
UQ_BASE_NAME = "uq_base_models_name"
UQ_BUNDLE_NAME = "uq_bundles_name"
UQ_VERSION = "uq_bundle_versions_bundle_id_version"
UQ_TASK_LIVE_NAME = "uq_tasks_bundle_id_name_live"
UQ_TASK_SEED = "uq_tasks_bundle_id_seed"
UQ_LEDGER_SOURCE = "uq_ingestion_ledger_bundle_id_source_sha256"
UQ_ALIAS = "uq_aliases_bundle_id_name"
UQ_GROUP_NAME = "uq_bundle_groups_name"
UQ_GROUP_POSITION = "uq_bundle_group_members_group_id_position"
PK_GROUP_MEMBER = "pk_bundle_group_members"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones and returns naive
    values, so they are stored as naive UTC and given back their UTC zone on the
    way out. Callers always see aware datetimes and can compare them.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class BaseModel(Base):
    """A registered base model, stored once and shared by every bundle built on it."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    manifest_key: Mapped[str] = mapped_column(String(KEY_LEN))
    manifest_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Bundle(Base):
    """A named superposition over one base with a fixed transform configuration."""

    __tablename__ = "bundles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    transform: Mapped[dict[str, Any]] = mapped_column(JSON)
    gate_threshold: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BundleGroup(Base):
    """Bundles of one base and transform that share tasks out under a capacity limit.

    The group is its own row, not a property of its bundles: it exists before its first
    member (``randes group create``) and carries the template every new member is
    created from (base, transform, gate) plus the limit on any member's relative
    interference r_t (randes.capacity).
    """

    __tablename__ = "bundle_groups"
    __table_args__ = (CheckConstraint("max_interference > 0", name="max_interference_positive"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    transform: Mapped[dict[str, Any]] = mapped_column(JSON)
    gate_threshold: Mapped[float | None] = mapped_column(Float)
    max_interference: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BundleGroupMember(Base):
    """A bundle's place in its group: at most one group per bundle (the primary key),
    one bundle per position (the unique constraint two racing placements collide on).

    A separate table rather than a column on ``bundles``: adding (and, on downgrade,
    dropping) a foreign-key column on SQLite means rebuilding ``bundles``, which every
    other table references; a table of its own is created and dropped whole.
    """

    __tablename__ = "bundle_group_members"
    __table_args__ = (
        PrimaryKeyConstraint("bundle_id", name=PK_GROUP_MEMBER),
        UniqueConstraint("group_id", "position", name=UQ_GROUP_POSITION),
        CheckConstraint("position >= 1", name="position_positive"),
    )

    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"))
    group_id: Mapped[int] = mapped_column(ForeignKey("bundle_groups.id"))
    position: Mapped[int] = mapped_column(Integer)


class BundleVersion(Base):
    """One immutable version of a bundle; visible once its row commits."""

    __tablename__ = "bundle_versions"
    __table_args__ = (
        UniqueConstraint("bundle_id", "version", name=UQ_VERSION),
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in VERSION_STATUSES) + ")",
            name="status",
        ),
        CheckConstraint("version >= 0", name="version_nonnegative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"))
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="staged")
    manifest_key: Mapped[str] = mapped_column(String(KEY_LEN))
    manifest_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Task(Base):
    """A task folded into a bundle, present in versions [added_in_version, removed_in_version).

    Task names are unique among the *live* tasks of a bundle (a partial unique index),
    so a task folded out can later be folded in again under the same name; seeds are
    unique over the bundle's whole history, so a seed is never reused.
    """

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("bundle_id", "seed", name=UQ_TASK_SEED),
        Index(
            UQ_TASK_LIVE_NAME,
            "bundle_id",
            "name",
            unique=True,
            sqlite_where=text("removed_in_version IS NULL"),
            postgresql_where=text("removed_in_version IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"))
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    seed: Mapped[int] = mapped_column(BigInteger)
    source_uri: Mapped[str] = mapped_column(Text)
    source_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    added_in_version: Mapped[int] = mapped_column(Integer)
    removed_in_version: Mapped[int | None] = mapped_column(Integer)


class IngestionLedger(Base):
    """Every checkpoint folded into a bundle, by content: folding it twice is a no-op."""

    __tablename__ = "ingestion_ledger"
    __table_args__ = (UniqueConstraint("bundle_id", "source_sha256", name=UQ_LEDGER_SOURCE),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"))
    source_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    task_name: Mapped[str] = mapped_column(String(NAME_LEN))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    digest_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """``content`` (randes.digests); NULL in rows written before migration 0004, which
    may hold the file-bytes digest of the era before content digests."""


class Evaluation(Base):
    """One metric of one task measured on one version (validation results)."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("bundle_versions.id", ondelete="CASCADE"), index=True
    )
    task_name: Mapped[str] = mapped_column(String(NAME_LEN))
    metric: Mapped[str] = mapped_column(String(NAME_LEN))
    value: Mapped[float] = mapped_column(Float)
    reference: Mapped[float | None] = mapped_column(Float)
    normalized: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Alias(Base):
    """A movable name (``production``) for one version of a bundle."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("bundle_id", "name", name=UQ_ALIAS),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bundle_id: Mapped[int] = mapped_column(ForeignKey("bundles.id"))
    name: Mapped[str] = mapped_column(String(NAME_LEN))
    version_id: Mapped[int] = mapped_column(ForeignKey("bundle_versions.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VersionObject(Base):
    """A store key a bundle version references (shards, private tensors); for gc."""

    __tablename__ = "version_objects"
    __table_args__ = (PrimaryKeyConstraint("version_id", "key"),)

    version_id: Mapped[int] = mapped_column(ForeignKey("bundle_versions.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(KEY_LEN))


class BaseObject(Base):
    """A store key a base model references; for gc."""

    __tablename__ = "base_objects"
    __table_args__ = (PrimaryKeyConstraint("base_id", "key"),)

    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(KEY_LEN))


class ObjectLease(Base):
    """A key a running writer is producing but has not committed yet: gc must keep it.

    Keyed by (key, owner) because two folds may write the same content-addressed shard.
    """

    __tablename__ = "object_leases"
    __table_args__ = (PrimaryKeyConstraint("key", "owner"),)

    key: Mapped[str] = mapped_column(String(KEY_LEN))
    owner: Mapped[str] = mapped_column(String(NAME_LEN * 2))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
