"""Each pool's template fault: its template version's disk could not be used (missing, or
its checksum no longer matches), since when, how many tries failed and when the next one is
due. Pools made before have none.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("fault", sa.Text(), nullable=True))
        batch.add_column(sa.Column("fault_version_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("fault_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("fault_failures", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("fault_retry_at", sa.DateTime(timezone=True),
                                   nullable=True))
        batch.add_column(sa.Column("fault_stamp", sa.String(255), nullable=True))
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("fault_failures", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        for column in ("fault_stamp", "fault_retry_at", "fault_failures", "fault_since",
                       "fault_version_id", "fault"):
            batch.drop_column(column)
