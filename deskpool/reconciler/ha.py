"""HA restart: the stateful desktops of a host that is down, restarted on a host that shares
its storage (issue 17, item 4).

Hosts say which shared storage their storage directory is on (``host add --shared-storage``,
``hosts.shared_storage``): hosts of one name mount it at the same path, so a desktop's disk
that one of them made is there on the others too. When such a host is marked ``down``, each
of its stateful desktops that was ready or in use is started again on another host of the
same storage that answers and has room (placement's own filters, the pool's pinning too),
over the same disk, with the same identity; its user finds their files, after a reboot.

**Fencing.** A host that does not answer may be dead, or only its libvirtd may be (its QEMU
processes running on). Running the desktop a second time over the same disk would corrupt
it. The fence is QEMU's image lock: the new QEMU cannot start while any process, on any host
of the storage, holds the disk (``DiskInUse``). Then nothing is started; the administrator
gets an error event and the user a message saying exactly that, and the restart is tried
again every ``retry_after`` (the lock goes when the old QEMU does: the host powered off, or
fenced by the administrator) until it works or the host answers again, when the usual
crash handling there takes over.

After a restart the desktop goes through the crash path on its new host (``mark_crashed``:
error, then repaired and given back to its user), in the same transaction that moves its row.
When the lost host answers again, its stale definition of the desktop (off, its disk in use
elsewhere) is forgotten there, its volumes kept: they are the running desktop's.
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from deskpool.domain.errors import Conflict, DeskpoolError, DiskInUse, NotFound
from deskpool.domain.models import CloneMode, HostState, PowerState, VmRecord
from deskpool.domain.pools import PoolKind
from deskpool.domain.states import DesktopState
from deskpool.drivers.base import root_volume_name
from deskpool.reconciler.crashes import CRASH_WATCHED_STATES, mark_crashed
from deskpool.reconciler.report import Outcome, PassReport
from deskpool.scheduler.placement import NoValidHost
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.factory import DesktopFactory
from deskpool.services.placement import Placer
from deskpool.services.pools import pinned_hosts

log = logging.getLogger(__name__)
RESTARTABLE = sorted(s.value for s in CRASH_WATCHED_STATES)
_RUNNING = (PowerState.RUNNING, PowerState.PAUSED)


class HaRestarts:
    def __init__(self, ctx: ServiceContext, clock: Callable[[], datetime], *,
                 retry_after: timedelta = timedelta(seconds=60)) -> None:
        self.ctx = ctx
        self.clock = clock
        self.retry_after = retry_after
        self._lock = threading.Lock()
        # Desktops not restarted (why, and when to try again): told once, retried later.
        self._refused: dict[uuid.UUID, tuple[str, datetime]] = {}

    def plan(self, in_flight: Callable[[uuid.UUID], bool]) -> list[uuid.UUID]:
        """The stateful desktops of down hosts on shared storage to restart elsewhere now."""
        now = self.clock()
        with self.ctx.uow(read_only=True) as uow:
            lost = [d.id for host in uow.hosts.list()
                    if host.state is HostState.DOWN and host.shared_storage
                    for d in uow.desktop_sessions.on_host(host.id, pool_kind=PoolKind.STATEFUL,
                                                          states=RESTARTABLE)]
        with self._lock:
            # What was refused during an outage that is over is forgotten: the next outage
            # tells the admin and the user again.
            self._refused = {k: v for k, v in self._refused.items() if k in lost}
            return [d for d in lost if not in_flight(d)
                    and (d not in self._refused or self._refused[d][1] <= now)]

    def restart(self, desktop_id: uuid.UUID, reachable: set[uuid.UUID],
                report: PassReport) -> None:
        """Restart one desktop of a down host on another host of its storage, or say why
        not (once) and try again later."""
        now = self.clock()
        with self.ctx.uow(read_only=True) as uow:
            d = uow.desktops.get(desktop_id)
            lost = d.host
            if (lost.state is not HostState.DOWN or not lost.shared_storage
                    or d.state.value not in RESTARTABLE):
                return  # back, or moved on meanwhile
            name, state, lost_id, lost_name = d.name, d.state, lost.id, lost.name
            if d.clone_mode is CloneMode.INSTANT:
                self._refuse(desktop_id, "it is an instant clone, whose memory state is its "
                             "host's own", report)
                return
            others = {h.id for h in uow.hosts.list()
                      if h.shared_storage == lost.shared_storage and h.id != lost_id
                      and h.id in reachable and h.state is HostState.ENABLED}
            pinned = pinned_hosts(uow, d.pool_id) if d.pool_id else None
            allowed = others & pinned if pinned is not None else others
            if not allowed:
                self._refuse(desktop_id, f"no other host of shared storage "
                             f"{lost.shared_storage} answers and takes desktops"
                             + (" among its pool's hosts" if pinned is not None else ""),
                             report)
                return
            try:
                target, _ = Placer(uow, reachable=reachable).place(
                    d.template_version, d.clone_mode, what=f"desktop {name}",
                    allowed=allowed)
            except NoValidHost as exc:
                self._refuse(desktop_id, str(exc), report)
                return
            target_id, target_name = target.id, target.name
        driver = self.ctx.driver_for_id(target_id)
        try:
            driver.volume_info(root_volume_name(desktop_id))
            spec = DesktopFactory(self.ctx, self.clock).spec_on(desktop_id, target_id)
            try:
                driver.restart_on_shared_storage(spec)
            finally:
                if spec.seed_image is not None:
                    shutil.rmtree(spec.seed_image.parent, ignore_errors=True)
        except DiskInUse:
            if self._moved_meanwhile(desktop_id, lost_id):
                return  # another broker's restart holds the lock: it runs, once
            self._refuse(desktop_id, f"its disk is still locked by a QEMU process: host "
                         f"{lost_name}'s libvirtd does not answer, but the desktop may still "
                         "run there, and starting it on another host could run it twice. It "
                         f"is restarted once its disk is free (host {lost_name} powered off "
                         "or fenced) or when the host answers again", report, fenced=True)
            return
        except NotFound as exc:
            self._refuse(desktop_id, f"its disk is not on host {target_name}'s storage ({exc}): "
                         f"check that hosts {lost_name} and {target_name} mount one shared "
                         "storage at one path", report)
            return
        except Conflict:
            return  # defined there already: another broker restarts it
        except DeskpoolError as exc:
            self._refuse(desktop_id, f"its start on host {target_name} failed: {exc}", report)
            return
        self._moved(desktop_id, name, state, lost_id, lost_name, target_id, target_name, now,
                    report)

    def _moved_meanwhile(self, desktop_id: uuid.UUID, lost_id: uuid.UUID) -> bool:
        with self.ctx.uow(read_only=True) as uow:
            return uow.desktops.get(desktop_id).host_id != lost_id

    def _moved(self, desktop_id: uuid.UUID, name: str, state: DesktopState, lost_id: uuid.UUID,
               lost_name: str, target_id: uuid.UUID, target_name: str, now: datetime,
               report: PassReport) -> None:
        """The row follows the running VM, and the desktop takes the crash path there."""
        reason = (f"its host {lost_name} was lost; it was restarted on host {target_name} "
                  "from the shared storage")
        with self.ctx.uow() as uow:
            if not (uow.desktops.move_to_host(desktop_id, lost_id, target_id, unleased_at=now)
                    and mark_crashed(uow, desktop_id, state, reason, now)):
                uow.rollback()
                report.error(f"desktop {name}: restarted on host {target_name}, but its row "
                             "changed meanwhile; the next pass adopts the running VM")
                return
            record_event(uow, "desktop-ha-restarted", f"{name}: {reason}", severity="warning",
                         desktop_id=desktop_id, desktop=name,
                         details=f'{{"from": "{lost_id}", "to": "{target_id}"}}')
            uow.commit()
        with self._lock:
            self._refused.pop(desktop_id, None)
        log.warning("desktop %s (%s) restarted on host %s after host %s was lost", name,
                    state, target_name, lost_name)
        report.count(Outcome.HA_RESTARTED)

    def _refuse(self, desktop_id: uuid.UUID, why: str, report: PassReport, *,
                fenced: bool = False) -> None:
        """Not restarted now: the admin and the user are told once (again if the reason
        changes), and it is tried again after ``retry_after``."""
        now = self.clock()
        with self._lock:
            told = self._refused.get(desktop_id)
            self._refused[desktop_id] = (why, now + self.retry_after)
        report.notes.append(f"HA restart of desktop {desktop_id}: {why}")
        if told is not None and told[0] == why:
            return
        with self.ctx.uow() as uow:
            d = uow.desktops.get(desktop_id)
            host, pool = d.host.name, (uow.pools.get(d.pool_id).name if d.pool_id else None)
            record_event(uow, "desktop-ha-refused", f"{d.name} of down host {host} is not "
                         f"restarted elsewhere: {why}", severity="error", pool=pool,
                         desktop_id=desktop_id, desktop=d.name)
            if d.assigned_user:
                what = ("it may still be running there, so it is not started on another host "
                        "until that is sure" if fenced else
                        "it cannot be started on another host now")
                record_event(uow, "desktop-lost", f"your desktop {d.name} is on host {host}, "
                             f"which does not answer; {what}. Your files are kept",
                             severity="warning", user=d.assigned_user, pool=pool,
                             desktop_id=desktop_id, desktop=d.name)
            uow.commit()

    def forget_stale(self, listed: dict[uuid.UUID, dict[uuid.UUID, VmRecord]],
                     report: PassReport) -> None:
        """A host back after its desktops were restarted elsewhere still defines them (off):
        each such definition is removed there, its volumes kept (the running VM's disks)."""
        ours = self.ctx.installation_id
        with self.ctx.uow(read_only=True) as uow:
            storage = {h.id: h.shared_storage for h in uow.hosts.list()}
            if not any(storage.values()):
                return  # no shared storage: nothing to read again on every pass
            rows = uow.desktops.host_ids()
        for host_id, records in listed.items():
            for vm_id, record in records.items():
                row_host = rows.get(vm_id)
                if (record.metadata is None or record.metadata.installation_id not in (ours, None)
                        or row_host is None or row_host == host_id
                        or record.power_state in _RUNNING or not storage.get(host_id)
                        or storage.get(row_host) != storage[host_id]):
                    continue
                try:
                    self.ctx.driver_for_id(host_id).forget_vm(vm_id)
                except DeskpoolError as exc:
                    report.error(f"stale definition of {record.name}: {exc}")
                    continue
                report.count(Outcome.HA_FORGOTTEN)
                with self.ctx.uow() as uow:
                    record_event(uow, "desktop-ha-forgotten", f"{record.name}: its old "
                                 "definition on the host it was restarted from was removed; "
                                 "its disk is in use on its new host", desktop_id=vm_id,
                                 desktop=record.name)
                    uow.commit()
