"""Each pool's roaming-profiles switch: whether a user's home follows them, as a profile
container plugged in at logon and committed at logoff (off by default: pools made before
keep handing over desktops exactly as they did).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("roaming_profiles", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("roaming_profiles", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("roaming_profiles")
