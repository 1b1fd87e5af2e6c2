"""Offline desktops (issue 15): each pool's offline policy (JSON, none: no offline use) and
the check-outs of desktops to laptops, one active per desktop (a partial unique index).

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("offline_policy", sa.Text(), nullable=True))
    op.create_table(
        "offline_checkouts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("desktop_id", sa.Uuid(), nullable=False),
        sa.Column("desktop_name", sa.String(255), nullable=False),
        sa.Column("pool_name", sa.String(255), nullable=False),
        sa.Column("user_name", sa.String(255), nullable=False),
        sa.Column("laptop_id", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("checked_out_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_sync_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("escrowed_key", sa.Text(), nullable=False),
        sa.Column("base_sha256", sa.String(64), nullable=False),
        sa.Column("layer_sha256", sa.String(64), nullable=False),
        sa.Column("bytes_pending", sa.BigInteger(), nullable=False),
        sa.Column("transfer_plan", sa.LargeBinary(), nullable=True),
        sa.Column("transfer_kind", sa.String(16), nullable=True),
        sa.Column("transfer_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["desktop_id"], ["desktops.id"], ondelete="CASCADE",
                                name=op.f("fk_offline_checkouts_desktop_id_desktops")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_offline_checkouts")),
    )
    op.create_index(op.f("ix_offline_checkouts_user_name"), "offline_checkouts",
                    ["user_name"])
    op.create_index("uq_offline_checkouts_active_desktop", "offline_checkouts",
                    ["desktop_id"], unique=True,
                    sqlite_where=sa.text("ended_at IS NULL"),
                    postgresql_where=sa.text("ended_at IS NULL"))


def downgrade() -> None:
    op.drop_index("uq_offline_checkouts_active_desktop", table_name="offline_checkouts")
    op.drop_index(op.f("ix_offline_checkouts_user_name"), table_name="offline_checkouts")
    op.drop_table("offline_checkouts")
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("offline_policy")
