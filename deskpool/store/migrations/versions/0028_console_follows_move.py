"""Native consoles follow a live move: each desktop's ``moving_to_id``, the host a live move
is taking it to while the move runs (the SPICE proxy admits the client's channels to the
display there), and each RDP ticket's ``otp_digest``, the SHA-256 of its one-time password,
set in the guest again when the client reconnects on that ticket after the move. (The
password itself is never stored.)

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("desktops") as batch:
        batch.add_column(sa.Column("moving_to_id", sa.Uuid(), nullable=True))
    with op.batch_alter_table("console_tokens") as batch:
        batch.add_column(sa.Column("otp_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("console_tokens") as batch:
        batch.drop_column("otp_digest")
    with op.batch_alter_table("desktops") as batch:
        batch.drop_column("moving_to_id")
