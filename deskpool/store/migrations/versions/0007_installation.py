"""This deployment's id, written into every VM it makes so that deployments sharing a host
tell their VMs apart.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "installation",
        sa.Column("singleton", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("installation_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("singleton", name=op.f("pk_installation")),
    )
    op.bulk_insert(table, [{"singleton": 1, "installation_id": uuid.uuid4(),
                            "created_at": datetime.now(UTC)}])


def downgrade() -> None:
    op.drop_table("installation")
