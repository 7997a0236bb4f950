"""initial registry schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Base models, bundles, bundle versions, tasks, the ingestion ledger, evaluations,
aliases, the store keys each version / base references (for gc) and object leases.
Written against `sa` types only (not the application's), so it keeps meaning the same
schema however `storage.registry.models` evolves.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = sa.String(length=128)
SHA256 = sa.String(length=64)
KEY = sa.String(length=512)


def _timestamp(name: str) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", SHA256, nullable=False),
        sa.Column("manifest_key", KEY, nullable=False),
        sa.Column("manifest_sha256", SHA256, nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )
    op.create_table(
        "object_leases",
        sa.Column("key", KEY, nullable=False),
        sa.Column("owner", sa.String(length=256), nullable=False),
        _timestamp("expires_at"),
        sa.PrimaryKeyConstraint("key", "owner", name=op.f("pk_object_leases")),
    )
    op.create_index(
        op.f("ix_object_leases_expires_at"), "object_leases", ["expires_at"], unique=False
    )
    op.create_table(
        "base_objects",
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("key", KEY, nullable=False),
        sa.ForeignKeyConstraint(
            ["base_id"],
            ["base_models.id"],
            name=op.f("fk_base_objects_base_id_base_models"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("base_id", "key", name=op.f("pk_base_objects")),
    )
    op.create_table(
        "bundles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("transform", sa.JSON(), nullable=False),
        sa.Column("gate_threshold", sa.Float(), nullable=True),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["base_id"], ["base_models.id"], name=op.f("fk_bundles_base_id_base_models")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundles")),
        sa.UniqueConstraint("name", name=op.f("uq_bundles_name")),
    )
    op.create_table(
        "bundle_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("manifest_key", KEY, nullable=False),
        sa.Column("manifest_sha256", SHA256, nullable=False),
        _timestamp("created_at"),
        sa.CheckConstraint(
            "status IN ('staged', 'validated', 'published', 'rejected')",
            name=op.f("ck_bundle_versions_status"),
        ),
        sa.CheckConstraint("version >= 0", name=op.f("ck_bundle_versions_version_nonnegative")),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name=op.f("fk_bundle_versions_bundle_id_bundles")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundle_versions")),
        sa.UniqueConstraint("bundle_id", "version", name="uq_bundle_versions_bundle_id_version"),
    )
    op.create_table(
        "ingestion_ledger",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("source_sha256", SHA256, nullable=False),
        sa.Column("task_name", NAME, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name=op.f("fk_ingestion_ledger_bundle_id_bundles")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_ledger")),
        sa.UniqueConstraint(
            "bundle_id", "source_sha256", name="uq_ingestion_ledger_bundle_id_source_sha256"
        ),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("source_uri", sa.Text(), nullable=False),
        sa.Column("source_sha256", SHA256, nullable=False),
        sa.Column("added_in_version", sa.Integer(), nullable=False),
        sa.Column("removed_in_version", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name=op.f("fk_tasks_bundle_id_bundles")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("bundle_id", "seed", name="uq_tasks_bundle_id_seed"),
    )
    # Live task names are unique; a task folded out may come back under its name.
    op.create_index(
        "uq_tasks_bundle_id_name_live",
        "tasks",
        ["bundle_id", "name"],
        unique=True,
        sqlite_where=sa.text("removed_in_version IS NULL"),
        postgresql_where=sa.text("removed_in_version IS NULL"),
    )
    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name=op.f("fk_aliases_bundle_id_bundles")
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["bundle_versions.id"],
            name=op.f("fk_aliases_version_id_bundle_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aliases")),
        sa.UniqueConstraint("bundle_id", "name", name="uq_aliases_bundle_id_name"),
    )
    op.create_index(op.f("ix_aliases_version_id"), "aliases", ["version_id"], unique=False)
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("task_name", NAME, nullable=False),
        sa.Column("metric", NAME, nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("reference", sa.Float(), nullable=True),
        sa.Column("normalized", sa.Float(), nullable=True),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["bundle_versions.id"],
            name=op.f("fk_evaluations_version_id_bundle_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index(op.f("ix_evaluations_version_id"), "evaluations", ["version_id"], unique=False)
    op.create_table(
        "version_objects",
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("key", KEY, nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["bundle_versions.id"],
            name=op.f("fk_version_objects_version_id_bundle_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("version_id", "key", name=op.f("pk_version_objects")),
    )


def downgrade() -> None:
    op.drop_table("version_objects")
    op.drop_index(op.f("ix_evaluations_version_id"), table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_index(op.f("ix_aliases_version_id"), table_name="aliases")
    op.drop_table("aliases")
    op.drop_index("uq_tasks_bundle_id_name_live", table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("ingestion_ledger")
    op.drop_table("bundle_versions")
    op.drop_table("bundles")
    op.drop_table("base_objects")
    op.drop_index(op.f("ix_object_leases_expires_at"), table_name="object_leases")
    op.drop_table("object_leases")
    op.drop_table("base_models")
