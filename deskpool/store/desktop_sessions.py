"""The user-session fields of a desktop row: console counters, ``reserved_at``,
``disconnected_at``, ``idle_since``, ``guest_user``, ``notice``, ``sessions_served``, and the
reads the session timers and the host watch make of them.

The desktop's *state* is not written here: it changes only through
``DesktopRepository.compare_and_set_state`` (``deskpool.domain.states.transition``). Each write
here is one UPDATE that, like every desktop write, increments ``version`` (except
``count_session_served``, which rides along with the state change of the logoff), and
leaves loaded ``Desktop`` objects as they are (``synchronize_session=False``).
Repositories never commit.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from deskpool.domain.models import CloneMode, HostState, PowerState, moves_live
from deskpool.domain.pools import PoolKind
from deskpool.domain.states import HELD_STATES, DesktopState
from deskpool.store.models import Desktop, Host, Pool


@dataclass(frozen=True)
class TimedSession:
    """What the session timers need of a held desktop (or a ready one made for a user)."""

    id: uuid.UUID
    name: str
    state: str
    pool_id: uuid.UUID | None
    reserved_at: datetime | None
    disconnected_at: datetime | None
    idle_since: datetime | None
    console_connections: int
    assigned_user: str | None
    guest_user: str | None


@dataclass(frozen=True)
class DueLogoff:
    """A session on a draining host whose deadline has passed."""

    desktop_id: uuid.UUID
    desktop: str
    host: str


@dataclass(frozen=True)
class HostDesktop:
    """A desktop of one host as the host watch sees it (``pool``: its pool's name, or None,
    ``pool_kind`` likewise)."""

    id: uuid.UUID
    name: str
    state: str
    assigned_user: str | None
    notice: str | None
    pool: str | None
    pool_kind: PoolKind | None
    clone_mode: CloneMode
    power_state: PowerState

    @property
    def movable(self) -> bool:
        """Whether it may move live (``services/migration``)."""
        return moves_live(self.clone_mode, self.power_state)


class DesktopSessionRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def _write(self, desktop_id: uuid.UUID, *, bump_version: bool = True,
               **values: Any) -> None:
        if bump_version:
            values["version"] = Desktop.version + 1
        self._session.execute(update(Desktop).where(Desktop.id == desktop_id).values(**values)
                              .execution_options(synchronize_session=False))

    # --- writes ------------------------------------------------------------------------------

    def clear(self, desktop_id: uuid.UUID, *, unassign: bool) -> None:
        """Forget the session: reservation, consoles, idle and guest user, notice; with
        ``unassign`` the desktop's user too."""
        values: dict[str, Any] = dict(reserved_at=None, console_connections=0,
                                      disconnected_at=None, idle_since=None, guest_user=None,
                                      notice=None)
        if unassign:
            values["assigned_user"] = None
        self._write(desktop_id, **values)

    def console_opened(self, desktop_id: uuid.UUID) -> None:
        """One more console open (counted in the database, so brokers add up)."""
        self._write(desktop_id, console_connections=Desktop.console_connections + 1,
                    disconnected_at=None)

    def console_closed(self, desktop_id: uuid.UUID, remaining: int, *,
                       disconnected_at: datetime | None = None) -> None:
        """Consoles still open after one closed; ``disconnected_at`` given: the last one
        closed then (None leaves it as it is)."""
        values: dict[str, Any] = {"console_connections": remaining}
        if disconnected_at is not None:
            values["disconnected_at"] = disconnected_at
        self._write(desktop_id, **values)

    def count_session_served(self, desktop_id: uuid.UUID) -> None:
        """One more session served. Written in the logoff's unit of work, after its state
        change, which already counted the row's version."""
        self._write(desktop_id, bump_version=False,
                    sessions_served=Desktop.sessions_served + 1)

    def set_idle_since(self, desktop_id: uuid.UUID, since: datetime | None) -> None:
        self._write(desktop_id, idle_since=since)

    def set_guest_user(self, desktop_id: uuid.UUID, user: str | None) -> None:
        self._write(desktop_id, guest_user=user)

    def set_notice(self, desktop_id: uuid.UUID, notice: str | None) -> None:
        self._write(desktop_id, notice=notice)

    def clear_notices_on_host(self, host_id: uuid.UUID) -> None:
        """Take down every notice shown on the host's desktops (a drain's warnings)."""
        self._session.execute(update(Desktop).where(
            Desktop.host_id == host_id, Desktop.notice.is_not(None))
            .values(notice=None, version=Desktop.version + 1)
            .execution_options(synchronize_session=False))

    def release_from_lost_host(self, desktop_id: uuid.UUID) -> None:
        """The desktop's user lets go of it (its host is down): no user, no reservation, no
        console."""
        self._write(desktop_id, assigned_user=None, reserved_at=None, console_connections=0)

    # --- reads -------------------------------------------------------------------------------

    def timed(self) -> builtins.list[TimedSession]:
        """Desktops the session timers watch: held ones, and ready ones made for a user
        (``reserved_at`` set)."""
        return [TimedSession(*row) for row in self._session.execute(
            select(Desktop.id, Desktop.name, Desktop.state, Desktop.pool_id,
                   Desktop.reserved_at, Desktop.disconnected_at, Desktop.idle_since,
                   Desktop.console_connections, Desktop.assigned_user, Desktop.guest_user)
            .where(Desktop.state.in_(HELD_STATES) | (
                (Desktop.state == DesktopState.READY.value)
                & Desktop.reserved_at.is_not(None))))]

    def due_on_drained_hosts(self, now: datetime) -> builtins.list[DueLogoff]:
        """Held desktops on draining hosts whose drain deadline is ``now`` or earlier."""
        return [DueLogoff(*row) for row in self._session.execute(
            select(Desktop.id, Desktop.name, Host.name).join(Host, Host.id == Desktop.host_id)
            .where(Host.state == HostState.DRAINING, Host.drain_deadline <= now,
                   Desktop.state.in_(HELD_STATES)))]

    def on_host(self, host_id: uuid.UUID, *, pool_kind: PoolKind | None = None,
                states: Collection[str] | None = None) -> builtins.list[HostDesktop]:
        """The host's desktops, with their pool's name and kind; given ``pool_kind``, only
        those of pools of that kind; given ``states``, only those in one of them."""
        query = (select(Desktop.id, Desktop.name, Desktop.state, Desktop.assigned_user,
                        Desktop.notice, Pool.name, Pool.kind, Desktop.clone_mode,
                        Desktop.power_state)
                 .where(Desktop.host_id == host_id))
        if pool_kind is None:
            query = query.join(Pool, Pool.id == Desktop.pool_id, isouter=True)
        else:
            query = query.join(Pool, Pool.id == Desktop.pool_id).where(Pool.kind == pool_kind)
        if states is not None:
            query = query.where(Desktop.state.in_(builtins.list(states)))
        return [HostDesktop(*row) for row in self._session.execute(query)]
