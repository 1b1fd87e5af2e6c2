"""Each host's shared storage: the name of the storage its storage directory is on, shared
with the other hosts that carry the same name (mounted at the same path). Stateful desktops
of a host lost whole are restarted on such a host (HA restart); None: the storage is the
host's own, as for every host made before.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("shared_storage", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("shared_storage")
