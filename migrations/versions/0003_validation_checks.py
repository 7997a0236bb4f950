"""validation checks and policies

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Validation that does not grow with the number of tasks (randes.validation_policy):
`validation_checks` records, per validation run and task, whether the task was measured
and why (its reason in words, its predicted interference then, whether it passed): the
history the next selection reads. `validation_policies` holds a bundle's own drift,
window and sample (NULL: the default). New tables only, so `bundles` is not rebuilt;
downgrading drops them, and the next validation measures every task once as new.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REASONS = ("new", "failed", "interference", "rotation", "all", "skipped")


def upgrade() -> None:
    op.create_table(
        "validation_checks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("task_name", sa.String(length=128), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("measured", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("interference", sa.Float(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "reason IN (" + ", ".join(f"'{r}'" for r in REASONS) + ")",
            name=op.f("ck_validation_checks_reason"),
        ),
        sa.CheckConstraint("version >= 0", name=op.f("ck_validation_checks_version_nonnegative")),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name=op.f("fk_validation_checks_bundle_id_bundles")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_validation_checks")),
    )
    op.create_index(
        "ix_validation_checks_bundle_id_version",
        "validation_checks",
        ["bundle_id", "version"],
        unique=False,
    )
    op.create_table(
        "validation_policies",
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("drift", sa.Float(), nullable=True),
        sa.Column("window_versions", sa.Integer(), nullable=True),
        sa.Column("sample_size", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("drift >= 0", name=op.f("ck_validation_policies_drift_nonnegative")),
        sa.CheckConstraint(
            "window_versions >= 1", name=op.f("ck_validation_policies_window_positive")
        ),
        sa.CheckConstraint(
            "sample_size >= 0", name=op.f("ck_validation_policies_sample_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name=op.f("fk_validation_policies_bundle_id_bundles")
        ),
        sa.PrimaryKeyConstraint("bundle_id", name=op.f("pk_validation_policies")),
    )


def downgrade() -> None:
    op.drop_table("validation_policies")
    op.drop_index("ix_validation_checks_bundle_id_version", table_name="validation_checks")
    op.drop_table("validation_checks")
