"""A pool whose template version's disk cannot be used: marked broken, backed off, healed.

When a pool desktop cannot be made because its template version's disk is missing or corrupt
(its checksum no longer matches, in the template store or in a host's copy), making the next
desktop from it would fail the same way: the pool is marked with the reason instead
(``Pool.fault``), the admin gets one ``error`` event (again only if the reason changes), and
the reconciler makes no new desktop for the pool but one try per backoff (30 s, doubling, at
most 10 min). The desktop that found the fault leaves nothing behind: it had no VM yet, and
its row goes. Desktops already running are not touched.

The fault clears by itself when a try works (the file restored, the host's copy re-imported),
at once when the pool moves to another version (a new one published and rolled out, or a
rollback), and by an administrator's ``clear`` (the next pass tries again). A restored or
replaced disk file is noticed without waiting for the backoff: its size and modification time
(``fault_stamp``) are compared each pass, which costs a ``stat``.

The fault is the pool's, not the host's: a pool spread over hosts of which one holds a bad
copy waits as a whole (the reason names the host).
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta

from deskpool.domain.errors import TemplateUnusable
from deskpool.domain.states import DesktopState
from deskpool.services.events import record_event
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Pool

FAULT_BACKOFF_FIRST = timedelta(seconds=30)
FAULT_BACKOFF_MAX = timedelta(minutes=10)


def fault_backoff(failures: int) -> timedelta:
    """How long a broken pool waits before its next try after ``failures`` failed ones."""
    wait: timedelta = FAULT_BACKOFF_FIRST * 2 ** min(max(failures - 1, 0), 16)
    return min(wait, FAULT_BACKOFF_MAX)


def source_stamp(path: str) -> str:
    """The template disk file's size and modification time ("missing" when it is gone)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    return f"{st.st_size}/{st.st_mtime_ns}"


def mark_unusable(uow: UnitOfWork, desktop_id: uuid.UUID, exc: TemplateUnusable,
                  now: datetime) -> bool:
    """The pool desktop ``desktop_id`` (still provisioning, no VM) could not be made because
    of ``exc``: its row goes and its pool is marked. False (nothing written) when it is not a
    pool desktop in provisioning any more. The caller commits."""
    desktop = uow.desktops.find(desktop_id)
    if desktop is None or desktop.pool_id is None or desktop.state is not (
            DesktopState.PROVISIONING):
        return False
    pool = uow.pools.get(desktop.pool_id)
    uow.desktops.delete(desktop)
    new = pool.fault is None or pool.fault_version_id != exc.version_id
    changed = new or pool.fault != str(exc)
    pool.fault_failures = 1 if new else pool.fault_failures + 1
    if new:
        pool.fault_since = now
    pool.fault, pool.fault_version_id = str(exc), exc.version_id
    pool.fault_retry_at = now + fault_backoff(pool.fault_failures)
    pool.fault_stamp = source_stamp(exc.source)
    if changed:
        record_event(
            uow, "template-unusable",
            f"pool {pool.name}: {exc}. No new desktops are made for it; it is tried again "
            f"after {int(fault_backoff(pool.fault_failures).total_seconds())} s, then less "
            f"often (at most every {int(FAULT_BACKOFF_MAX.total_seconds() // 60)} min), and "
            "at once when the disk file changes. Desktops already made are not touched.",
            severity="error", pool=pool.name)
    return True


def clear(uow: UnitOfWork, pool: Pool, why: str) -> None:
    """The pool's fault is over (``why`` says how); an event says so. The caller commits."""
    if pool.fault is None:
        return
    record_event(uow, "template-usable", f"pool {pool.name}: {why}; it was broken since "
                 f"{pool.fault_since:%Y-%m-%d %H:%M:%S} UTC after {pool.fault_failures} "
                 f"failed tries ({pool.fault})", pool=pool.name)
    pool.fault = pool.fault_version_id = pool.fault_since = None
    pool.fault_retry_at = pool.fault_stamp = None
    pool.fault_failures = 0


def cleared_by_success(uow: UnitOfWork, pool_id: uuid.UUID | None, version_id: uuid.UUID,
                       host: str) -> None:
    """A desktop of the pool was just cloned from ``version_id`` on ``host``: a fault of
    that version is over. The caller commits."""
    pool = uow.pools.find(pool_id) if pool_id is not None else None
    if pool is not None and pool.fault is not None and pool.fault_version_id == version_id:
        clear(uow, pool, f"its template version's disk was usable again on host {host}")


def creation_allowance(uow: UnitOfWork, pool: Pool, now: datetime) -> tuple[int | None, str]:
    """How many new desktops the pool may get in this pass: None (no limit) when it has no
    fault, 0 while it waits, 1 for a try (then the next try waits a backoff again). Also a
    note for the pass's report. The caller commits (the try is recorded)."""
    if pool.fault is None:
        return None, ""
    if pool.fault_version_id != pool.current_version_id:
        number = pool.current_version.number
        clear(uow, pool, f"it now makes its desktops from version {number}")
        return None, ""
    stamp = source_stamp(pool.current_version.image_path)
    due = pool.fault_retry_at is None or pool.fault_retry_at <= now
    if not due and stamp == pool.fault_stamp:
        return 0, (f"broken, next try at {pool.fault_retry_at:%H:%M:%S}: {pool.fault}")
    # One try; any more wait for it to end (a failure marks the pool again).
    pool.fault_retry_at = now + fault_backoff(pool.fault_failures)
    pool.fault_stamp = stamp
    return 1, "broken: trying one desktop again" + (
        "" if due else " (its template disk file changed)")


def clear_by_admin(uow: UnitOfWork, pool: Pool, actor: str) -> bool:
    """An administrator says the template is fine again: the next pass tries at once (and
    marks the pool again if it is not). False when the pool had no fault."""
    if pool.fault is None:
        return False
    clear(uow, pool, f"fault cleared by {actor}")
    return True
