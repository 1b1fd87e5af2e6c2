"""Pools, instant-clone memory states, and desktops' pool membership, assignment and retries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ENUM = sa.String(length=32)


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("template_id", sa.Uuid(), nullable=False),
        sa.Column("kind", ENUM, nullable=False),
        sa.Column("assignment", ENUM, nullable=False),
        sa.Column("min_size", sa.Integer(), nullable=False),
        sa.Column("max_size", sa.Integer(), nullable=False),
        sa.Column("spare", sa.Integer(), nullable=False),
        sa.Column("naming_pattern", sa.String(length=255), nullable=False),
        sa.Column("clone_mode", ENUM, nullable=False),
        sa.Column("on_logout", ENUM, nullable=False),
        sa.Column("one_time", sa.Boolean(), nullable=False),
        sa.Column("max_age_s", sa.Integer(), nullable=True),
        sa.Column("power_policy", ENUM, nullable=False),
        sa.Column("canary", sa.Integer(), nullable=False),
        sa.Column("current_version_id", sa.Uuid(), nullable=False),
        sa.Column("previous_version_id", sa.Uuid(), nullable=True),
        sa.Column("host_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["template_id"], ["templates.id"],
                                name=op.f("fk_pools_template_id_templates")),
        sa.ForeignKeyConstraint(["current_version_id"], ["template_versions.id"],
                                name=op.f("fk_pools_current_version_id_template_versions")),
        sa.ForeignKeyConstraint(["previous_version_id"], ["template_versions.id"],
                                name=op.f("fk_pools_previous_version_id_template_versions")),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], name=op.f("fk_pools_host_id_hosts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pools")),
        sa.UniqueConstraint("name", name=op.f("uq_pools_name")),
    )
    op.create_table(
        "memory_states",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("version_id", sa.Uuid(), nullable=False),
        sa.Column("host_id", sa.Uuid(), nullable=False),
        sa.Column("disk_volume", sa.String(length=255), nullable=False),
        sa.Column("memory_volume", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["template_versions.id"],
                                name=op.f("fk_memory_states_version_id_template_versions")),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"],
                                name=op.f("fk_memory_states_host_id_hosts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_memory_states")),
        sa.UniqueConstraint("version_id", "host_id",
                            name=op.f("uq_memory_states_version_id_host_id")),
    )
    with op.batch_alter_table("desktops") as batch:
        batch.add_column(sa.Column("pool_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("assigned_user", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("has_factory_snapshot", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("sessions_served", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("retry_count", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True),
                                   nullable=True))
        batch.create_foreign_key(op.f("fk_desktops_pool_id_pools"), "pools", ["pool_id"],
                                 ["id"])
        batch.create_index(op.f("ix_desktops_pool_id"), ["pool_id"])


def downgrade() -> None:
    with op.batch_alter_table("desktops") as batch:
        batch.drop_index(op.f("ix_desktops_pool_id"))
        batch.drop_constraint(op.f("fk_desktops_pool_id_pools"), type_="foreignkey")
        for column in ("next_attempt_at", "retry_count", "sessions_served",
                       "has_factory_snapshot", "assigned_user", "pool_id"):
            batch.drop_column(column)
    op.drop_table("memory_states")
    op.drop_table("pools")
