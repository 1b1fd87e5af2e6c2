"""Starting a checked-out desktop with no network: the lease and the password, both required.

The order is deliberate: the lease is checked first (cheap, and its refusal says when to
reconnect), then the password unwraps the layer's key (Argon2id, the slow part). The cached
base must be the one the lease names, so a laptop cannot run its layer over another template.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deskpool.domain.offline import (
    LeaseRefused,
    OfflineLease,
    SignedLease,
    reconnect_notice,
    verify_lease,
)
from deskpool.domain.offline_keys import KeyBinding, UserWrappedKey, unwrap_for_user


@dataclass(frozen=True)
class OfflineStart:
    """What the client needs to define and start the laptop's domain."""

    lease: OfflineLease
    data_key: bytes = field(repr=False)  # the layer's LUKS key; never logged
    notice: str  # when to reconnect, shown at start


def authorize_offline_start(*, signed_lease: SignedLease, server_key: Ed25519PublicKey,
                            wrapped_key: UserWrappedKey, password: str, user: str,
                            desktop_id: uuid.UUID, laptop_id: str, cached_base_sha256: str,
                            now: datetime, revoked_checkouts: Collection[uuid.UUID] = (),
                            latest_seen: datetime | None = None) -> OfflineStart:
    """Raises ``LeaseRefused`` (with when to reconnect) or ``WrongPassword``."""
    lease = verify_lease(signed_lease, server_key, now=now, user=user, desktop_id=desktop_id,
                         laptop_id=laptop_id, revoked_checkouts=revoked_checkouts,
                         latest_seen=latest_seen)
    if cached_base_sha256 != lease.base_sha256:
        raise LeaseRefused("the template image cached on this laptop is not the one this "
                           "desktop was checked out on; connect to the network and sync")
    data_key = unwrap_for_user(wrapped_key, password, KeyBinding(user, desktop_id, laptop_id))
    return OfflineStart(lease=lease, data_key=data_key, notice=reconnect_notice(lease, now))
