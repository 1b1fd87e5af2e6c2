"""Scheduled roaming-profile maintenance: each profile's maintenance lease (which broker
flattens, sweeps or verifies it now, and until when; ``maint_swap`` while it swaps the
flattened base in, when no session may open) and when its layers were last verified, so the
reconciler verifies the longest-unverified profiles first.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("maint_owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("maint_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("maint_swap", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("profiles") as batch:
        batch.alter_column("maint_swap", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("verified_at")
        batch.drop_column("maint_swap")
        batch.drop_column("maint_until")
        batch.drop_column("maint_owner")
