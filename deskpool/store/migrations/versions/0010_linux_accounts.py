"""Each user's Linux account on the desktops (name and a stable uid), and the logon phase
``session``: from ready to the user's own graphical session running.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "linux_accounts",
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("account", sa.String(length=32), nullable=False),
        sa.Column("uid", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_name", name=op.f("pk_linux_accounts")),
        sa.UniqueConstraint("account", name=op.f("uq_linux_accounts_account")),
        sa.UniqueConstraint("uid", name=op.f("uq_linux_accounts_uid")),
    )
    with op.batch_alter_table("logons") as batch:
        batch.add_column(sa.Column("session_ms", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("logons") as batch:
        batch.drop_column("session_ms")
    op.drop_table("linux_accounts")
