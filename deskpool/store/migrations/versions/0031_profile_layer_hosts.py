"""Roaming profiles across hosts: ``profile_layer_hosts``, which hosts hold which immutable
profile layers, and the copies between hosts in flight (state ``copying``, bytes so far, the
process copying). Layers without a row are in the profile store every host reaches, as every
layer made before.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0031"
down_revision: str | None = "0030"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "profile_layer_hosts",
        sa.Column("layer_id", sa.Uuid(), nullable=False),
        sa.Column("host_id", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False),
        sa.Column("bytes_total", sa.BigInteger(), nullable=False),
        sa.Column("copier", sa.String(length=64), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"],
                                name=op.f("fk_profile_layer_hosts_host_id_hosts"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["layer_id"], ["profile_layers.id"],
                                name=op.f("fk_profile_layer_hosts_layer_id_profile_layers"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("layer_id", "host_id", name=op.f("pk_profile_layer_hosts")),
    )


def downgrade() -> None:
    op.drop_table("profile_layer_hosts")
