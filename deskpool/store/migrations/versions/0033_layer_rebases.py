"""User layer views (issue 14): ``layer_rebases``, the outcome of each rebase of a desktop's
user layer onto a template version (counts, ``rebased`` or ``failed`` with the error), and
``layer_conflicts``, its conflicts and notes; and the layer's status on ``desktops``
(``layer_version``, ``layer_bytes``, ``layer_changed_files``, ``layer_checked_at``: all NULL
until the desktop side first reports, as for every desktop made before).

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0033"
down_revision: str | None = "0032"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("desktops") as batch:
        batch.add_column(sa.Column("layer_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("layer_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("layer_changed_files", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("layer_checked_at", WHEN, nullable=True))
    op.create_table(
        "layer_rebases",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("desktop_id", sa.Uuid(), nullable=False),
        sa.Column("pool_id", sa.Uuid(), nullable=False),
        sa.Column("old_version", sa.Integer(), nullable=False),
        sa.Column("new_version", sa.Integer(), nullable=False),
        sa.Column("finished_at", WHEN, nullable=False),
        sa.Column("kept_count", sa.Integer(), nullable=False),
        sa.Column("dropped_count", sa.Integer(), nullable=False),
        sa.Column("conflict_count", sa.Integer(), nullable=False),
        sa.Column("note_count", sa.Integer(), nullable=False),
        sa.Column("excluded_count", sa.Integer(), nullable=False),
        sa.Column("layer_bytes", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["desktop_id"], ["desktops.id"],
                                name=op.f("fk_layer_rebases_desktop_id_desktops"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["pool_id"], ["pools.id"],
                                name=op.f("fk_layer_rebases_pool_id_pools"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_layer_rebases")),
    )
    op.create_index(op.f("ix_layer_rebases_desktop_id_finished_at"), "layer_rebases",
                    ["desktop_id", "finished_at"])
    op.create_index(op.f("ix_layer_rebases_pool_id_new_version"), "layer_rebases",
                    ["pool_id", "new_version"])
    op.create_table(
        "layer_conflicts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("rebase_id", sa.Uuid(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("user_copy", sa.Text(), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(["rebase_id"], ["layer_rebases.id"],
                                name=op.f("fk_layer_conflicts_rebase_id_layer_rebases"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_layer_conflicts")),
    )
    op.create_index(op.f("ix_layer_conflicts_rebase_id"), "layer_conflicts", ["rebase_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_layer_conflicts_rebase_id"), table_name="layer_conflicts")
    op.drop_table("layer_conflicts")
    op.drop_index(op.f("ix_layer_rebases_pool_id_new_version"), table_name="layer_rebases")
    op.drop_index(op.f("ix_layer_rebases_desktop_id_finished_at"), table_name="layer_rebases")
    op.drop_table("layer_rebases")
    with op.batch_alter_table("desktops") as batch:
        batch.drop_column("layer_checked_at")
        batch.drop_column("layer_changed_files")
        batch.drop_column("layer_bytes")
        batch.drop_column("layer_version")
