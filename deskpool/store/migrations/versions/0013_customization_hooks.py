"""A template version's administrator customization: cloud-init user data and a join hook;
a Linux account's gid and whether its numbers came from the directory (LDAP uidNumber /
gidNumber); a directory user's numbers as last seen at sign-in.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("template_versions") as batch:
        batch.add_column(sa.Column("user_data", sa.Text(), nullable=True))
        batch.add_column(sa.Column("join_hook", sa.Text(), nullable=True))
    with op.batch_alter_table("linux_accounts") as batch:
        batch.add_column(sa.Column("gid", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("from_directory", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    # Accounts made so far had gid = uid (the user's private group).
    op.execute("UPDATE linux_accounts SET gid = uid")
    with op.batch_alter_table("linux_accounts") as batch:
        batch.alter_column("gid", existing_type=sa.Integer(), nullable=False)
        batch.alter_column("from_directory", server_default=None)
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("uid_number", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("gid_number", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("gid_number")
        batch.drop_column("uid_number")
    with op.batch_alter_table("linux_accounts") as batch:
        batch.drop_column("from_directory")
        batch.drop_column("gid")
    with op.batch_alter_table("template_versions") as batch:
        batch.drop_column("join_hook")
        batch.drop_column("user_data")
