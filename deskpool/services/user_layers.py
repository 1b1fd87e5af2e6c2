"""User layer views (issue 14, item 5): what each rebase of a desktop's user layer did, and a
pool's rollout in numbers.

* Per desktop: the layer's size and changed files as the desktop side last reported them,
  the version it sits on, and the last rebase with its conflicts (the new base won, the user's
  copy kept beside it) and notes (the user's version won).
* Per pool: how many desktops run each template version, and what the rebases onto the
  pool's current version produced: conflicts, notes and failures.

The desktop side calls :meth:`UserLayerViews.record_rebase` after each rebase (with its
``RebaseReport``, or the error that stopped it) and :meth:`record_layer_status` whenever it
measures the layer. Each recorded rebase is also an event in the admin's log
(``layer-rebased``, ``layer-rebase-failed``), written in the same transaction.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from deskpool.domain.errors import Conflict, Forbidden, InvalidInput
from deskpool.domain.layers import RebaseReport
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.store.db import UnitOfWork
from deskpool.store.layer_rebases import CONFLICT, NOTE, REBASED
from deskpool.store.models import Desktop, LayerRebase, Pool

MAX_VERSION = 2**31 - 1
MAX_ERROR = 4000  # characters of an error kept (the event and the row)
_VERSION_NAME = re.compile(r"^v?(\d{1,10})$")


@dataclass(frozen=True)
class LayerItemView:
    """A conflict (``user_copy``: where the user's version went; None: they had deleted it)
    or a note (``reason`` says why the user's version won)."""

    path: str
    reason: str
    user_copy: str | None = None


@dataclass(frozen=True)
class RebaseView:
    old_version: int
    new_version: int
    finished_at: datetime
    outcome: str  # rebased or failed
    error: str | None
    kept: int
    dropped: int
    conflict_count: int
    note_count: int
    excluded: int
    layer_bytes: int
    conflicts: list[LayerItemView] = field(default_factory=list)
    notes: list[LayerItemView] = field(default_factory=list)


@dataclass(frozen=True)
class DesktopLayerView:
    desktop_id: uuid.UUID
    desktop: str
    pool: str | None
    user: str | None
    template_version: int  # what the desktop runs
    layer_version: int | None  # what its layer sits on (None: not reported yet)
    layer_bytes: int | None
    changed_files: int | None
    checked_at: datetime | None
    last_rebase: RebaseView | None


@dataclass(frozen=True)
class VersionCount:
    version: int
    desktops: int
    current: bool


@dataclass(frozen=True)
class RolloutConflictView:
    desktop: str
    path: str
    reason: str
    user_copy: str | None


@dataclass(frozen=True)
class RolloutFailureView:
    desktop: str
    error: str


@dataclass(frozen=True)
class PoolLayersView:
    pool: str
    user_layer_mib: int
    current_version: int
    versions: list[VersionCount]  # by version number, the current one included
    rebased: int  # desktops whose newest rebase onto the current version worked
    failed: int  # ... and failed
    conflicts: int  # the conflicts of those rebases
    notes: int
    conflict_list: list[RolloutConflictView]
    failures: list[RolloutFailureView]
    # Desktops on another version than the current one: their layers wait for a rebase
    # (at their user's logoff, or by the reconciler while free and ready).
    awaiting_rebase: int = 0


def version_number(name: str, what: str) -> int:
    """A template version number from a report's version name (``"3"`` or ``"v3"``)."""
    found = _VERSION_NAME.match(name.strip())
    if found is None:
        raise InvalidInput(f"the {what} version {name!r} of the rebase report is not a template "
                           "version number; give the version numbers explicitly")
    return _checked_version(int(found.group(1)), what)


def _checked_version(value: int, what: str) -> int:
    if not 1 <= value <= MAX_VERSION:
        raise InvalidInput(f"the {what} version must be a template version number from 1 to "
                           f"{MAX_VERSION}, not {value}")
    return value


def _changed_files(report: RebaseReport) -> int:
    """Files the new layer changes: what it kept (the user's wins included) and the user's
    copies set beside the base's files."""
    return len(report.kept) + sum(1 for c in report.conflicts if c.user_copy is not None)


def _rebase_view(uow: UnitOfWork, row: LayerRebase) -> RebaseView:
    items = uow.layer_rebases.items(row.id)
    return RebaseView(
        old_version=row.old_version, new_version=row.new_version, finished_at=row.finished_at,
        outcome=row.outcome, error=row.error, kept=row.kept_count, dropped=row.dropped_count,
        conflict_count=row.conflict_count, note_count=row.note_count,
        excluded=row.excluded_count, layer_bytes=row.layer_bytes,
        conflicts=[LayerItemView(i.path, i.reason, i.user_copy) for i in items
                   if i.kind == CONFLICT],
        notes=[LayerItemView(i.path, i.reason) for i in items if i.kind == NOTE])


class UserLayerViews:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    # --- what the desktop side reports ----------------------------------------------------

    def record_rebase(self, desktop_id: uuid.UUID, report: RebaseReport | None = None, *,
                      error: str | None = None, old_version: int | None = None,
                      new_version: int | None = None) -> RebaseView:
        """Store one rebase of the desktop's layer: its ``report``, or the ``error`` that
        stopped it (the layer was left as it was). Versions are template version numbers;
        by default the report's (``"3"`` or ``"v3"``), else, for a failure, the version the
        layer was reported on (else the desktop's) and the pool's current version."""
        if (report is None) == (error is None):
            raise InvalidInput("a rebase is recorded with its report or with its error, "
                               "exactly one of the two")
        with self.ctx.uow() as uow:
            desktop = uow.desktops.get(desktop_id)
            pool = self._pool_of(uow, desktop)
            old = self._old_version(uow, desktop, report, old_version)
            new = (_checked_version(new_version, "new") if new_version is not None
                   else version_number(report.new_version, "new") if report is not None
                   else uow.versions.get(pool.current_version_id).number)
            message = None if error is None else (error.strip() or "no reason given")[:MAX_ERROR]
            row = uow.layer_rebases.record(desktop_id=desktop.id, pool_id=pool.id,
                                           old_version=old, new_version=new, report=report,
                                           error=message)
            if report is not None:
                uow.layer_rebases.set_status(desktop.id, version=new, layer_bytes=report.bytes,
                                             changed_files=_changed_files(report))
            self._event(uow, desktop, pool, row)
            if report is not None and report.conflicts and desktop.assigned_user:
                _tell_user(uow, desktop, new, report)
            view = _rebase_view(uow, row)
            uow.commit()
        return view

    def record_layer_status(self, desktop_id: uuid.UUID, version: int, layer_bytes: int,
                            changed_files: int) -> DesktopLayerView:
        """The layer as the desktop side measured it: the version it sits on, its size and
        how many files it changes."""
        _checked_version(version, "layer's")
        if layer_bytes < 0 or changed_files < 0:
            raise InvalidInput("a layer's size and number of changed files cannot be negative "
                               f"(got {layer_bytes} bytes, {changed_files} files)")
        with self.ctx.uow() as uow:
            uow.desktops.get(desktop_id)
            uow.layer_rebases.set_status(desktop_id, version=version, layer_bytes=layer_bytes,
                                         changed_files=changed_files)
            uow.commit()
        return self.desktop_layer(desktop_id)

    # --- views ------------------------------------------------------------------------------

    def desktop_layer(self, desktop: uuid.UUID | str) -> DesktopLayerView:
        """The desktop's layer (by id, or by name) and its last rebase."""
        with self.ctx.uow(read_only=True) as uow:
            found = (uow.desktops.get(desktop) if isinstance(desktop, uuid.UUID)
                     else uow.desktops.get_by_name(desktop))
            return self._desktop_view(uow, found)

    def user_conflicts(self, user: str, desktop_id: uuid.UUID) -> DesktopLayerView:
        """The layer of a desktop assigned to ``user``; the same ``Forbidden`` for a desktop
        of someone else's as for none at all (as every user route: ids cannot be probed)."""
        with self.ctx.uow(read_only=True) as uow:
            found = uow.desktops.find(desktop_id)
            if found is None or found.assigned_user != user:
                raise Forbidden("you have no such desktop")
            return self._desktop_view(uow, found)

    def pool_layers(self, pool_name: str) -> PoolLayersView:
        with self.ctx.uow(read_only=True) as uow:
            pool = uow.pools.get_by_name(pool_name)
            current = uow.versions.get(pool.current_version_id).number
            counts = uow.layer_rebases.desktops_per_version(pool.id)
            counts.setdefault(current, 0)
            totals = uow.layer_rebases.rollout_totals(pool.id, current)
            conflicts = uow.layer_rebases.rollout_conflicts(pool.id, current)
            return PoolLayersView(
                pool=pool.name, user_layer_mib=pool.user_layer_mib, current_version=current,
                versions=[VersionCount(v, n, v == current) for v, n in sorted(counts.items())],
                rebased=totals.rebased, failed=totals.failed, conflicts=totals.conflicts,
                notes=totals.notes,
                conflict_list=[RolloutConflictView(c.desktop, c.path, c.reason, c.user_copy)
                               for c in conflicts],
                failures=[RolloutFailureView(d, e) for d, e in totals.failures],
                awaiting_rebase=sum(n for v, n in counts.items() if v != current))

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _pool_of(uow: UnitOfWork, desktop: Desktop) -> Pool:
        if desktop.pool_id is None:
            raise Conflict(f"desktop {desktop.name!r} is in no pool: only a pool's desktops "
                           "have a user layer")
        return uow.pools.get(desktop.pool_id)

    @staticmethod
    def _old_version(uow: UnitOfWork, desktop: Desktop, report: RebaseReport | None,
                     given: int | None) -> int:
        if given is not None:
            return _checked_version(given, "old")
        if report is not None:
            return version_number(report.old_version, "old")
        if desktop.layer_version is not None:
            return desktop.layer_version
        return uow.versions.get(desktop.template_version_id).number

    @staticmethod
    def _desktop_view(uow: UnitOfWork, desktop: Desktop) -> DesktopLayerView:
        pool = uow.pools.find(desktop.pool_id) if desktop.pool_id is not None else None
        last = uow.layer_rebases.last_for(desktop.id)
        return DesktopLayerView(
            desktop_id=desktop.id, desktop=desktop.name,
            pool=pool.name if pool is not None else None, user=desktop.assigned_user,
            template_version=uow.versions.get(desktop.template_version_id).number,
            layer_version=desktop.layer_version, layer_bytes=desktop.layer_bytes,
            changed_files=desktop.layer_changed_files, checked_at=desktop.layer_checked_at,
            last_rebase=None if last is None else _rebase_view(uow, last))

    @staticmethod
    def _event(uow: UnitOfWork, desktop: Desktop, pool: Pool, row: LayerRebase) -> None:
        where = f"user layer of {desktop.name}"
        span = f"from version {row.old_version} to {row.new_version}"
        details = json.dumps({"rebase_id": str(row.id), "old_version": row.old_version,
                              "new_version": row.new_version, "outcome": row.outcome,
                              "kept": row.kept_count, "dropped": row.dropped_count,
                              "conflicts": row.conflict_count, "notes": row.note_count})
        if row.outcome == REBASED:
            record_event(
                uow, "layer-rebased",
                f"{where} rebased {span}: {row.kept_count} kept, {row.dropped_count} dropped, "
                f"{row.conflict_count} conflict(s), {row.note_count} note(s)",
                severity="warning" if row.conflict_count else "info",
                user=desktop.assigned_user, pool=pool.name, desktop_id=desktop.id,
                desktop=desktop.name, details=details)
        else:
            record_event(uow, "layer-rebase-failed",
                         f"{where} could not be rebased {span}; the layer was left as it "
                         f"was: {row.error}", severity="error", user=desktop.assigned_user,
                         pool=pool.name, desktop_id=desktop.id, desktop=desktop.name,
                         details=details)


MAX_TOLD = 10  # conflicts named in the user's message; the rest are counted


def _tell_user(uow: UnitOfWork, desktop: Desktop, version: int, report: RebaseReport) -> None:
    """The user's own message (``layer-conflicts``, in the portal's Messages): which of
    their files an update also changed, and where their copy is now."""
    kept = [c for c in report.conflicts if c.user_copy is not None]
    gone = [c for c in report.conflicts if c.user_copy is None]
    parts = [f"{c.path} (your copy: {c.user_copy})" for c in kept[:MAX_TOLD]]
    parts += [f"{c.path} (you had deleted it; it is back)"
              for c in gone[:max(0, MAX_TOLD - len(parts))]]
    more = len(report.conflicts) - len(parts)
    record_event(uow, "layer-conflicts",
                 f"Your desktop {desktop.name} was updated to version {version}, which also "
                 f"changed files you had changed: {'; '.join(parts)}"
                 + (f"; and {more} more" if more > 0 else "")
                 + ". The update's version is in place; yours are kept beside them.",
                 severity="warning", user=desktop.assigned_user, desktop_id=desktop.id,
                 desktop=desktop.name)
