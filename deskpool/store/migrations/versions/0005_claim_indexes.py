"""Indexes for the broker's hot paths: the next free desktop of a pool, and a desktop's
console tickets (voided at log-off).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_desktops_pool_id_state_name"), "desktops",
                    ["pool_id", "state", "name"])
    op.create_index(op.f("ix_console_tokens_desktop_id"), "console_tokens", ["desktop_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_console_tokens_desktop_id"), table_name="console_tokens")
    op.drop_index(op.f("ix_desktops_pool_id_state_name"), table_name="desktops")
