"""Folder redirection: each pool's ``redirect_folders``, the folders of a user's home put on
their share of deskpool's Samba server at logon, one per line. Pools made before redirect
none. And each desktop's ``share_user``: whose share password a session on it holds, so the
logoff revokes it after a floating desktop is no longer assigned to anyone. (Nothing of the
passwords themselves is stored: see deskpool/fileshare/samba.py.)

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0027"
# 0025 is the head this branch was made on; at merge it becomes "0027".
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("redirect_folders", sa.Text(), nullable=False,
                                   server_default=""))
    with op.batch_alter_table("desktops") as batch:
        batch.add_column(sa.Column("share_user", sa.String(255), nullable=True))
    # The model holds the default; the server default only filled the existing rows.
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("redirect_folders", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("desktops") as batch:
        batch.drop_column("share_user")
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("redirect_folders")
