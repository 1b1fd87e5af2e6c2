"""Each pool's load-balancing switch: whether the reconciler's balancing pass may move its
running desktops live off a host under memory or CPU pressure (off by default: pools made
before keep their desktops where placement put them).

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("balance", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("balance", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("balance")
