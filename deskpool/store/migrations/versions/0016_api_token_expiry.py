"""API tokens always expire: one issued before without an expiry gets 90 days from the upgrade
(not from its issue, so no script loses its token the moment the broker is upgraded). An index
on the tokens' user, for listing a user's tokens.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

API_TOKEN_TTL = timedelta(days=90)  # deskpool.broker.accounts.API_TOKEN_TTL when written


def upgrade() -> None:
    tokens = sa.table("auth_tokens", sa.column("kind", sa.String),
                      sa.column("expires_at", sa.DateTime(timezone=True)))
    op.execute(tokens.update()
               .where(tokens.c.kind == "api", tokens.c.expires_at.is_(None))
               .values(expires_at=datetime.now(UTC) + API_TOKEN_TTL))
    op.create_index(op.f("ix_auth_tokens_user_id"), "auth_tokens", ["user_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_auth_tokens_user_id"), table_name="auth_tokens")
