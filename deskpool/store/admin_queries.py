"""Queries of the admin surface and of ``/metrics``: what uses a host or a template version
(so a delete can refuse, naming why), the fleet counted by pool, state and host, and logon
phase histograms; each one grouped query, never a query per row.

Like every repository, this never commits.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, func, or_, select
from sqlalchemy.orm import Session

from deskpool.store.access_models import Logon
from deskpool.store.models import Desktop, Host, MemoryState, Pool, PoolHost


@dataclass(frozen=True)
class FleetRow:
    """Desktops of one pool (None: outside any pool) in one state on one host."""

    pool: str | None
    state: str
    host: str
    desktops: int
    console_connections: int


@dataclass(frozen=True)
class PhaseHistogram:
    """One logon phase's histogram: how many took at most each bound (cumulative, in the
    order of the bounds given), their sum and their count (milliseconds)."""

    cumulative: tuple[int, ...]
    sum_ms: int
    count: int


class AdminQueryRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    # --- what stands in the way of a delete ---------------------------------------------

    def desktops_on_host(self, host_id: uuid.UUID) -> builtins.list[str]:
        """The names of every desktop row on the host, whatever its state."""
        return builtins.list(self._session.scalars(
            select(Desktop.name).where(Desktop.host_id == host_id).order_by(Desktop.name)))

    def desktops_assigned_to(self, user: str) -> builtins.list[str]:
        """The names of the desktops assigned to the user (held, or dedicated to them)."""
        return builtins.list(self._session.scalars(
            select(Desktop.name).where(Desktop.assigned_user == user).order_by(Desktop.name)))

    def pools_pinned_to(self, host_id: uuid.UUID) -> builtins.list[str]:
        return builtins.list(self._session.scalars(
            select(Pool.name).join(PoolHost, PoolHost.pool_id == Pool.id)
            .where(PoolHost.host_id == host_id).order_by(Pool.name)))

    def forget_host(self, host_id: uuid.UUID) -> None:
        """Delete the rows that only describe the host (saved memory states made there);
        its slots and pins go with it (ON DELETE CASCADE)."""
        self._session.execute(delete(MemoryState).where(MemoryState.host_id == host_id))

    def desktops_of_version(self, version_id: uuid.UUID) -> builtins.list[str]:
        return builtins.list(self._session.scalars(
            select(Desktop.name).where(Desktop.template_version_id == version_id)
            .order_by(Desktop.name)))

    def pools_using_version(self, version_id: uuid.UUID) -> builtins.list[tuple[str, str]]:
        """(pool name, "current" or "previous") of every pool making desktops from the version
        or able to roll back to it."""
        rows = self._session.execute(
            select(Pool.name, Pool.current_version_id)
            .where(or_(Pool.current_version_id == version_id,
                       Pool.previous_version_id == version_id)).order_by(Pool.name))
        return [(name, "current" if current == version_id else "previous")
                for name, current in rows]

    def forget_version(self, version_id: uuid.UUID) -> None:
        self._session.execute(delete(MemoryState).where(MemoryState.version_id == version_id))

    # --- metrics --------------------------------------------------------------------------

    def fleet(self) -> builtins.list[FleetRow]:
        """Desktops and their open consoles by pool, state and host."""
        rows = self._session.execute(
            select(Pool.name, Desktop.state, Host.name, func.count(),
                   func.coalesce(func.sum(Desktop.console_connections), 0))
            .join(Host, Host.id == Desktop.host_id)
            .outerjoin(Pool, Pool.id == Desktop.pool_id)
            .group_by(Pool.name, Desktop.state, Host.name))
        return [FleetRow(pool, state.value, host, int(count), int(consoles))
                for pool, state, host, count, consoles in rows]

    def logon_phases(self, phases: Sequence[str],
                     bounds_ms: Sequence[float]) -> dict[str, PhaseHistogram]:
        """Each phase's histogram over every logon recorded (rows where it was measured), in
        one query: a SUM(CASE ...) per bound."""
        columns: list[Any] = []
        for phase in phases:
            column = getattr(Logon, f"{phase}_ms")
            columns += [func.sum(case((column <= bound, 1), else_=0)) for bound in bounds_ms]
            columns += [func.coalesce(func.sum(column), 0), func.count(column)]
        row = self._session.execute(select(*columns)).one()
        found: dict[str, PhaseHistogram] = {}
        width = len(bounds_ms) + 2
        for i, phase in enumerate(phases):
            values = [int(v or 0) for v in row[i * width:(i + 1) * width]]
            found[phase] = PhaseHistogram(tuple(values[:-2]), values[-2], values[-1])
        return found
