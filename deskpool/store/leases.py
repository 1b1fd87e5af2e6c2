"""Leases: which broker works on a pool or a desktop now, and until when.

Several brokers share the reconciler's work through leases on rows: a conditional UPDATE takes
one only if nobody else holds a live one, so of several brokers exactly one wins; a broker
that dies keeps its lease only until it expires, then another takes the work over.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from deskpool.store.models import Desktop, Pool


class Leased(StrEnum):
    """What a lease is on."""

    POOL = "pool"
    DESKTOP = "desktop"


_MODELS: dict[Leased, type[Desktop] | type[Pool]] = {Leased.POOL: Pool, Leased.DESKTOP: Desktop}


class LeaseRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def take(self, kind: Leased, row_id: uuid.UUID, owner: str, until: datetime,
             now: datetime) -> bool:
        """Lease the row to ``owner`` until ``until`` if nobody else holds a live lease on
        it (``owner``'s own lease is extended)."""
        model = _MODELS[kind]
        values: dict[str, Any] = {"lease_owner": owner, "lease_until": until}
        if model is Desktop:
            values["version"] = Desktop.version + 1
        return self._changed(
            update(model).where(model.id == row_id,
                                (model.lease_until.is_(None)) | (model.lease_until < now)
                                | (model.lease_owner == owner))
            .values(**values))

    def renew(self, kind: Leased, row_id: uuid.UUID, owner: str, until: datetime) -> bool:
        """Hold ``owner``'s lease longer; False if it lost it (it expired and another took it).

        The desktop's ORM ``version`` is left alone on purpose: the lease is renewed
        underneath a step that may hold the same row in its own session, and that step's
        writes must not go stale for it."""
        model = _MODELS[kind]
        return self._changed(update(model).where(model.id == row_id, model.lease_owner == owner)
                             .values(lease_until=until))

    def release(self, kind: Leased, row_id: uuid.UUID, owner: str) -> bool:
        """Let go of ``owner``'s lease; False if it held none (it expired and another took
        it)."""
        model = _MODELS[kind]
        values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
        if model is Desktop:
            values["version"] = Desktop.version + 1
        return self._changed(update(model).where(model.id == row_id,
                                                 model.lease_owner == owner)
                             .values(**values))

    def _changed(self, statement: Any) -> bool:
        result = cast(CursorResult[Any], self._session.execute(
            statement.execution_options(synchronize_session=False)))
        return result.rowcount == 1
