"""The admin surface: a pool's status (enabled, disabled, deleting) and audit events (who,
from where, to what, old and new values) in the event log.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("status", sa.String(length=32), nullable=False,
                                   server_default="enabled"))
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("status", server_default=None)
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("actor", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("remote_addr", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("target", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("details", sa.Text(), nullable=True))
    op.create_index(op.f("ix_events_kind_id"), "events", ["kind", "id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_events_kind_id"), table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("details")
        batch.drop_column("target")
        batch.drop_column("remote_addr")
        batch.drop_column("actor")
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("status")
