"""A user's second concurrent session: each pool's ``second_session`` policy (refuse, a
read-only profile, or a merge at logoff) and its profile exclusions (paths kept out of the
profile, one per line), and each profile session layer's mode, so its
logoff knows what to do with it. Pools made before merge (nothing lost, nothing refused);
layers made before are exclusive, as they were. And how long a profile's last write-back
took, for the admin's and the user's views.

Revision ID: 0021
Revises: 0019
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0021"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("second_session", sa.String(16), nullable=False,
                                   server_default="merge"))
        batch.add_column(sa.Column("profile_exclusions", sa.Text(), nullable=False,
                                   server_default=""))
    with op.batch_alter_table("profile_layers") as batch:
        batch.add_column(sa.Column("mode", sa.String(16), nullable=False,
                                   server_default="exclusive"))
    with op.batch_alter_table("profiles") as batch:
        batch.add_column(sa.Column("last_writeback_s", sa.Float(), nullable=True))
    # The models hold the defaults; the server defaults only filled the existing rows.
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("second_session", server_default=None)
        batch.alter_column("profile_exclusions", server_default=None)
    with op.batch_alter_table("profile_layers") as batch:
        batch.alter_column("mode", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("profiles") as batch:
        batch.drop_column("last_writeback_s")
    with op.batch_alter_table("profile_layers") as batch:
        batch.drop_column("mode")
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("profile_exclusions")
        batch.drop_column("second_session")
