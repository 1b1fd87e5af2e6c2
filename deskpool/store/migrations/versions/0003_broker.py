"""The broker: users, groups, entitlements, sign-in and console tokens, events, logons; pool
session timers; desktops' session columns and one held desktop per user and pool.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = sa.String(length=255)
WHEN = sa.DateTime(timezone=True)
HELD_SQL = "state IN ('reserved', 'in_use', 'idle')"


def _id() -> sa.Column[Any]:
    return sa.Column("id", sa.Uuid(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "users", _id(),
        sa.Column("name", NAME, nullable=False),
        sa.Column("display_name", NAME, nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=True),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("last_login_at", WHEN, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("name", name=op.f("uq_users_name")),
    )
    op.create_table(
        "groups", _id(),
        sa.Column("name", NAME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_groups_name")),
    )
    op.create_table(
        "group_members",
        sa.Column("group_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.id"], ondelete="CASCADE",
                                name=op.f("fk_group_members_group_id_groups")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE",
                                name=op.f("fk_group_members_user_id_users")),
        sa.PrimaryKeyConstraint("group_id", "user_id", name=op.f("pk_group_members")),
    )
    op.create_table(
        "entitlements", _id(),
        sa.Column("pool_id", sa.Uuid(), nullable=False),
        sa.Column("principal_kind", sa.String(length=16), nullable=False),
        sa.Column("principal", NAME, nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.ForeignKeyConstraint(["pool_id"], ["pools.id"], ondelete="CASCADE",
                                name=op.f("fk_entitlements_pool_id_pools")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_entitlements")),
    )
    op.create_index(op.f("ix_entitlements_pool_id_principal_kind_principal"), "entitlements",
                    ["pool_id", "principal_kind", "principal"], unique=True)
    op.create_table(
        "auth_tokens", _id(),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("label", NAME, nullable=False),
        sa.Column("groups", sa.Text(), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("expires_at", WHEN, nullable=True),
        sa.Column("revoked_at", WHEN, nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE",
                                name=op.f("fk_auth_tokens_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_auth_tokens_token_hash")),
    )
    op.create_table(
        "console_tokens", _id(),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_name", NAME, nullable=False),
        sa.Column("desktop_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("expires_at", WHEN, nullable=False),
        sa.Column("used_at", WHEN, nullable=True),
        sa.ForeignKeyConstraint(["desktop_id"], ["desktops.id"], ondelete="CASCADE",
                                name=op.f("fk_console_tokens_desktop_id_desktops")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_console_tokens_token_hash")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("at", WHEN, nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("user_name", NAME, nullable=True),
        sa.Column("pool_name", NAME, nullable=True),
        sa.Column("desktop_id", sa.Uuid(), nullable=True),
        sa.Column("desktop_name", NAME, nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_at"), "events", ["at"])
    op.create_table(
        "logons", _id(),
        sa.Column("user_name", NAME, nullable=False),
        sa.Column("pool_name", NAME, nullable=False),
        sa.Column("desktop_id", sa.Uuid(), nullable=True),
        sa.Column("desktop_name", NAME, nullable=True),
        sa.Column("requested_at", WHEN, nullable=False),
        sa.Column("handed_over_at", WHEN, nullable=True),
        sa.Column("reconnect", sa.Boolean(), nullable=False),
        *(sa.Column(f"{phase}_ms", sa.Integer(), nullable=True)
          for phase in ("queue", "claim", "power_on", "ready", "connect")),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_logons")),
    )
    op.create_index(op.f("ix_logons_requested_at"), "logons", ["requested_at"])
    op.create_index(op.f("ix_logons_desktop_id"), "logons", ["desktop_id"])
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("reservation_timeout_s", sa.Integer(), nullable=False,
                                   server_default="300"))
        batch.add_column(sa.Column("idle_timeout_s", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("disconnect_timeout_s", sa.Integer(), nullable=True))
    with op.batch_alter_table("desktops") as batch:
        batch.add_column(sa.Column("reserved_at", WHEN, nullable=True))
        batch.add_column(sa.Column("console_connections", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("disconnected_at", WHEN, nullable=True))
        batch.add_column(sa.Column("guest_user", NAME, nullable=True))
        batch.add_column(sa.Column("idle_since", WHEN, nullable=True))
        batch.create_index("uq_desktops_held_by_user", ["pool_id", "assigned_user"],
                           unique=True, sqlite_where=sa.text(HELD_SQL),
                           postgresql_where=sa.text(HELD_SQL))


def downgrade() -> None:
    with op.batch_alter_table("desktops") as batch:
        batch.drop_index("uq_desktops_held_by_user")
        for column in ("idle_since", "guest_user", "disconnected_at", "console_connections",
                       "reserved_at"):
            batch.drop_column(column)
    with op.batch_alter_table("pools") as batch:
        for column in ("disconnect_timeout_s", "idle_timeout_s", "reservation_timeout_s"):
            batch.drop_column(column)
    for table in ("logons", "events", "console_tokens", "auth_tokens", "entitlements",
                  "group_members", "groups", "users"):
        op.drop_table(table)
