"""Failed sign-in counters, per user name and per client address (see ``SignInThrottle``)."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from deskpool.store.access_models import SignInThrottle


class SignInThrottleRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def get(self, kind: str, key: str, *, for_update: bool = False) -> SignInThrottle | None:
        """The counter for ``key``; ``for_update`` locks its row on PostgreSQL so two brokers
        counting the same key at once add up (SQLite's write transactions are serial)."""
        query = select(SignInThrottle).where(SignInThrottle.kind == kind,
                                             SignInThrottle.key == key)
        if for_update:
            query = query.with_for_update()
        return self.session.scalars(query).one_or_none()

    def add(self, row: SignInThrottle) -> SignInThrottle:
        self.session.add(row)
        self.session.flush()
        return row

    def clear(self, kind: str, key: str) -> None:
        self.session.execute(delete(SignInThrottle).where(SignInThrottle.kind == kind,
                                                          SignInThrottle.key == key))
