"""VMs that moved host behind the database's back: a live migration whose broker died after
the hypervisor moved the VM and before the row named its new host (``services/migration``).

libvirt guarantees one running copy: the target's domain runs only once the source's has
stopped (and the source's definition is gone). So a VM running on host H whose row names
another host, and that no live lease holds (no move in progress), is adopted on H: the row
names H, in one compare-and-swap on the old host. While a move is in progress (its lease
live) or the found VM is not running (an incoming migration is paused until it finishes),
the row is left alone; either way such a VM is never taken for an orphan and deleted.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from deskpool.domain.errors import DeskpoolError, HostConnectionLost, LostRace
from deskpool.domain.models import HostState, PowerState, VmRecord
from deskpool.reconciler.report import Outcome, PassReport
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.hosts import drain_notice
from deskpool.services.migration import MigrationService, move_details


def adopt_moved(ctx: ServiceContext, listed: dict[uuid.UUID, dict[uuid.UUID, VmRecord]],
                now: datetime, report: PassReport) -> set[uuid.UUID]:
    """Adopt the VMs of ``listed`` (what each reachable host runs, by host id) found on
    another host than their row's; returns the ids of every VM found away from its row's
    host (adopted or not), which are no orphans."""
    ours = ctx.installation_id
    with ctx.uow(read_only=True) as uow:
        row_hosts = uow.desktops.host_ids()
    away: list[tuple[uuid.UUID, uuid.UUID, VmRecord]] = [
        (host_id, vm_id, record)
        for host_id, records in listed.items() for vm_id, record in records.items()
        if record.metadata is not None and record.metadata.installation_id in (ours, None)
        and vm_id in row_hosts and row_hosts[vm_id] != host_id]
    for host_id, vm_id, record in away:
        old = row_hosts[vm_id]
        still_there = listed.get(old, {}).get(vm_id)
        if record.power_state is not PowerState.RUNNING or (
                still_there is not None and still_there.power_state is PowerState.RUNNING):
            continue  # a move in progress (paused on its target) or not finished: wait
        with ctx.uow() as uow:
            if uow.desktops.move_to_host(vm_id, old, host_id, unleased_at=now):
                new_host, old_host = uow.hosts.get(host_id).name, uow.hosts.get(old).name
                desktop = uow.desktops.get(vm_id)
                record_event(uow, "desktop-migrated", f"{desktop.name} was found running on "
                             f"host {new_host}, where a live migration from {old_host} had "
                             "moved it: the database says so now", desktop_id=vm_id,
                             desktop=desktop.name, user=desktop.assigned_user,
                             details=move_details(old, host_id, now))
                report.count(Outcome.ADOPTED)
            uow.commit()
    return {vm_id for _, vm_id, _ in away}


class DrainMoves:
    """Desktops in use on a draining host moved live, one job each on the reconciler's
    threads; one that cannot move (no host with room, a failed move) gets the drain's notice
    saying why, and its user is logged off at the deadline as before."""

    def __init__(self, ctx: ServiceContext, clock: Callable[[], datetime]) -> None:
        self.ctx = ctx
        self.clock = clock

    def move(self, desktop_id: uuid.UUID, report: PassReport) -> None:
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            host = desktop.host
            if host.state is not HostState.DRAINING or desktop.notice is not None:
                return  # enabled again meanwhile, or told already
            host_id, host_name = host.id, host.name
            deadline = host.drain_deadline or self.clock()
        try:
            MigrationService(self.ctx, self.clock).migrate(
                str(desktop_id), reason=f"host {host_name} is draining")
        except LostRace:
            return  # another broker moves it (or steps on it): its turn, not a failure
        except HostConnectionLost as exc:
            # It may have moved: no notice for a desktop that may be gone from the host; a
            # later pass finds where it runs (adopt_moved) and moves it on if need be.
            report.notes.append(f"drain of {host_name}: {exc}")
            return
        except DeskpoolError as exc:
            self._cannot_move(desktop_id, host_id, deadline, exc)
            report.notes.append(f"drain of {host_name}: {exc}")
            return
        report.count(Outcome.MIGRATED)

    def _cannot_move(self, desktop_id: uuid.UUID, host_id: uuid.UUID, deadline: datetime,
                     why: DeskpoolError) -> None:
        with self.ctx.uow() as uow:
            desktop = uow.desktops.get(desktop_id)
            if desktop.host_id != host_id or desktop.notice is not None:
                return
            uow.desktop_sessions.set_notice(desktop_id, drain_notice(deadline))
            record_event(uow, "drain-warning", f"{desktop.assigned_user} on {desktop.name} "
                         f"warned: host {desktop.host.name} drains by {deadline:%H:%M} UTC "
                         f"and the desktop could not move to another host: {why}",
                         severity="warning", user=desktop.assigned_user,
                         desktop_id=desktop_id, desktop=desktop.name)
            uow.commit()
