"""How a reverting pool's desktops go back to the template: each pool's ``revert_by``,
``snapshot`` (their factory snapshot, as every pool made before did) or ``boot`` (a fresh
overlay on the master, booted again).

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0030"
down_revision: str | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("revert_by", sa.String(16), nullable=False,
                                   server_default="snapshot"))
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("revert_by", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("revert_by")
