"""Each pool's session start timeout: how long a user's own graphical session may take to
start at hand-over before the desktop is failed and another one tried.

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("session_start_timeout_s", sa.Integer(), nullable=False,
                                   server_default="150"))
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("session_start_timeout_s", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("session_start_timeout_s")
