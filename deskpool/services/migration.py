"""A desktop moved live to another host (``HypervisorDriver.migrate_vm``): its user keeps
their session, their processes and their files.

The order is what makes a crash at any point recoverable:

1. The desktop is leased for the move, so no reconciler step (recycle, power policy) and
   no other move touches it meanwhile; a dead broker's lease expires.
2. Its factory snapshot goes first (libvirt cannot migrate a VM with snapshots; the snapshot
   would stay behind in the old overlay anyway). The row says so before the snapshot is
   deleted, so a revert is never tried without one: at its user's logoff the moved desktop
   of a reverting pool is retired and replaced instead.
3. The template version's disk is copied to the target (once per host, in a transfer slot),
   and the driver moves the VM: on a failure it runs on where it was.
4. The row names the new host (a compare-and-swap on the old one), and no longer the host
   it was moving to (``moving_to_id``, set with the lease for the console proxies). A
   broker that dies between 3 and 4 leaves a VM running on the target whose row names the
   source: the reconciler adopts it there once the lease has expired
   (``reconciler/moves.py``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from deskpool.domain.errors import (
    Conflict,
    HostConnectionLost,
    HypervisorUnreachable,
    InvalidInput,
    LostRace,
)
from deskpool.domain.models import HostState, MigrationStats, moves_live
from deskpool.domain.states import HELD_STATES, DesktopState
from deskpool.scheduler.balancer import PastMove
from deskpool.scheduler.placement import NoValidHost
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import find_desktop
from deskpool.services.events import record_event
from deskpool.services.factory import FACTORY_SNAPSHOT, copy_version_to_host
from deskpool.services.host_slots import SlotKind, host_slot
from deskpool.services.placement import Placer
from deskpool.services.renewal import renewed_while_running
from deskpool.store.leases import Leased
from deskpool.store.models import Host, utcnow

# Held while the move runs, renewed every third of it: a broker that dies mid-move lets go
# within two minutes (then the reconciler adopts or keeps the VM where it runs), however long
# the template's copy and the move itself take.
MIGRATION_LEASE = timedelta(minutes=2)
MOVABLE_STATES = frozenset({DesktopState.READY}) | HELD_STATES
MiB = 2**20
MIGRATED_EVENT = "desktop-migrated"


def move_details(source_id: uuid.UUID, target_id: uuid.UUID, at: datetime) -> str:
    """What a ``desktop-migrated`` event keeps for the balancer (``past_moves``): the hosts
    by id (names may change) and when, on the mover's clock."""
    return json.dumps({"source_id": str(source_id), "target_id": str(target_id),
                       "at": at.isoformat()})


def past_moves(ctx: ServiceContext, since: datetime, *, limit: int = 5000) -> list[PastMove]:
    """The moves started since ``since``, from the newest ``limit`` move events (events
    written before they carried their hosts are left out)."""
    with ctx.uow(read_only=True) as uow:
        found = [(e.desktop_id, e.details) for e in uow.events.recent(limit,
                                                                     kind=MIGRATED_EVENT)]
    return [m for m in _parse_moves(found) if m.at >= since]


def _parse_moves(found: Iterable[tuple[uuid.UUID | None, str | None]]) -> list[PastMove]:
    moves = []
    for desktop_id, details in found:
        if desktop_id is None or not details:
            continue
        try:
            facts = json.loads(details)
            moves.append(PastMove(desktop_id, uuid.UUID(facts["source_id"]),
                                  uuid.UUID(facts["target_id"]),
                                  datetime.fromisoformat(facts["at"])))
        except (ValueError, KeyError, TypeError):
            continue  # not a move's facts: nothing to count
    return moves


@dataclass(frozen=True)
class Moved:
    desktop: str
    source: str
    target: str
    stats: MigrationStats


@dataclass(frozen=True)
class _Plan:
    desktop_id: uuid.UUID
    name: str
    user: str | None
    pool: str | None
    source_id: uuid.UUID
    source: str
    target_id: uuid.UUID
    target: str
    snapshot: bool


class MigrationService:
    def __init__(self, ctx: ServiceContext,
                 clock: Callable[[], datetime] = utcnow, *,
                 lease: timedelta = MIGRATION_LEASE) -> None:
        self.ctx = ctx
        self.clock = clock
        self.lease = lease

    def migrate(self, desktop: str, *, target: str | None = None, reason: str,
                timeout_s: float = 600.0,
                progress: Callable[[int, int], None] | None = None) -> Moved:
        """Move ``desktop`` (name or id) live to host ``target``, or to the host placement
        picks among the others. ``Conflict`` or ``InvalidInput`` saying why it cannot move
        (nothing changed); ``LostRace`` when a broker works on it now (its lease); a
        ``DriverError`` when the move itself failed (it runs on where it was)."""
        owner = f"migration-{uuid.uuid4()}"
        plan = self._plan(desktop, target)
        with self.ctx.uow() as uow:
            now = self.clock()
            if not uow.leases.take(Leased.DESKTOP, plan.desktop_id, owner,
                                   now + self.lease, now):
                raise LostRace(f"desktop {plan.name} is busy (a broker is working on it); "
                               "try again in a moment")
            # Its user's SPICE client is told to follow it there while it moves.
            uow.desktops.set_moving_to(plan.desktop_id, plan.target_id)
            uow.commit()
        def renew() -> bool:
            with self.ctx.uow() as uow:
                kept = uow.leases.renew(Leased.DESKTOP, plan.desktop_id, owner,
                                        self.clock() + self.lease)
                uow.commit()
            return kept

        try:
            with renewed_while_running(renew, self.lease.total_seconds() / 3,
                                       f"move lease on desktop {plan.name}"):
                stats = self._move(plan, timeout_s, progress)
            with self.ctx.uow() as uow:
                if not uow.desktops.move_to_host(plan.desktop_id, plan.source_id,
                                                 plan.target_id):
                    raise Conflict(f"desktop {plan.name} changed while it moved")
                record_event(uow, MIGRATED_EVENT,
                             f"{plan.name} moved live from host {plan.source} to "
                             f"{plan.target} ({reason}): {stats.memory_bytes / MiB:.0f} MiB "
                             f"of memory, {stats.disk_bytes / MiB:.1f} MiB of disk in "
                             f"{stats.seconds:.1f} s", user=plan.user, pool=plan.pool,
                             desktop_id=plan.desktop_id, desktop=plan.name,
                             details=move_details(plan.source_id, plan.target_id, now))
                uow.commit()
        finally:
            with self.ctx.uow() as uow:
                if uow.leases.release(Leased.DESKTOP, plan.desktop_id, owner):
                    uow.desktops.set_moving_to(plan.desktop_id, None)
                uow.commit()
        return Moved(plan.name, plan.source, plan.target, stats)

    def _plan(self, ref: str, target: str | None) -> _Plan:
        with self.ctx.uow(read_only=True) as uow:
            d = find_desktop(uow, ref)
            if d.pool_id is not None and uow.pools.get(d.pool_id).user_layer_mib:
                raise Conflict(f"desktop {d.name} has a user layer disk, which does not move "
                               "live yet: shut it down first, or let its user log off")
            if d.state not in MOVABLE_STATES or not moves_live(d.clone_mode, d.power_state):
                raise Conflict(f"desktop {d.name} is {d.state.value}, "
                               f"{d.power_state.value}, a {d.clone_mode.value} clone: only a "
                               "running desktop, a linked clone ready or in use, moves live")
            source = d.host
            if target is not None:
                host = uow.hosts.get_by_name(target)
                if host.id == source.id:
                    raise InvalidInput(f"desktop {d.name} is on host {target} already")
                if host.state is not HostState.ENABLED:
                    raise Conflict(f"host {target} is {host.state.value}: it takes no "
                                   "desktops")
                if _one_storage(source, host):
                    raise Conflict(f"desktop {d.name} cannot move live to host {target}: "
                                   f"both hosts are on shared storage {host.shared_storage}, "
                                   "and a live move between them is not supported yet")
                # Placement's own filters (hypervisor, architecture, room, pinning...),
                # before anything starts: a move is refused here, not half-way.
                try:
                    Placer(uow).place(d.template_version, d.clone_mode,
                                      what=f"desktop {d.name}", allowed={host.id})
                except NoValidHost as exc:
                    raise Conflict(f"desktop {d.name} cannot move to host {target}: "
                                   f"{exc}") from exc
            else:
                others = {h.id for h in uow.hosts.list()
                          if h.id != source.id and not _one_storage(source, h)}
                if not others:  # (an empty ``allowed`` would mean any host to placement)
                    raise Conflict(f"desktop {d.name} has nowhere to go: no other host "
                                   "outside its shared storage")
                try:
                    host, _ = Placer(uow).place(d.template_version, d.clone_mode,
                                                what=f"desktop {d.name}", allowed=others)
                except NoValidHost as exc:
                    raise Conflict(f"desktop {d.name} has nowhere to go: {exc}") from exc
            pool = uow.pools.find(d.pool_id) if d.pool_id else None
            return _Plan(d.id, d.name, d.assigned_user, pool.name if pool else None,
                         source.id, source.name, host.id, host.name, d.has_factory_snapshot)

    def _move(self, plan: _Plan, timeout_s: float,
              progress: Callable[[int, int], None] | None) -> MigrationStats:
        with self.ctx.uow(read_only=True) as uow:
            d = uow.desktops.get(plan.desktop_id)
            source = self.ctx.driver_for(d.host)
            target_host = uow.hosts.get(plan.target_id)
            target = self.ctx.driver_for(target_host)
            with host_slot(self.ctx, plan.target_id, SlotKind.TRANSFER,
                           target_host.transfer_slots):
                base, _ = copy_version_to_host(target, d.template_version)
        if plan.snapshot:
            with self.ctx.uow() as uow:
                uow.desktops.get(plan.desktop_id).has_factory_snapshot = False
                uow.commit()
            source.delete_snapshot(plan.desktop_id, FACTORY_SNAPSHOT)
        try:
            return source.migrate_vm(plan.desktop_id, target, base_volume=base,
                                     timeout_s=timeout_s, progress=progress)
        except (HostConnectionLost, HypervisorUnreachable) as exc:
            # The move may have finished without us: the row keeps the source until the
            # reconciler lists both hosts and finds the one running copy (reconciler/moves).
            raise HostConnectionLost(
                f"the connection to host {plan.source} was lost while desktop {plan.name} "
                f"moved to {plan.target}: it runs on one of the two, and the reconciler "
                f"records which once it has listed them ({exc})") from exc


def _one_storage(a: Host, b: Host) -> bool:
    """Whether two hosts are on one shared storage: a live move between them would copy
    the disk onto itself (the copy is made for hosts with storage of their own)."""
    return a.shared_storage is not None and a.shared_storage == b.shared_storage
