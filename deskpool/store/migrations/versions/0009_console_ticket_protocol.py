"""The display a console ticket opens (``vnc`` for the browser, ``spice`` for remote-viewer),
so a ticket issued for one cannot open the other.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("console_tokens") as batch:
        batch.add_column(sa.Column("protocol", sa.String(length=32), nullable=False,
                                   server_default="vnc"))
    with op.batch_alter_table("console_tokens") as batch:
        batch.alter_column("protocol", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("console_tokens") as batch:
        batch.drop_column("protocol")
