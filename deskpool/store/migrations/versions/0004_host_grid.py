"""The host grid: host limits, capacity, heartbeat and drain; what a template version runs on;
pools pinned to a set of hosts (``pool_hosts`` replaces ``pools.host_id``) with a placement
strategy; desktops' placement reason and notice; leases that divide work among brokers.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHEN = sa.DateTime(timezone=True)
OWNER = sa.String(length=64)

def _host_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("cpu_overcommit", sa.Float(), nullable=False, server_default="4.0"),
        sa.Column("memory_overcommit", sa.Float(), nullable=False, server_default="1.0"),
        sa.Column("max_desktops", sa.Integer(), nullable=True),
        sa.Column("max_provisioning", sa.Integer(), nullable=False, server_default="2"),
        sa.Column("transfer_slots", sa.Integer(), nullable=False, server_default="2"),
        sa.Column("hypervisor", sa.String(length=32), nullable=False, server_default=""),
        sa.Column("arch", sa.String(length=32), nullable=False, server_default=""),
        sa.Column("cpu_model", sa.String(length=128), nullable=False, server_default=""),
        sa.Column("domain_types", sa.String(length=128), nullable=False, server_default=""),
        sa.Column("vcpus", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("memory_mib", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("storage_free_bytes", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("capacity_at", WHEN, nullable=True),
        sa.Column("last_seen_at", WHEN, nullable=True),
        sa.Column("unreachable_since", WHEN, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("drain_deadline", WHEN, nullable=True),
    ]


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        for column in _host_columns():
            batch.add_column(column)
    with op.batch_alter_table("template_versions") as batch:
        batch.add_column(sa.Column("runs_on", sa.String(length=128), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("arch", sa.String(length=32), nullable=False,
                                   server_default=""))
    op.create_table(
        "pool_hosts",
        sa.Column("pool_id", sa.Uuid(), nullable=False),
        sa.Column("host_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(["pool_id"], ["pools.id"], ondelete="CASCADE",
                                name=op.f("fk_pool_hosts_pool_id_pools")),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], ondelete="CASCADE",
                                name=op.f("fk_pool_hosts_host_id_hosts")),
        sa.PrimaryKeyConstraint("pool_id", "host_id", name=op.f("pk_pool_hosts")),
    )
    op.execute("INSERT INTO pool_hosts (pool_id, host_id) "
               "SELECT id, host_id FROM pools WHERE host_id IS NOT NULL")
    with op.batch_alter_table("pools") as batch:
        batch.drop_constraint(op.f("fk_pools_host_id_hosts"), type_="foreignkey")
        batch.drop_column("host_id")
        batch.add_column(sa.Column("placement", sa.String(length=16), nullable=False,
                                   server_default="spread"))
        batch.add_column(sa.Column("lease_owner", OWNER, nullable=True))
        batch.add_column(sa.Column("lease_until", WHEN, nullable=True))
    with op.batch_alter_table("desktops") as batch:
        batch.add_column(sa.Column("notice", sa.Text(), nullable=True))
        batch.add_column(sa.Column("placement_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("lease_owner", OWNER, nullable=True))
        batch.add_column(sa.Column("lease_until", WHEN, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("desktops") as batch:
        for column in ("lease_until", "lease_owner", "placement_reason", "notice"):
            batch.drop_column(column)
    with op.batch_alter_table("pools") as batch:
        for column in ("lease_until", "lease_owner", "placement"):
            batch.drop_column(column)
        batch.add_column(sa.Column("host_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key(op.f("fk_pools_host_id_hosts"), "hosts", ["host_id"], ["id"])
    # A pool pinned to one host keeps it; a pin to several hosts cannot be expressed.
    op.execute("UPDATE pools SET host_id = (SELECT host_id FROM pool_hosts "
               "WHERE pool_hosts.pool_id = pools.id ORDER BY host_id LIMIT 1)")
    op.drop_table("pool_hosts")
    with op.batch_alter_table("template_versions") as batch:
        batch.drop_column("arch")
        batch.drop_column("runs_on")
    with op.batch_alter_table("hosts") as batch:
        for column in reversed(_host_columns()):
            batch.drop_column(column.name)
