"""Host sets (issue 17): each host's set name (none: the default set) and each set's
load-balancing switch, so balancing can be turned on for a set of hosts and its moves
never leave the set.

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("host_set", sa.String(63), nullable=True))
        batch.create_index(op.f("ix_hosts_host_set"), ["host_set"])
    op.create_table(
        "host_sets",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("balance", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_host_sets")),
    )


def downgrade() -> None:
    op.drop_table("host_sets")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_index(op.f("ix_hosts_host_set"))
        batch.drop_column("host_set")
