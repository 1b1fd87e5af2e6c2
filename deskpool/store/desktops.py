"""The desktop repository: every read of desktop rows and every write of their state.

A desktop's ``state`` changes only here, and only through :meth:`DesktopRepository._write_state`:
a check against the transition table (``deskpool.domain.states``), then one conditional
``UPDATE desktops SET state = :new ... WHERE <which desktop> AND state = :expected``. Of any
number of brokers or reconcilers racing on the same desktop, exactly one changes it. The
broker's claim is such a write too (:meth:`DesktopRepository.claim_free`), its WHERE clause
picking the first free desktop. ``tests/unit/test_state_writes.py`` scans the package for any
other state write.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Row, case, select, update
from sqlalchemy.orm.util import identity_key

from deskpool.domain.errors import InvalidInput
from deskpool.domain.models import HostState, PowerState
from deskpool.domain.states import (
    NOT_LIVE_STATES,
    DesktopState,
    DesktopTask,
    check_transition,
)
from deskpool.store.models import Desktop, Host, utcnow
from deskpool.store.repositories import _NamedRepository, _Unique

S = DesktopState


@dataclass(frozen=True, slots=True)
class DesktopSummary:
    """The columns the reconciler reads for every desktop on every pass, without building ORM
    objects (at 10,000 desktops those cost most of a pass, and the garbage collector's time
    grows with them)."""

    id: uuid.UUID
    host_id: uuid.UUID
    pool_id: uuid.UUID | None
    template_version_id: uuid.UUID
    state: DesktopState
    power_state: PowerState
    task: DesktopTask | None
    assigned_user: str | None
    created_at: datetime
    next_attempt_at: datetime | None


_SUMMARY_COLUMNS = (
    Desktop.id, Desktop.host_id, Desktop.pool_id, Desktop.template_version_id, Desktop.state,
    Desktop.power_state, Desktop.task, Desktop.assigned_user, Desktop.created_at,
    Desktop.next_attempt_at,
)


@dataclass(frozen=True, slots=True)
class ClaimedDesktop:
    """What the broker needs of a desktop it just reserved for a user."""

    id: uuid.UUID
    name: str
    hostname: str
    host_id: uuid.UUID
    template_version_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class UserDesktop:
    """A live desktop a user has in a pool, with its host's name and state."""

    id: uuid.UUID
    name: str
    hostname: str
    state: DesktopState
    host_id: uuid.UUID
    template_version_id: uuid.UUID
    host: str
    host_state: HostState


@dataclass(frozen=True, slots=True)
class PoolSeat:
    """One live desktop of a pool, as the broker counts them when the pool may be full."""

    state: DesktopState
    assigned_user: str | None


_CLAIMED_COLUMNS = (Desktop.id, Desktop.name, Desktop.hostname, Desktop.host_id,
                    Desktop.template_version_id)
# A new session starts clean: the previous user's console and idle bookkeeping goes.
_FRESH_SESSION: dict[str, Any] = {"console_connections": 0, "disconnected_at": None,
                                  "idle_since": None}


def _state(value: str) -> DesktopState:
    try:
        return DesktopState(value)
    except ValueError:
        raise InvalidInput(f"{value!r} is not a desktop state") from None


class DesktopRepository(_NamedRepository[Desktop]):
    _model = Desktop
    _kind = "desktop"
    _name_attr = Desktop.name
    _uniques = (
        _Unique(("name",), lambda d: f"a desktop named {d.name!r} already exists"),
        _Unique(("mac",), lambda d: f"a desktop with MAC address {d.mac!r} already exists"),
        _Unique(
            ("machine_id",), lambda d: f"a desktop with machine-id {d.machine_id!r} already exists"
        ),
    )

    # --- reads ----------------------------------------------------------------------------

    def names(self) -> set[str]:
        """Every desktop name in use (to pick the next free name of a naming pattern)."""
        return set(self._session.scalars(select(Desktop.name)))

    def summaries(
        self, *, host_id: uuid.UUID | None = None, pool_id: uuid.UUID | None = None
    ) -> builtins.list[DesktopSummary]:
        """Every desktop (or those of one host or pool) as ``DesktopSummary`` rows."""
        stmt = select(*_SUMMARY_COLUMNS)
        if host_id is not None:
            stmt = stmt.where(Desktop.host_id == host_id)
        if pool_id is not None:
            stmt = stmt.where(Desktop.pool_id == pool_id)
        return [DesktopSummary(*row) for row in self._session.execute(stmt)]

    def host_ids(self) -> dict[uuid.UUID, uuid.UUID]:
        """Each desktop's host, by desktop id (two columns: cheap at any size)."""
        return {row.id: row.host_id
                for row in self._session.execute(select(Desktop.id, Desktop.host_id))}

    def macs(self) -> set[str]:
        """Every MAC address in use (a new desktop draws one that is not)."""
        return set(self._session.scalars(select(Desktop.mac)))

    def by_host(self, host_id: uuid.UUID) -> builtins.list[Desktop]:
        return builtins.list(
            self._session.scalars(
                select(Desktop).where(Desktop.host_id == host_id).order_by(Desktop.name)
            )
        )

    def by_state(self, state: DesktopState) -> builtins.list[Desktop]:
        return builtins.list(
            self._session.scalars(
                select(Desktop).where(Desktop.state == state).order_by(Desktop.name)
            )
        )

    def of_user_in_pool(self, pool_id: uuid.UUID, user: str) -> builtins.list[UserDesktop]:
        """The user's desktops in a pool that are not on their way out: held, being made for
        them, dedicated, or failed while still theirs (a stateful one being repaired)."""
        rows = self._session.execute(
            select(Desktop.id, Desktop.name, Desktop.hostname, Desktop.state, Desktop.host_id,
                   Desktop.template_version_id, Host.name, Host.state)
            .join(Host, Host.id == Desktop.host_id)
            .where(Desktop.pool_id == pool_id, Desktop.assigned_user == user,
                   Desktop.state.not_in(NOT_LIVE_STATES - {S.ERROR})))
        return [UserDesktop(*row) for row in rows]

    def share_holders(self, user: str) -> builtins.list[str]:
        """The desktops (by name) whose session holds a password to ``user``'s file share."""
        return builtins.list(self._session.scalars(
            select(Desktop.name).where(Desktop.share_user == user).order_by(Desktop.name)))

    def seats(self, pool_id: uuid.UUID) -> builtins.list[PoolSeat]:
        """Every live desktop of a pool: how full it is, and whether a seat is coming free."""
        rows = self._session.execute(
            select(Desktop.state, Desktop.assigned_user).where(
                Desktop.pool_id == pool_id, Desktop.state.not_in(NOT_LIVE_STATES)))
        return [PoolSeat(*row) for row in rows]

    # --- state writes: each one compare-and-swap through the table -------------------------

    def compare_and_set_state(
        self,
        desktop_id: uuid.UUID,
        expected: DesktopState,
        new: DesktopState,
        *,
        task: DesktopTask | None = None,
        last_error: str | None = None,
    ) -> bool:
        """Move a desktop from ``expected`` to ``new`` if, and only if, it is in ``expected``.

        One statement: ``UPDATE desktops SET state=:new, task=:task, last_error=:last_error,
        state_changed_at=now, version=version+1 WHERE id=:id AND state=:expected``. ``task`` and
        ``last_error`` are written as given, so the default ``None`` clears them. Returns
        whether exactly one row changed: ``False`` when the desktop is in another state (someone
        else won) or does not exist. Raises ``InvalidTransition`` for a move the table forbids.
        A loaded ``Desktop`` in this session is expired, so its next attribute access reads the
        new row.
        """
        return self._write_state(Desktop.id == desktop_id, _state(expected), _state(new),
                                 task=task, last_error=last_error) is not None

    def reserve(self, desktop_id: uuid.UUID, user: str) -> bool:
        """``ready -> reserved`` for ``user`` (their own desktop: dedicated, or made for them),
        with a fresh session's bookkeeping; ``False`` if it is no longer ready."""
        return self._write_state(Desktop.id == desktop_id, S.READY, S.RESERVED,
                                 assigned_user=user, reserved_at=utcnow(),
                                 **_FRESH_SESSION) is not None

    def claim_free(self, pool_id: uuid.UUID, version_id: uuid.UUID, user: str,
                   now: datetime, *, prefer_hosts: Collection[uuid.UUID] = ()
                   ) -> ClaimedDesktop | None:
        """``ready -> reserved`` for ``user`` on the first free desktop of the pool's current
        version, on an enabled host, in one UPDATE whose subquery picks it (skipping rows other
        brokers have locked, on PostgreSQL). ``None`` when there is none.

        A desktop under a reconciler's live lease is skipped: the reconciler may be suspending
        or shutting it down (the pool's power policy) and would do so under the user. Leases
        are short and renewed while work runs, so a dead broker's lease hides a desktop for
        at most one lease time. A desktop on one of ``prefer_hosts`` (holding the user's
        roaming profile: no layer to copy) is taken before the others."""
        unleased = Desktop.lease_until.is_(None) | (Desktop.lease_until < now)
        order = ([case((Desktop.host_id.in_(list(prefer_hosts)), 0), else_=1)]
                 if prefer_hosts else [])
        first_free = (
            select(Desktop.id).join(Host, Host.id == Desktop.host_id).where(
                Desktop.pool_id == pool_id, Desktop.state == S.READY,
                Desktop.assigned_user.is_(None), Host.state == HostState.ENABLED,
                Desktop.template_version_id == version_id, unleased)
            .order_by(*order, Desktop.name).limit(1).with_for_update(skip_locked=True)
            .scalar_subquery())
        row = self._write_state(
            (Desktop.id == first_free) & Desktop.assigned_user.is_(None) & unleased,
            S.READY, S.RESERVED, returning=_CLAIMED_COLUMNS,
            assigned_user=user, reserved_at=now, **_FRESH_SESSION)
        return None if row is None else ClaimedDesktop(*row)

    def give_back(self, desktop_id: uuid.UUID, *, keep_user: bool) -> bool:
        """``reserved -> ready``: a reservation its user could not use, through no fault of
        the desktop's; unassigned unless ``keep_user`` (a dedicated desktop stays its
        user's). ``False`` if it moved on meanwhile."""
        fields: dict[str, Any] = {"reserved_at": None}
        if not keep_user:
            fields["assigned_user"] = None
        return self._write_state(Desktop.id == desktop_id, S.RESERVED, S.READY,
                                 **fields) is not None

    def fail_and_unassign(self, desktop_id: uuid.UUID, expected: DesktopState,
                          reason: str) -> bool:
        """``expected -> error`` with ``reason``, given back by its user (nothing stays
        reserved for someone who got an error); ``False`` if it moved on meanwhile."""
        return self._write_state(Desktop.id == desktop_id, _state(expected), S.ERROR,
                                 last_error=reason, assigned_user=None,
                                 reserved_at=None) is not None

    def _write_state(
        self, which: ColumnElement[bool], expected: DesktopState, new: DesktopState, *,
        task: DesktopTask | None = None, last_error: str | None = None,
        returning: tuple[Any, ...] = (Desktop.id,), **fields: Any,
    ) -> Row[Any] | None:
        """The one place a desktop's state is written: the table's check, then one
        ``UPDATE ... WHERE which AND state = expected``; the changed row (``returning``) or
        ``None`` when no desktop matched. ``fields`` are written in the same statement."""
        check_transition(expected, new)
        statement = (
            update(Desktop).where(which, Desktop.state == expected)
            .values(state=new, task=task, last_error=last_error, state_changed_at=utcnow(),
                    version=Desktop.version + 1, **fields)
            .returning(*returning)
            .execution_options(synchronize_session=False)
        )
        row = self._session.execute(statement).first()
        if row is not None:
            self._expire(row[0])  # every ``returning`` starts with the id
        return row

    def compare_and_set_power(
        self, desktop_id: uuid.UUID, expected: PowerState, new: PowerState
    ) -> bool:
        """Record an observed power state if the stored one is still ``expected``.

        Same single-statement shape as :meth:`compare_and_set_state`; increments ``version``.
        """
        statement = (
            update(Desktop)
            .where(Desktop.id == desktop_id, Desktop.power_state == expected)
            .values(power_state=new, version=Desktop.version + 1)
            .execution_options(synchronize_session=False)
        )
        result = cast(CursorResult[Any], self._session.execute(statement))
        self._expire(desktop_id)
        return result.rowcount == 1

    def move_to_host(self, desktop_id: uuid.UUID, expected: uuid.UUID, new: uuid.UUID, *,
                     unleased_at: datetime | None = None) -> bool:
        """Record that the desktop's VM now runs on host ``new`` (it was migrated there) if
        its row still names ``expected``; with ``unleased_at``, only if no live lease holds
        the row then (a migration in progress owns it). Increments ``version``."""
        condition = (Desktop.id == desktop_id) & (Desktop.host_id == expected)
        if unleased_at is not None:
            condition &= Desktop.lease_until.is_(None) | (Desktop.lease_until < unleased_at)
        statement = (update(Desktop).where(condition)
                     .values(host_id=new, moving_to_id=None, version=Desktop.version + 1)
                     .execution_options(synchronize_session=False))
        result = cast(CursorResult[Any], self._session.execute(statement))
        self._expire(desktop_id)
        return result.rowcount == 1

    def rebased_onto(self, desktop_id: uuid.UUID, expected: uuid.UUID,
                     new: uuid.UUID) -> bool:
        """Record that the desktop (recycling) now runs template version ``new``, its user
        layer rebased onto it, if its row still names ``expected``. Increments ``version``."""
        statement = (update(Desktop)
                     .where(Desktop.id == desktop_id, Desktop.state == S.RECYCLING,
                            Desktop.template_version_id == expected)
                     .values(template_version_id=new, version=Desktop.version + 1)
                     .execution_options(synchronize_session=False))
        result = cast(CursorResult[Any], self._session.execute(statement))
        self._expire(desktop_id)
        return result.rowcount == 1

    def set_moving_to(self, desktop_id: uuid.UUID, host_id: uuid.UUID | None) -> None:
        """Record the host a live move takes the desktop to (None: no move runs). Not a
        state: the console proxies read it to follow the move."""
        self._session.execute(update(Desktop).where(Desktop.id == desktop_id)
                              .values(moving_to_id=host_id, version=Desktop.version + 1)
                              .execution_options(synchronize_session=False))
        self._expire(desktop_id)

    def _expire(self, desktop_id: uuid.UUID) -> None:
        """A loaded ``Desktop`` re-reads its row at next access (it was written behind the
        ORM's back)."""
        loaded = self._session.identity_map.get(identity_key(Desktop, desktop_id))
        if loaded is not None:
            self._session.expire(loaded)
