"""Roaming profiles: a profile per user and the qcow2 layers of its chain.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "profiles",
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("layer_id", sa.Uuid(), nullable=True),
        sa.Column("quota_bytes", sa.BigInteger(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("keep_generations", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("user_name", name=op.f("pk_profiles")),
    )
    op.create_table(
        "profile_layers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_name", sa.String(length=255), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Uuid(), nullable=True),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("base_generation", sa.Integer(), nullable=True),
        sa.Column("desktop_name", sa.String(length=255), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_name"], ["profiles.user_name"],
                                name=op.f("fk_profile_layers_user_name_profiles"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_profile_layers")),
        sa.UniqueConstraint("path", name=op.f("uq_profile_layers_path")),
    )
    op.create_index(op.f("ix_profile_layers_user_name_state"), "profile_layers",
                    ["user_name", "state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_profile_layers_user_name_state"), table_name="profile_layers")
    op.drop_table("profile_layers")
    op.drop_table("profiles")
