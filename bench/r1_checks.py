"""R1's counting: what must hold between the database, the hypervisor and what the API told the
users, after many broker SIGKILLs (see r1_kill.py). The real-VM test's ``check_invariants``
(tests/crash_invariants.py) asserts the same things; here each breach is counted and shown."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from deskpool.config import Settings
from deskpool.domain.states import HAS_VM_STATES, HELD_STATES
from deskpool.drivers.libvirt import LibvirtDriver
from deskpool.services.context import ServiceContext
from deskpool.store.access_models import Event
from deskpool.store.models import Desktop

STABLE = {"ready", "reserved", "in_use", "idle"}
HELD = {str(s) for s in HELD_STATES}
HAS_VM = {str(s) for s in HAS_VM_STATES}


@dataclass
class World:
    settings: Settings
    installation: uuid.UUID
    storage_dir: Path
    tokens: dict[str, str]
    spare: int
    max_size: int


@dataclass
class Hold:
    """One hand-over as the API told it: the user holds ``desktop`` from ``got`` (the ready
    answer) until ``ended`` (the first logoff request sent, or a reconnect that named
    another desktop); monotonic seconds."""

    user: str
    desktop: str
    got: float
    ended: float | None = None


@dataclass
class UserLog:
    holds: list[Hold] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    served: int = 0
    logoffs: int = 0
    reconnects: int = 0
    unanswered: int = 0


@dataclass(frozen=True)
class Row:
    id: str
    name: str
    state: str
    assigned_user: str | None
    lease_until: datetime | None
    last_error: str | None


def desktop_rows(ctx: ServiceContext) -> list[Row]:
    with ctx.uow(read_only=True) as uow:
        return [Row(str(d.id), d.name, str(d.state), d.assigned_user, d.lease_until,
                    d.last_error)
                for d in uow.session.execute(select(
                    Desktop.id, Desktop.name, Desktop.state, Desktop.assigned_user,
                    Desktop.lease_until, Desktop.last_error))]


def db_doubles(ctx: ServiceContext) -> list[str]:
    """Users the database shows holding more than one desktop."""
    holders = Counter(r.assigned_user for r in desktop_rows(ctx)
                      if r.state in HELD and r.assigned_user is not None)
    return [f"{user} holds {n}" for user, n in holders.items() if n > 1]


def events_of(ctx: ServiceContext, desktop_ids: set[str]) -> list[str]:
    ids = [uuid.UUID(d) for d in desktop_ids]
    with ctx.uow(read_only=True) as uow:
        found = uow.session.execute(select(
            Event.desktop_id, Event.desktop_name, Event.kind, Event.message, Event.user_name
        ).where(Event.desktop_id.in_(ids)).order_by(Event.id)).all()
    return [f"    {e.desktop_name} {e.kind} user={e.user_name}: {e.message}" for e in found]


@dataclass
class Census:
    orphans: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    doubles: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    kills: int = 0

    @property
    def total(self) -> int:
        return len(self.orphans) + len(self.lost) + len(self.doubles) + len(self.stuck)

    def print(self, kind: str) -> None:
        for label, items in (("orphans", self.orphans), ("lost desktops", self.lost),
                             ("double assignments", self.doubles),
                             ("stuck desktops", self.stuck)):
            print(f"[{kind}] {label}: {len(items)}")
            for item in items:
                print(f"[{kind}]   {item}")
        for note in self.notes:
            print(f"[{kind}] {note}")
        for line in self.details:
            print(f"[{kind}] {line}")
        print(f"[{kind}] R1 {kind} {self.total}  ({self.kills} kills, "
              f"{self.elapsed_s / 60:.1f} min)", flush=True)


def _aware(moment: datetime | None) -> datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


def _uuid_prefix(volume: str) -> str | None:
    try:
        return str(uuid.UUID(volume[:36]))
    except ValueError:
        return None


def count_final(ctx: ServiceContext, world: World, logs: list[UserLog],
                api_holds: dict[str, tuple[int, dict[str, Any]] | None],
                doubles_between_rounds: int) -> Census:
    census = Census()
    rows = {r.id: r for r in desktop_rows(ctx)}
    driver = LibvirtDriver("qemu:///system", storage_dir=world.storage_dir)
    try:
        domains = {str(vm.vm_id) for vm in driver.list_vms()
                   if vm.metadata is not None
                   and vm.metadata.installation_id == world.installation}
        volumes = driver.list_volumes()
    finally:
        driver.close()
    suspects: set[str] = set()

    # Orphans: the hypervisor against the rows, both ways.
    for vm_id in sorted(domains):
        row = rows.get(vm_id)
        if row is None or row.state == "retired":
            census.orphans.append(f"domain {vm_id} has no live desktop row "
                                  f"({row.state if row else 'no row'})")
    for volume in volumes:
        owner = _uuid_prefix(volume)
        if volume.startswith("tv-"):
            continue  # a template version's disk, kernel or initrd: shared by its desktops
        if owner is None or owner not in rows or owner not in domains:
            census.orphans.append(f"volume {volume} belongs to no live desktop")
    for row in rows.values():
        if row.state in HAS_VM and row.id not in domains:
            census.orphans.append(f"{row.name} is {row.state} but its VM is gone")
            suspects.add(row.id)

    # Stuck: anything not stable, its lease (if any) run out.
    now = datetime.now(UTC)
    for row in rows.values():
        lease = _aware(row.lease_until)
        if row.state not in STABLE and (lease is None or lease < now):
            census.stuck.append(f"{row.name} {row.state} ({row.last_error})")
            suspects.add(row.id)

    # Double assignments in the database: a user holding two.
    holders = Counter(r.assigned_user for r in rows.values()
                      if r.state in HELD and r.assigned_user is not None)
    census.doubles += [f"the database shows {u} holding {n} desktops"
                       for u, n in holders.items() if n > 1]
    if doubles_between_rounds:
        census.doubles.append(f"{doubles_between_rounds} time(s) between rounds the database "
                              "showed a user holding two desktops")

    # Double assignments in the API's answers: a desktop handed to two users whose holds
    # surely overlapped (from the ready answer to the first logoff sent), a user holding two.
    holds = [h for log in logs for h in log.holds]
    by_desktop: dict[str, list[Hold]] = defaultdict(list)
    for h in holds:
        by_desktop[h.desktop].append(h)
    for desktop, its in by_desktop.items():
        its.sort(key=lambda h: h.got)
        for i, a in enumerate(its):
            b = next((b for b in its[i + 1:] if b.user != a.user), None)
            if b is not None and (a.ended is None or a.ended > b.got):
                census.doubles.append(f"desktop {desktop} handed to {b.user} while "
                                      f"{a.user} held it")
                suspects.add(desktop)
    for log in logs:
        for anomaly in log.anomalies:
            if "reconnect named" in anomaly:
                census.doubles.append(f"{anomaly} (a second desktop)")
            else:
                census.lost.append(anomaly)
            suspects.update(w for w in anomaly.split() if _uuid_prefix(w) == w)

    # Lost hand-overs: what each user still holds, by the API's answers, must be theirs in
    # the database and in the API's list of their desktops.
    for log in logs:
        current = [h for h in log.holds if h.ended is None]
        user = log.holds[0].user if log.holds else None
        for h in current:
            row = rows.get(h.desktop)
            if row is None:
                census.lost.append(f"{h.user}'s desktop {h.desktop} is gone")
            elif row.state in HELD and row.assigned_user not in (None, h.user):
                census.doubles.append(f"{h.user}'s {row.name} is held by {row.assigned_user}")
            elif row.state not in HELD or row.assigned_user != h.user:
                census.lost.append(f"{h.user}'s {row.name} is {row.state}, "
                                   f"assigned to {row.assigned_user}")
            else:
                continue
            suspects.add(h.desktop)
        if user is None:
            continue
        answer = api_holds.get(user)
        if answer is None or answer[0] != 200:
            census.notes.append(f"{user}: the API's list of desktops did not answer: {answer}")
            continue
        listed = {str(d["id"]) for d in answer[1].get("items", [])}
        believed = {h.desktop for h in current}
        if believed - listed:
            census.lost.append(f"{user}: the API no longer lists {sorted(believed - listed)}")
        if len(listed) > 1:
            census.doubles.append(f"{user}: the API lists {len(listed)} desktops held")

    # Lost seats: the pool short of its size with nothing on its way.
    live = [r for r in rows.values() if r.state not in ("retired", "retiring", "deleting")]
    held = sum(1 for r in live if r.state in HELD or (r.state == "ready"
                                                      and r.assigned_user is not None))
    wanted = min(held + world.spare, world.max_size)
    if len(live) < wanted:
        census.lost.append(f"the pool has {len(live)} desktops, wants {wanted}")

    served = sum(log.served for log in logs)
    census.notes.append(
        f"hand-overs {served}, logoffs {sum(log.logoffs for log in logs)}, reconnects "
        f"{sum(log.reconnects for log in logs)}, calls unanswered (broker down) "
        f"{sum(log.unanswered for log in logs)}; final states "
        f"{dict(Counter(r.state for r in rows.values()))}")
    if suspects:
        census.details.append("events of the desktops concerned:")
        census.details += events_of(ctx, suspects)
    return census
