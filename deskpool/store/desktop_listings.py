"""Read-only listings of desktops for the edges (the user's and the admin's pages): each one
query however many desktops or pools there are, never a query per row.

Like every repository, these never commit.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from deskpool.domain.states import HELD_STATES, DesktopState
from deskpool.store.models import Desktop, Host, Pool, TemplateVersion


@dataclass(frozen=True)
class AdminDesktopRow:
    """A desktop with the names the admin's list shows beside it."""

    desktop: Desktop
    host: str
    pool: str | None
    version: int


@dataclass(frozen=True)
class PoolAvailability:
    """What a user's pool list shows of one pool: free ready desktops, and the user's own
    held desktop there (the first by name), if any."""

    ready: int = 0
    mine: str | None = None


class DesktopListingRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def for_admin(self) -> builtins.list[AdminDesktopRow]:
        """Every desktop, by name, with its host's and pool's names and version number."""
        return [AdminDesktopRow(d, host, pool, number) for d, host, pool, number in
                self._session.execute(
                    select(Desktop, Host.name, Pool.name, TemplateVersion.number)
                    .join(Host, Host.id == Desktop.host_id)
                    .join(TemplateVersion, TemplateVersion.id == Desktop.template_version_id)
                    .outerjoin(Pool, Pool.id == Desktop.pool_id).order_by(Desktop.name))]

    def held(self) -> builtins.list[Desktop]:
        """Every desktop a user holds, by name."""
        return builtins.list(self._session.scalars(
            select(Desktop).where(Desktop.state.in_(HELD_STATES)).order_by(Desktop.name)))

    def held_by(self, user: str) -> builtins.list[tuple[Desktop, str]]:
        """The pool desktops ``user`` holds, by name, with their pool's name."""
        return [(d, pool) for d, pool in self._session.execute(
            select(Desktop, Pool.name).join(Pool, Pool.id == Desktop.pool_id)
            .where(Desktop.assigned_user == user, Desktop.state.in_(HELD_STATES))
            .order_by(Desktop.name))]

    def availability(self, pool_ids: Collection[uuid.UUID],
                     user: str) -> dict[uuid.UUID, PoolAvailability]:
        """Each pool's free ready desktops and ``user``'s held one, in one query (pools with
        neither are left out)."""
        if not pool_ids:
            return {}
        ready = (Desktop.state == DesktopState.READY.value) & Desktop.assigned_user.is_(None)
        mine = (Desktop.assigned_user == user) & Desktop.state.in_(HELD_STATES)
        found: dict[uuid.UUID, PoolAvailability] = {}
        for pool_id, name, is_ready in self._session.execute(
                select(Desktop.pool_id, Desktop.name, ready)
                .where(Desktop.pool_id.in_(builtins.list(pool_ids)), ready | mine)
                .order_by(Desktop.name)):
            seen = found.get(pool_id, PoolAvailability())
            if is_ready:
                seen = PoolAvailability(seen.ready + 1, seen.mine)
            elif seen.mine is None:
                seen = PoolAvailability(seen.ready, name)
            found[pool_id] = seen
        return found

    def state_counts_by_pool(self, pool_id: uuid.UUID | None = None
                             ) -> dict[uuid.UUID, dict[str, int]]:
        """How many desktops each pool (or the one given) has in each state, in one query;
        pools without desktops are left out."""
        query = (select(Desktop.pool_id, Desktop.state, func.count())
                 .where(Desktop.pool_id.is_not(None))
                 .group_by(Desktop.pool_id, Desktop.state).order_by(Desktop.state))
        if pool_id is not None:
            query = query.where(Desktop.pool_id == pool_id)
        counts: dict[uuid.UUID, dict[str, int]] = {}
        for pool_id_, state, count in self._session.execute(query):
            counts.setdefault(pool_id_, {})[state] = count
        return counts
