"""User layer rebases (issue 14): what each rebase of a desktop's user layer did, its
conflicts and notes, a pool's rollout in numbers, and a desktop's layer status.

The rows are ``LayerRebase`` and ``LayerRebaseItem`` (``deskpool.store.models``); the layer
status lives in the desktop's own ``layer_*`` columns, written here by one ``UPDATE`` that
bumps the desktop's optimistic-concurrency ``version`` as every other write does.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from deskpool.domain.errors import NotFound
from deskpool.domain.layers import RebaseReport
from deskpool.domain.states import DesktopState
from deskpool.store.models import (
    Desktop,
    LayerRebase,
    LayerRebaseItem,
    TemplateVersion,
    utcnow,
)

REBASED = "rebased"
FAILED = "failed"
CONFLICT = "conflict"
NOTE = "note"

# Desktops that no longer count in a pool's versions: gone, or on their way out.
_GONE = (DesktopState.RETIRED, DesktopState.DELETING)


@dataclass(frozen=True, slots=True)
class RolloutConflict:
    """A conflict of a pool's rollout, with the desktop it happened on."""

    desktop_id: uuid.UUID
    desktop: str
    path: str
    reason: str
    user_copy: str | None


@dataclass(frozen=True, slots=True)
class RolloutTotals:
    """The pool's rebases onto one version, each desktop's newest one counted once (a failed
    rebase that a retry then did counts as rebased)."""

    rebased: int
    failed: int
    conflicts: int
    notes: int
    failures: builtins.list[tuple[str, str]]  # (desktop, error), newest first


class LayerRebaseRepository:
    def __init__(self, session: Session) -> None:
        self._session = session

    def record(self, *, desktop_id: uuid.UUID, pool_id: uuid.UUID, old_version: int,
               new_version: int, report: RebaseReport | None, error: str | None,
               finished_at: datetime | None = None) -> LayerRebase:
        """One rebase: ``rebased`` with its report's counts, conflicts and notes, or
        ``failed`` with ``error`` (no report)."""
        row = LayerRebase(desktop_id=desktop_id, pool_id=pool_id, old_version=old_version,
                          new_version=new_version, finished_at=finished_at or utcnow(),
                          outcome=FAILED if report is None else REBASED, error=error)
        if report is not None:
            row.kept_count = len(report.kept)
            row.dropped_count = len(report.dropped)
            row.conflict_count = len(report.conflicts)
            row.note_count = len(report.notes)
            row.excluded_count = report.excluded
            row.layer_bytes = report.bytes
        else:
            row.kept_count = row.dropped_count = row.conflict_count = 0
            row.note_count = row.excluded_count = row.layer_bytes = 0
        self._session.add(row)
        self._session.flush()
        if report is not None:
            self._session.add_all(
                [LayerRebaseItem(rebase_id=row.id, path=c.path, reason=c.reason,
                                 user_copy=c.user_copy, kind=CONFLICT) for c in report.conflicts]
                + [LayerRebaseItem(rebase_id=row.id, path=n.path, reason=n.text,
                                   user_copy=None, kind=NOTE) for n in report.notes])
            self._session.flush()
        return row

    def last_for(self, desktop_id: uuid.UUID) -> LayerRebase | None:
        """The desktop's newest rebase, whatever its outcome."""
        return self._session.scalars(
            select(LayerRebase).where(LayerRebase.desktop_id == desktop_id)
            .order_by(LayerRebase.finished_at.desc()).limit(1)).one_or_none()

    def items(self, rebase_id: uuid.UUID, *, kind: str | None = None
              ) -> builtins.list[LayerRebaseItem]:
        """A rebase's conflicts and notes (or only ``kind``), by path."""
        stmt = select(LayerRebaseItem).where(LayerRebaseItem.rebase_id == rebase_id)
        if kind is not None:
            stmt = stmt.where(LayerRebaseItem.kind == kind)
        return builtins.list(self._session.scalars(
            stmt.order_by(LayerRebaseItem.kind, LayerRebaseItem.path)))

    def desktops_per_version(self, pool_id: uuid.UUID) -> dict[int, int]:
        """How many of the pool's desktops run each template version (by number); retired
        and deleting desktops left out."""
        rows = self._session.execute(
            select(TemplateVersion.number, func.count(Desktop.id))
            .join(TemplateVersion, TemplateVersion.id == Desktop.template_version_id)
            .where(Desktop.pool_id == pool_id, Desktop.state.not_in(_GONE))
            .group_by(TemplateVersion.number))
        return {int(number): int(count) for number, count in rows}

    def _latest_onto(self, pool_id: uuid.UUID, version: int) -> builtins.list[LayerRebase]:
        rows = self._session.scalars(
            select(LayerRebase).where(LayerRebase.pool_id == pool_id,
                                      LayerRebase.new_version == version)
            .order_by(LayerRebase.finished_at.desc()))
        latest: dict[uuid.UUID, LayerRebase] = {}
        for row in rows:
            latest.setdefault(row.desktop_id, row)
        return builtins.list(latest.values())

    def failed_onto(self, pool_id: uuid.UUID, version: int) -> frozenset[uuid.UUID]:
        """The pool's desktops whose newest rebase onto ``version`` failed."""
        return frozenset(r.desktop_id for r in self._latest_onto(pool_id, version)
                         if r.outcome == FAILED)

    def rollout_totals(self, pool_id: uuid.UUID, version: int) -> RolloutTotals:
        latest = self._latest_onto(pool_id, version)
        rebased = [r for r in latest if r.outcome == REBASED]
        failed = [r for r in latest if r.outcome == FAILED]
        names = self._names({r.desktop_id for r in failed})
        return RolloutTotals(
            rebased=len(rebased), failed=len(failed),
            conflicts=sum(r.conflict_count for r in rebased),
            notes=sum(r.note_count for r in rebased),
            failures=[(names.get(r.desktop_id, str(r.desktop_id)), r.error or "")
                      for r in failed])

    def rollout_conflicts(self, pool_id: uuid.UUID, version: int, *, limit: int = 500
                          ) -> builtins.list[RolloutConflict]:
        """The conflicts of each desktop's newest rebase onto ``version``, by desktop and
        path; at most ``limit``."""
        ids = [r.id for r in self._latest_onto(pool_id, version) if r.outcome == REBASED]
        if not ids:
            return []
        rows = self._session.execute(
            select(LayerRebase.desktop_id, Desktop.name, LayerRebaseItem.path,
                   LayerRebaseItem.reason, LayerRebaseItem.user_copy)
            .join(LayerRebase, LayerRebase.id == LayerRebaseItem.rebase_id)
            .join(Desktop, Desktop.id == LayerRebase.desktop_id)
            .where(LayerRebaseItem.rebase_id.in_(ids), LayerRebaseItem.kind == CONFLICT)
            .order_by(Desktop.name, LayerRebaseItem.path).limit(limit))
        return [RolloutConflict(desktop_id=d, desktop=n, path=p, reason=r, user_copy=u)
                for d, n, p, r, u in rows]

    def _names(self, ids: Sequence[uuid.UUID] | set[uuid.UUID]) -> dict[uuid.UUID, str]:
        if not ids:
            return {}
        return {i: n for i, n in self._session.execute(
            select(Desktop.id, Desktop.name).where(Desktop.id.in_(builtins.list(ids))))}

    def set_status(self, desktop_id: uuid.UUID, *, version: int, layer_bytes: int,
                   changed_files: int, checked_at: datetime | None = None) -> None:
        """Write the desktop's layer status (``NotFound`` if there is no such desktop)."""
        result = cast(CursorResult[Any], self._session.execute(
            update(Desktop).where(Desktop.id == desktop_id)
            .values(layer_version=version, layer_bytes=layer_bytes,
                    layer_changed_files=changed_files,
                    layer_checked_at=checked_at or utcnow(), version=Desktop.version + 1)
            .execution_options(synchronize_session=False)))
        if result.rowcount != 1:
            raise NotFound(f"desktop {desktop_id} does not exist")
        loaded = self._session.identity_map.get(identity_key(Desktop, desktop_id))
        if loaded is not None:
            self._session.expire(loaded)
