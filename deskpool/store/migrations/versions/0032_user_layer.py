"""A stateful pool's user layer: ``user_layer_mib``, the size of the disk each of its
desktops keeps the user's changes to the system on (0: none, as every pool made before).

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0032"
down_revision: str | None = "0031"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("user_layer_mib", sa.Integer(), nullable=False,
                                   server_default="0"))
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("user_layer_mib", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("user_layer_mib")
