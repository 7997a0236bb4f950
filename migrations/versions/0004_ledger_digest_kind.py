"""ledger digest kind

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Which digest an ingestion-ledger row holds: ``content`` (randes.digests, the tensors by
name, dtype, shape and bytes) for every row written from now on; NULL for the rows
written before, which may hold the file-bytes digest of the era before content digests.
A fold computes that older digest of a checkpoint (a pass over its bytes of its own)
only while its bundle's ledger still holds NULL rows. One nullable column: no rewrite
of the existing rows; downgrading drops it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ingestion_ledger") as batch:
        batch.add_column(sa.Column("digest_kind", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ingestion_ledger") as batch:
        batch.drop_column("digest_kind")
