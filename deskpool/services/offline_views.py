"""What the offline service answers (``deskpool.services.offline``), and the refusal an online
connect to a checked-out desktop gets."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from deskpool.domain.offline import OfflinePolicy, human_date
from deskpool.store.db import UnitOfWork
from deskpool.store.offline import OfflineCheckout


@dataclass(frozen=True)
class CheckoutView:
    id: uuid.UUID
    desktop: str
    pool: str
    user: str
    laptop: str
    status: str  # out, checked-in, rolled-back, forced-in
    since: datetime
    lease_expires_at: datetime
    last_sync_at: datetime | None
    revoked: bool
    bytes_pending: int
    transfer: str | None  # a check-in or sync in flight
    ended_at: datetime | None


@dataclass(frozen=True)
class OfflineDesktopView:
    desktop: str
    pool: str
    state: str
    policy: OfflinePolicy
    checkout: CheckoutView | None
    # What a check-out downloads first, for the laptop to check its free space beforehand
    # (nothing when it has this base cached already).
    base_sha256: str = ""
    base_size: int = 0


@dataclass(frozen=True)
class LeaseGrant:
    """What the laptop gets at check-out and at each renewal. ``data_key`` (base64) only at
    check-out: the laptop wraps it under the user's password and the server never sees it in
    clear again."""

    checkout: CheckoutView
    lease: str  # ``SignedLease.to_json``
    public_key_pem: str
    base_sha256: str
    layer_sha256: str
    base_size: int = 0  # bytes to download (the base only when not cached yet)
    layer_size: int = 0
    data_key: str | None = None


@dataclass(frozen=True)
class TransferView:
    desktop: str
    kind: str
    chunks: int
    missing: list[int]
    bytes_pending: int


def checkout_view(c: OfflineCheckout) -> CheckoutView:
    return CheckoutView(id=c.id, desktop=c.desktop_name, pool=c.pool_name, user=c.user_name,
                        laptop=c.laptop_id, status=c.status, since=c.checked_out_at,
                        lease_expires_at=c.lease_expires_at, last_sync_at=c.last_sync_at,
                        revoked=c.revoked_at is not None, bytes_pending=c.bytes_pending,
                        transfer=c.transfer_kind, ended_at=c.ended_at)


def checked_out_refusal(uow: UnitOfWork, desktop_id: uuid.UUID, name: str) -> str:
    """What an online connect to a checked-out desktop answers."""
    c = uow.offline_checkouts.active_for(desktop_id)
    if c is None:  # between the state write and the row, never seen committed
        return f"desktop {name} is checked out to a laptop"
    return (f"desktop {name} is checked out to {c.laptop_id} until "
            f"{human_date(c.lease_expires_at)}; check it in from that laptop to use it online")
