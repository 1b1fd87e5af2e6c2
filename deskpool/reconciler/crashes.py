"""A desktop whose VM died under it: its QEMU process ended without anyone asking (a SIGKILL,
an abort, the OOM killer) or its guest crashed, as the driver's ``stop_reason`` tells.

Without this the pass only wrote the new power state down: a free desktop was booted again by
its power policy as if nothing happened, and a held one stayed its user's while its VM was off,
with no word to anyone. Now the desktop goes to ``error`` with the reason (through the state
table, compare-and-swap), its user is told in an event of theirs, and the usual way out of
``error`` follows (``planning.plan_desktop``): a stateless pool's desktop is retired and the
pool refills to its size; a stateful pool's desktop that is its user's keeps its disk and is
booted again (``repair``), after a backoff, and given back to the same user.

A host lost whole (power cut, kernel panic) and back takes every VM of it down with it. If its
hypervisor kept its guests' status, they read "crashed" like any killed QEMU; if the host
rebooted (``/run`` is a tmpfs), the hypervisor has no record of them and they read off for an
unknown reason. That alone is no crash (a VM defined and never booted reads so), but a desktop
that should run, whose row says its VM was running when last seen, did not stop on purpose:
it died with its host (``death_of``) and is handled as a crash.

A stateless desktop whose guest shut down or rebooted from inside (its user's menu,
``reboot``; its VM is made with ``reboot_ends_vm``, so a reboot ends it) is no crash: it is
reset as at a logoff (``reset_stateless``), so what was written since its last reset never
boots again, and it comes back with the identity the database gives it.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from deskpool.domain.errors import LostRace
from deskpool.domain.models import PowerState, StopReason, VmRecord
from deskpool.domain.pools import Assignment, PoolKind, resets_on_reboot
from deskpool.domain.states import HELD_STATES, DesktopState, transition
from deskpool.reconciler.planning import backoff
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.pools import logout_outcome
from deskpool.store.db import UnitOfWork

S = DesktopState

# States where the VM must be running and no step of deskpool's is stopping it. (A desktop being
# made, booted or recycled has its own step, whose failure handles a VM that died; a suspend
# or a shutdown by the power policy reads "saved" or "shutdown"/"destroyed", never "crashed".)
CRASH_WATCHED_STATES = frozenset({S.READY}) | HELD_STATES


def death_of(record: VmRecord, last_seen: PowerState, host: str) -> str | None:
    """Why the VM of a desktop that should be running is dead (a sentence), or None when it
    runs or was stopped on purpose. ``last_seen`` is the power state its row holds from the
    last look; ``host`` the host's name."""
    crash = record.crash_description()
    if crash is not None:
        return crash
    if (record.power_state is PowerState.SHUTOFF and record.stop_reason is StopReason.UNKNOWN
            and last_seen is PowerState.RUNNING):
        return (f"its VM stopped with its host: host {host} restarted while it ran, "
                "and no longer runs it")
    return None


def crashed(ctx: ServiceContext, desktop_id: uuid.UUID, state: DesktopState, reason: str,
            now: datetime) -> bool:
    """Mark the desktop, seen in ``state`` with a dead VM, as failed for ``reason``; False if
    it moved on meanwhile (another actor's change wins, nothing is written)."""
    with ctx.uow() as uow:
        if not mark_crashed(uow, desktop_id, state, reason, now):
            return False
        uow.commit()
    return True


def mark_crashed(uow: UnitOfWork, desktop_id: uuid.UUID, state: DesktopState, reason: str,
                 now: datetime) -> bool:
    """``crashed`` inside the caller's unit of work, which commits; False (nothing written)
    when the desktop is no longer in ``state``."""
    desktop = uow.desktops.find(desktop_id)
    if desktop is None or desktop.state is not state:
        return False
    pool = uow.pools.find(desktop.pool_id) if desktop.pool_id else None
    stateful = pool is not None and pool.kind is PoolKind.STATEFUL
    user, name = desktop.assigned_user, desktop.name
    try:
        transition(uow.desktops, desktop_id, state, S.ERROR, last_error=reason)
    except LostRace:
        return False
    # The session is over: its consoles and tickets are dead with the VM. A stateful
    # desktop stays its user's (repaired, then given back); a stateless one lets go of
    # its user, who may take another desktop at once.
    uow.desktop_sessions.clear(desktop_id, unassign=not stateful)
    uow.console_tickets.expire_unused(desktop_id, now)
    desktop = uow.desktops.get(desktop_id)
    desktop.retry_count += 1
    desktop.next_attempt_at = now + backoff(desktop.retry_count)
    pool_name = pool.name if pool is not None else None
    record_event(uow, "desktop-crashed", f"{name}: {reason}", severity="error",
                 pool=pool_name, desktop_id=desktop_id, desktop=name)
    if user is not None:
        if stateful:
            what = ("your files are kept; it is being started again and connecting "
                    "gives it back to you in a few minutes")
        else:
            what = "what was open on it is lost; connecting again gives you a new desktop"
        record_event(uow, "desktop-lost", f"your desktop {name} stopped: {reason}; {what}",
                     severity="warning", user=user, pool=pool_name, desktop_id=desktop_id,
                     desktop=name)
    return True


def stopped_from_inside(record: VmRecord, last_seen: PowerState) -> bool:
    """Whether the guest shut itself down (or rebooted, for a VM made with ``reboot_ends_vm``)
    since the last look, which saw it run."""
    return (record.power_state is PowerState.SHUTOFF
            and record.stop_reason is StopReason.SHUTDOWN and last_seen is PowerState.RUNNING)


def reset_stateless(ctx: ServiceContext, desktop_id: uuid.UUID, state: DesktopState,
                    now: datetime) -> bool:
    """Reset a desktop, seen in ``state`` with its guest stopped from inside, if its pool is
    stateless (``resets_on_reboot``): its session ends and the pool's logoff outcome follows
    (reverted to its factory snapshot, or retired); False when nothing was done (another
    pool kind, a step of a broker's stopped it, or it moved on meanwhile)."""
    with ctx.uow() as uow:
        desktop = uow.desktops.find(desktop_id)
        if desktop is None or desktop.state is not state or desktop.pool_id is None:
            return False
        if desktop.lease_until is not None and desktop.lease_until > now:
            return False  # a broker's step runs on it: the power policy's own shutdown
        pool = uow.pools.get(desktop.pool_id)
        if not resets_on_reboot(pool.kind, pool.on_logout):
            return False
        new, task = logout_outcome(pool, desktop)
        user, name = desktop.assigned_user, desktop.name
        try:
            transition(uow.desktops, desktop_id, state, new, task=task)
        except LostRace:
            return False
        uow.desktop_sessions.clear(desktop_id,
                                   unassign=pool.assignment is not Assignment.DEDICATED)
        uow.console_tickets.expire_unused(desktop_id, now)
        if state in HELD_STATES:
            uow.desktop_sessions.count_session_served(desktop_id)
        how = "reverted" if new is S.RECYCLING else "replaced"
        record_event(uow, "desktop-reset", f"{name}: its guest shut down or rebooted from "
                     f"inside; a stateless desktop is {how} before it runs again",
                     pool=pool.name, desktop_id=desktop_id, desktop=name)
        if user is not None and state in HELD_STATES:
            record_event(uow, "desktop-restarted", f"your desktop {name} was shut down or "
                         "restarted from inside: it starts again clean, with nothing of your "
                         "session; connect again in a moment", severity="warning", user=user,
                         pool=pool.name, desktop_id=desktop_id, desktop=name)
        uow.commit()
    return True
