"""The hosts a pool is pinned to (``PoolHost``): its desktops go only there; no rows means
any host. Like every repository, this never commits."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from deskpool.store.models import PoolHost


class PoolHostRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def pin(self, pool_id: uuid.UUID, host_id: uuid.UUID) -> None:
        self._session.add(PoolHost(pool_id=pool_id, host_id=host_id))

    def pinned(self, pool_id: uuid.UUID) -> set[uuid.UUID]:
        """The hosts the pool is pinned to (empty: it may use any)."""
        return set(self._session.scalars(
            select(PoolHost.host_id).where(PoolHost.pool_id == pool_id)))

    def unpin_all(self, pool_id: uuid.UUID) -> None:
        self._session.execute(delete(PoolHost).where(PoolHost.pool_id == pool_id))
