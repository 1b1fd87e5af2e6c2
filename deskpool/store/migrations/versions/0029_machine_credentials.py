"""Machine credentials: files a desktop gets back at every boot (a keytab...), by desktop
name and guest path, encrypted with the installation's machine-secrets key (a file in the
data directory, never in the database).

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "machine_credentials",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("desktop_name", sa.String(255), nullable=False),
        sa.Column("guest_path", sa.String(255), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_machine_credentials")),
        sa.UniqueConstraint("desktop_name", "guest_path",
                            name=op.f("uq_machine_credentials_desktop_name_guest_path")),
    )


def downgrade() -> None:
    op.drop_table("machine_credentials")
