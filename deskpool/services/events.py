"""The admin's event log: one sentence per thing that happened, written in the same
transaction as the change it reports, so an event never describes a change that rolled back."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from deskpool.services.context import ServiceContext
from deskpool.store.db import UnitOfWork


@dataclass(frozen=True)
class EventView:
    id: int
    at: datetime
    kind: str
    severity: str
    user: str | None
    pool: str | None
    desktop: str | None
    message: str


def record_event(uow: UnitOfWork, kind: str, message: str, *, severity: str = "info",
                 user: str | None = None, pool: str | None = None,
                 desktop_id: uuid.UUID | None = None, desktop: str | None = None,
                 details: str | None = None) -> None:
    """``details``: facts for code to read back (JSON), besides the sentence for people."""
    uow.events.add(kind, message, severity=severity, user=user, pool=pool,
                   desktop_id=desktop_id, desktop=desktop, details=details)


def recent_events(ctx: ServiceContext, *, limit: int = 200,
                  user: str | None = None) -> list[EventView]:
    with ctx.uow(read_only=True) as uow:
        return [EventView(id=e.id, at=e.at, kind=e.kind, severity=e.severity,
                          user=e.user_name, pool=e.pool_name, desktop=e.desktop_name,
                          message=e.message)
                for e in uow.events.recent(limit, user=user)]


# Events written for a user to read (their desktop was lost: a crash, a host down; their
# profile was open twice), shown on
# their portal page; the rest of their events (consoles opened, logins) are the admin's log.
USER_MESSAGE_KINDS = ("desktop-lost", "desktop-restarted", "folders-local", "layer-conflicts",
                      "profile-merged", "profile-read-only", "profile-second-session",
                      "profile-temporary")


def messages_for(ctx: ServiceContext, user: str, *, limit: int = 5) -> list[EventView]:
    """The newest events ``user`` is meant to read, newest first."""
    with ctx.uow(read_only=True) as uow:
        found = [e for kind in USER_MESSAGE_KINDS
                 for e in uow.events.recent(limit, user=user, kind=kind)]
        found.sort(key=lambda e: e.id, reverse=True)
        return [EventView(id=e.id, at=e.at, kind=e.kind, severity=e.severity,
                          user=e.user_name, pool=e.pool_name, desktop=e.desktop_name,
                          message=e.message)
                for e in found[:limit]]
