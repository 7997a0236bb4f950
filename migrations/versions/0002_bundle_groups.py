"""bundle groups

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

Bundle groups (capacity planning): `bundle_groups` holds a group's template (base,
transform, gate) and its limit on relative interference; `bundle_group_members` puts a
bundle at one position of one group. Both are new tables: `bundles` itself is left
alone, so neither direction has to rebuild a table the rest of the schema references
(SQLite cannot add or drop a foreign-key column in place). Downgrading drops the
groups; their member bundles stay as ordinary bundles.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "bundle_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("base_id", sa.Integer(), nullable=False),
        sa.Column("transform", sa.JSON(), nullable=False),
        sa.Column("gate_threshold", sa.Float(), nullable=True),
        sa.Column("max_interference", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "max_interference > 0", name=op.f("ck_bundle_groups_max_interference_positive")
        ),
        sa.ForeignKeyConstraint(
            ["base_id"], ["base_models.id"], name=op.f("fk_bundle_groups_base_id_base_models")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bundle_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_bundle_groups_name")),
    )
    op.create_table(
        "bundle_group_members",
        sa.Column("bundle_id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.CheckConstraint("position >= 1", name=op.f("ck_bundle_group_members_position_positive")),
        sa.ForeignKeyConstraint(
            ["bundle_id"], ["bundles.id"], name=op.f("fk_bundle_group_members_bundle_id_bundles")
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["bundle_groups.id"],
            name=op.f("fk_bundle_group_members_group_id_bundle_groups"),
        ),
        sa.PrimaryKeyConstraint("bundle_id", name=op.f("pk_bundle_group_members")),
        sa.UniqueConstraint(
            "group_id", "position", name="uq_bundle_group_members_group_id_position"
        ),
    )


def downgrade() -> None:
    op.drop_table("bundle_group_members")
    op.drop_table("bundle_groups")
