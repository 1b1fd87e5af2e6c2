"""Drop ``desktops.desired_state``: written once at creation and never read (a desktop's
intent is its state and the task in flight).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("desktops") as batch:
        batch.drop_column("desired_state")


def downgrade() -> None:
    with op.batch_alter_table("desktops") as batch:
        batch.add_column(sa.Column("desired_state", sa.String(length=32), nullable=True))
