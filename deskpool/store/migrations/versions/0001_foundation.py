"""Foundation: hosts, templates, template versions, desktops.

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Enum columns are plain VARCHAR(32) without CHECK constraints (the models use non-native enums),
so adding an enum value never needs a migration. Timestamps are timezone-aware; UUIDs use
``sa.Uuid`` (native on PostgreSQL, CHAR(32) on SQLite).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ENUM = sa.String(length=32)


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("uri", sa.String(length=1024), nullable=False),
        sa.Column("state", ENUM, nullable=False),
        sa.Column("domain_type_requested", ENUM, nullable=False),
        sa.Column("domain_type_resolved", sa.String(length=16), nullable=True),
        sa.Column("storage_dir", sa.Text(), nullable=True),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hosts")),
        sa.UniqueConstraint("name", name=op.f("uq_hosts_name")),
    )
    op.create_table(
        "templates",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_templates")),
        sa.UniqueConstraint("name", name=op.f("uq_templates_name")),
    )
    op.create_table(
        "template_versions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("template_id", sa.Uuid(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("image_path", sa.Text(), nullable=False),
        sa.Column("image_sha256", sa.String(length=64), nullable=False),
        sa.Column("image_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("kernel_path", sa.Text(), nullable=True),
        sa.Column("initrd_path", sa.Text(), nullable=True),
        sa.Column("kernel_cmdline", sa.Text(), nullable=True),
        sa.Column("customization", ENUM, nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        sa.Column("recipe_hash", sa.String(length=128), nullable=True),
        _timestamp("published_at", nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["templates.id"],
            name=op.f("fk_template_versions_template_id_templates"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_template_versions")),
        sa.UniqueConstraint(
            "template_id", "number", name=op.f("uq_template_versions_template_id_number")
        ),
    )
    op.create_table(
        "desktops",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("hostname", sa.String(length=63), nullable=False),
        sa.Column("mac", sa.String(length=17), nullable=False),
        sa.Column("machine_id", sa.String(length=32), nullable=False),
        sa.Column("template_version_id", sa.Uuid(), nullable=False),
        sa.Column("host_id", sa.Uuid(), nullable=False),
        sa.Column("clone_mode", ENUM, nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("desired_state", sa.String(length=32), nullable=True),
        sa.Column("power_state", ENUM, nullable=False),
        sa.Column("task", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _timestamp("state_changed_at"),
        _timestamp("created_at"),
        _timestamp("identity_confirmed_at", nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], name=op.f("fk_desktops_host_id_hosts")),
        sa.ForeignKeyConstraint(
            ["template_version_id"],
            ["template_versions.id"],
            name=op.f("fk_desktops_template_version_id_template_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_desktops")),
        sa.UniqueConstraint("mac", name=op.f("uq_desktops_mac")),
        sa.UniqueConstraint("machine_id", name=op.f("uq_desktops_machine_id")),
        sa.UniqueConstraint("name", name=op.f("uq_desktops_name")),
    )
    op.create_index(op.f("ix_desktops_host_id"), "desktops", ["host_id"])
    op.create_index(op.f("ix_desktops_state"), "desktops", ["state"])
    op.create_index(op.f("ix_desktops_template_version_id"), "desktops", ["template_version_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_desktops_template_version_id"), table_name="desktops")
    op.drop_index(op.f("ix_desktops_state"), table_name="desktops")
    op.drop_index(op.f("ix_desktops_host_id"), table_name="desktops")
    op.drop_table("desktops")
    op.drop_table("template_versions")
    op.drop_table("templates")
    op.drop_table("hosts")
