"""Taking and giving back a host's slots (``HostSlot``): compare-and-swap UPDATEs, so of
several brokers exactly one gets each slot. Like the repositories, these never commit."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from deskpool.store.models import HostSlot


def take_host_slot(session: Session, host_id: uuid.UUID, kind: str, limit: int, holder: str,
                   until: datetime, now: datetime) -> int | None:
    """One of the host's first ``limit`` slots of ``kind``, free or expired, now held by
    ``holder`` until ``until``; None when all are held."""
    held = {slot: until_ for slot, until_ in session.execute(
        select(HostSlot.slot, HostSlot.held_until)
        .where(HostSlot.host_id == host_id, HostSlot.kind == kind, HostSlot.slot < limit))}
    missing = [slot for slot in range(limit) if slot not in held]
    if missing:
        _insert_missing(session, host_id, kind, missing)
    free = [slot for slot in range(limit)
            if slot not in held or held[slot] is None or held[slot] < now]
    for slot in free:
        result = cast(CursorResult[Any], session.execute(
            update(HostSlot)
            .where(HostSlot.host_id == host_id, HostSlot.kind == kind, HostSlot.slot == slot,
                   HostSlot.held_until.is_(None) | (HostSlot.held_until < now))
            .values(holder=holder, held_until=until)
            .execution_options(synchronize_session=False)))
        if result.rowcount == 1:
            return slot
    return None


def release_host_slot(session: Session, host_id: uuid.UUID, kind: str, slot: int,
                      holder: str) -> None:
    """Give the slot back, if ``holder`` still holds it (an expired one may be another's)."""
    session.execute(
        update(HostSlot)
        .where(HostSlot.host_id == host_id, HostSlot.kind == kind, HostSlot.slot == slot,
               HostSlot.holder == holder)
        .values(holder=None, held_until=None)
        .execution_options(synchronize_session=False))


def _insert_missing(session: Session, host_id: uuid.UUID, kind: str, slots: list[int]) -> None:
    """Free slot rows; another broker inserting the same ones at once is no error."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(HostSlot).values(
        [{"host_id": host_id, "kind": kind, "slot": slot} for slot in slots]
    ).on_conflict_do_nothing())


def renew_host_slot(session: Session, host_id: uuid.UUID, kind: str, slot: int, holder: str,
                    until: datetime) -> bool:
    """Hold the slot longer; False if ``holder`` lost it (it expired and was taken)."""
    result = cast(CursorResult[Any], session.execute(
        update(HostSlot)
        .where(HostSlot.host_id == host_id, HostSlot.kind == kind, HostSlot.slot == slot,
               HostSlot.holder == holder)
        .values(held_until=until)
        .execution_options(synchronize_session=False)))
    return result.rowcount == 1


def held_by(session: Session, host_id: uuid.UUID, kind: str, holder: str) -> int | None:
    """The slot of ``kind`` that ``holder`` holds on the host (expired or not), if any."""
    return session.scalars(
        select(HostSlot.slot).where(HostSlot.host_id == host_id, HostSlot.kind == kind,
                                    HostSlot.holder == holder).limit(1)).one_or_none()


def held_by_prefix(session: Session, kind: str,
                   prefix: str) -> list[tuple[uuid.UUID, int, str]]:
    """(host, slot, holder) of every slot of ``kind`` whose holder starts with ``prefix``."""
    return [(h, n, who) for h, n, who in session.execute(
        select(HostSlot.host_id, HostSlot.slot, HostSlot.holder).where(
            HostSlot.kind == kind, HostSlot.holder.startswith(prefix, autoescape=True)))]


class HostSlotRepository:
    """The functions above over a unit of work's session (``uow.host_slots``)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def take(self, host_id: uuid.UUID, kind: str, limit: int, holder: str, until: datetime,
             now: datetime) -> int | None:
        """See :func:`take_host_slot`."""
        return take_host_slot(self._session, host_id, kind, limit, holder, until, now)

    def renew(self, host_id: uuid.UUID, kind: str, slot: int, holder: str,
              until: datetime) -> bool:
        """See :func:`renew_host_slot`."""
        return renew_host_slot(self._session, host_id, kind, slot, holder, until)

    def release(self, host_id: uuid.UUID, kind: str, slot: int, holder: str) -> None:
        """See :func:`release_host_slot`."""
        release_host_slot(self._session, host_id, kind, slot, holder)

    def held_by(self, host_id: uuid.UUID, kind: str, holder: str) -> int | None:
        """See :func:`held_by`."""
        return held_by(self._session, host_id, kind, holder)

    def held_by_prefix(self, kind: str, prefix: str) -> list[tuple[uuid.UUID, int, str]]:
        """See :func:`held_by_prefix`."""
        return held_by_prefix(self._session, kind, prefix)
