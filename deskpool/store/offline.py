"""Offline check-outs (issue 15): the ``offline_checkouts`` table and its repository.

One row per check-out of a desktop to a laptop. While it is active (``ended_at`` is NULL) the
desktop is in the ``checked_out`` state; the row says to whom and until when, and holds what
the server needs to take the desktop back: the layer's data key wrapped under the server's
escrow key (never the key in clear, never the user's password), the checksum of the server's
copy the next check-in must apply to, and the plan of a check-in in flight, so a cut one
resumes after a restart. A partial unique index makes "one active check-out per desktop" the
database's own rule, whatever two brokers race.
"""

from __future__ import annotations

import builtins
import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from deskpool.domain.errors import NotFound
from deskpool.store.models import Base, Desktop, utcnow

ACTIVE_SQL = "ended_at IS NULL"


class OfflineCheckout(Base):
    __tablename__ = "offline_checkouts"
    __table_args__ = (
        Index("uq_offline_checkouts_active_desktop", "desktop_id", unique=True,
              sqlite_where=text(ACTIVE_SQL), postgresql_where=text(ACTIVE_SQL)),
        Index(None, "user_name"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    desktop_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("desktops.id", ondelete="CASCADE"))
    desktop_name: Mapped[str] = mapped_column(String(255))
    pool_name: Mapped[str] = mapped_column(String(255))
    user_name: Mapped[str] = mapped_column(String(255))
    laptop_id: Mapped[str] = mapped_column(String(256))
    # out, checked-in, rolled-back, forced-in
    status: Mapped[str] = mapped_column(String(16), default="out")
    checked_out_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_expires_at: Mapped[datetime] = mapped_column()
    last_sync_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    # The layer's data key under the escrow key (``EscrowWrappedKey.to_json``).
    escrowed_key: Mapped[str] = mapped_column(Text)
    base_sha256: Mapped[str] = mapped_column(String(64))
    # The server's copy of the layer, whole: what the next check-in or sync applies to.
    layer_sha256: Mapped[str] = mapped_column(String(64))
    # What the laptop last said it has not sent back yet (or a transfer in flight still lacks).
    bytes_pending: Mapped[int] = mapped_column(BigInteger, default=0)
    # A transfer in flight: its encoded ``LayerDelta`` and whether it ends the check-out.
    transfer_plan: Mapped[bytes | None] = mapped_column(LargeBinary)
    transfer_kind: Mapped[str | None] = mapped_column(String(16))  # checkin or sync
    transfer_started_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)

    @property
    def active(self) -> bool:
        return self.ended_at is None

    def __repr__(self) -> str:
        return f"<OfflineCheckout {self.desktop_name!r} to {self.laptop_id!r} {self.status}>"


class OfflineCheckoutRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, checkout: OfflineCheckout) -> None:
        self._session.add(checkout)
        self._session.flush()

    def delete(self, checkout: OfflineCheckout) -> None:
        self._session.delete(checkout)
        self._session.flush()

    def get(self, checkout_id: uuid.UUID) -> OfflineCheckout:
        found = self._session.get(OfflineCheckout, checkout_id)
        if found is None:
            raise NotFound(f"there is no offline check-out {checkout_id}")
        return found

    def active_for(self, desktop_id: uuid.UUID, *, lock: bool = False) -> OfflineCheckout | None:
        stmt = select(OfflineCheckout).where(OfflineCheckout.desktop_id == desktop_id,
                                             OfflineCheckout.ended_at.is_(None))
        if lock:  # PostgreSQL: one transfer step per check-out at a time
            stmt = stmt.with_for_update()
        return self._session.scalars(stmt).one_or_none()

    def latest_for(self, desktop_id: uuid.UUID) -> OfflineCheckout | None:
        """The desktop's newest check-out, ended or not (its escrowed key opens the layer)."""
        return self._session.scalars(
            select(OfflineCheckout).where(OfflineCheckout.desktop_id == desktop_id)
            .order_by(OfflineCheckout.checked_out_at.desc()).limit(1)).one_or_none()

    def active(self, *, user: str | None = None) -> builtins.list[OfflineCheckout]:
        stmt = select(OfflineCheckout).where(OfflineCheckout.ended_at.is_(None))
        if user is not None:
            stmt = stmt.where(OfflineCheckout.user_name == user)
        return list(self._session.scalars(stmt.order_by(OfflineCheckout.checked_out_at)))

    def desktops_of(self, user: str) -> builtins.list[Desktop]:
        """The pool desktops assigned to ``user`` (the candidates for going offline)."""
        return list(self._session.scalars(
            select(Desktop).where(Desktop.assigned_user == user, Desktop.pool_id.is_not(None))
            .order_by(Desktop.name)))

    def revoked_ids(self, user: str) -> builtins.list[uuid.UUID]:
        """The user's revoked check-outs (ended or not): what their laptops must refuse."""
        return list(self._session.scalars(
            select(OfflineCheckout.id).where(OfflineCheckout.user_name == user,
                                             OfflineCheckout.revoked_at.is_not(None))))

    def end(self, checkout: OfflineCheckout, status: str) -> None:
        checkout.status = status
        checkout.ended_at = utcnow()
        checkout.transfer_plan = None
        checkout.transfer_kind = None
        checkout.transfer_started_at = None
        checkout.bytes_pending = 0
        self._session.flush()
