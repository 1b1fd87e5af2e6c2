"""The load balancer's planner: which desktops to move off hosts under memory or CPU pressure,
and where to. Pure like placement (facts in, planned moves out); the reconciler's
balancing pass (``reconciler/balancing.py``) feeds it measured load and runs its moves as live
migrations.

The policy:

- Measured load. A host's memory use is the memory in use over its physical memory and its CPU
  load the fraction of its CPUs busy (libvirt's node stats); a desktop's share is what its
  domain uses (domain stats). Moves in flight count as already on their target.
- Hysteresis. A host is hot when a resource is above its high watermark. In a pass a hot
  host sheds desktops until that resource is at the middle of the band between the
  watermarks, so a small rise does not make it hot again at once (a cap may stop it sooner; a
  later pass takes it up again only if it is still above the high watermark). A move must
  leave its target at or below the
  low watermark in the relieved resource and at or below the high one in the other, so a move
  never makes a host hot; a host inside the band is neither source nor target, and a grid
  whose hosts are all inside the band plans nothing. Hot hosts are never targets.
- Hard limits. A target passes the placement filters (state, reachable, pinning, template
  compatibility, vCPU, memory and desktop-count limits with overcommit, storage) against its
  facts including the moves planned before in the same pass: draining, down or unreachable
  hosts are never targets.
- Caps. At most ``max_moves_per_host_per_hour`` moves per host, counted on both the source and
  the target over the last hour (history and this pass); at most ``max_concurrent_moves`` in
  flight at once.
- Minimum benefit. A move must lower the pair's peak use of the resource by ``min_benefit``
  (a fraction of capacity): a desktop too small to matter is not worth a migration.
- No ping-pong. A desktop moved within ``desktop_cooldown`` does not move again.
- Never a desktop during its user's logon or hand-over, or already moving. A desktop may move
  when its pool allows balancing or its host's set does (either switch is enough); nothing
  unless the policy is enabled.
- Host sets. A move never leaves its host set: the target is in the source's set (hosts with
  no set name form the default set).
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from deskpool.domain.errors import InvalidInput
from deskpool.domain.models import HostState
from deskpool.scheduler.facts import HostFacts, PlacementRequest
from deskpool.scheduler.filters import DEFAULT_FILTERS, HostFilter, first_rejection, format_mib
from deskpool.scheduler.placement import consume

HOUR = timedelta(hours=1)


class Resource(StrEnum):
    MEMORY = "memory"
    CPU = "CPU"


@dataclass(frozen=True)
class Watermarks:
    """Fractions of a host's capacity: above ``high`` the host is hot; a move may fill a
    target up to ``low``."""

    high: float
    low: float

    def __post_init__(self) -> None:
        if not 0.0 < self.low < self.high <= 1.0:
            raise InvalidInput(f"watermarks need 0 < low < high <= 1, not low {self.low} "
                               f"and high {self.high}")

    @property
    def goal(self) -> float:
        """Where a hot host is relieved to: the middle of the band."""
        return (self.high + self.low) / 2


@dataclass(frozen=True)
class BalancePolicy:
    enabled: bool = False  # off by default
    memory: Watermarks = Watermarks(high=0.85, low=0.70)
    cpu: Watermarks = Watermarks(high=0.80, low=0.60)
    max_moves_per_host_per_hour: int = 4
    max_concurrent_moves: int = 10
    min_benefit: float = 0.02
    desktop_cooldown: timedelta = timedelta(hours=2)

    def __post_init__(self) -> None:
        if self.max_moves_per_host_per_hour < 0 or self.max_concurrent_moves < 0:
            raise InvalidInput("migration caps cannot be negative")
        if self.min_benefit < 0:
            raise InvalidInput("the minimum benefit cannot be negative")

    def watermarks(self, resource: Resource) -> Watermarks:
        return self.memory if resource == Resource.MEMORY else self.cpu


@dataclass(frozen=True)
class HostLoad:
    """One host: its facts as placement sees them (allocations, limits, state) and its
    measured load. ``facts`` should count a desktop in flight on both hosts, as a migration
    holds its memory on both."""

    facts: HostFacts
    memory_used_mib: float  # measured: node memory in use, the host's own included
    cpu_load: float  # measured: the fraction of the host's CPUs busy
    host_set: str | None = None  # its host set (None: the default set); moves stay in it
    set_balances: bool = False  # its set allows balancing: any desktop on it may move


@dataclass(frozen=True)
class DesktopLoad:
    id: uuid.UUID
    name: str
    host_id: uuid.UUID
    # What the desktop needs of a host (vCPUs, memory, template and pinning constraints);
    # storage_bytes is what a move copies onto the target's storage (0 on shared storage).
    request: PlacementRequest
    memory_used_mib: float  # measured (domain stats)
    cpu_used: float  # measured: CPUs busy, e.g. 0.5
    pool_balances: bool = False  # its pool allows balancing
    in_logon: bool = False  # a logon or hand-over is under way
    moving_to: uuid.UUID | None = None  # a move in flight


@dataclass(frozen=True)
class PastMove:
    """A move started before (in flight or done), from the move events."""

    desktop_id: uuid.UUID
    source_id: uuid.UUID
    target_id: uuid.UUID
    at: datetime


@dataclass(frozen=True)
class PlannedMove:
    desktop_id: uuid.UUID
    desktop: str
    source_id: uuid.UUID
    source: str
    target_id: uuid.UUID
    target: str
    resource: Resource
    benefit: float  # how much the pair's peak use of ``resource`` drops
    reason: str  # one sentence for the move's event


@dataclass(frozen=True)
class BalancePlan:
    moves: tuple[PlannedMove, ...] = ()
    # Hot hosts this pass leaves hot, each with why (for an event; empty when none).
    unresolved: tuple[str, ...] = ()


@dataclass
class _Host:
    """One host's state during a pass; loads move as moves are planned."""

    load: HostLoad
    facts: HostFacts
    memory_used_mib: float
    cpu_busy: float  # CPUs
    moves: int = 0  # in the last hour plus planned in this pass
    hot: dict[Resource, float] = field(default_factory=dict)  # resource -> use at pass start
    movable: list[DesktopLoad] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.facts.name

    def use(self, resource: Resource, delta: float = 0.0) -> float:
        """The fraction of ``resource`` in use, after adding ``delta`` (MiB or CPUs)."""
        if resource == Resource.MEMORY:
            total: float = self.facts.memory_mib
            used = self.memory_used_mib
        else:
            total, used = self.facts.vcpus, self.cpu_busy
        return (used + delta) / total if total > 0 else 1.0

    def shift(self, desktop: DesktopLoad, sign: int) -> None:
        self.memory_used_mib += sign * desktop.memory_used_mib
        self.cpu_busy += sign * desktop.cpu_used


def amount(desktop: DesktopLoad, resource: Resource) -> float:
    """What the desktop uses of ``resource``: MiB or CPUs."""
    return desktop.memory_used_mib if resource == Resource.MEMORY else desktop.cpu_used


def describe_amount(desktop: DesktopLoad, resource: Resource) -> str:
    if resource == Resource.MEMORY:
        return format_mib(round(desktop.memory_used_mib))
    return f"{desktop.cpu_used:.1f} CPUs busy"


def other(resource: Resource) -> Resource:
    return Resource.CPU if resource == Resource.MEMORY else Resource.MEMORY


def plan_moves(
    hosts: Sequence[HostLoad],
    desktops: Iterable[DesktopLoad],
    history: Iterable[PastMove],
    policy: BalancePolicy,
    now: datetime,
    *,
    filters: tuple[HostFilter, ...] = DEFAULT_FILTERS,
) -> BalancePlan:
    """The moves of one balancing pass, hottest host first, one move at a time, each seeing
    the ones planned before it."""
    if not policy.enabled:
        return BalancePlan()
    return _Pass(hosts, desktops, history, policy, now, filters).run()


class _Pass:
    def __init__(self, hosts: Sequence[HostLoad], desktops: Iterable[DesktopLoad],
                 history: Iterable[PastMove], policy: BalancePolicy, now: datetime,
                 filters: tuple[HostFilter, ...]) -> None:
        self.policy = policy
        self.filters = filters
        self.hosts = {
            h.facts.id: _Host(h, h.facts, h.memory_used_mib, h.cpu_load * h.facts.vcpus)
            for h in sorted(hosts, key=lambda h: (h.facts.name, str(h.facts.id)))
        }
        last_moved: dict[uuid.UUID, datetime] = {}
        for m in history:
            if m.at > now - HOUR:
                for host_id in {m.source_id, m.target_id}:
                    if host_id in self.hosts:
                        self.hosts[host_id].moves += 1
            seen = last_moved.get(m.desktop_id)
            if seen is None or m.at > seen:
                last_moved[m.desktop_id] = m.at
        self.in_flight = 0
        for d in desktops:
            source = self.hosts.get(d.host_id)
            if d.moving_to is not None:
                # Its memory and CPU are the target's once the move ends: count them there
                # now, so a later pass does not shed the same load twice.
                self.in_flight += 1
                target = self.hosts.get(d.moving_to)
                if source is not None:
                    source.shift(d, -1)
                if target is not None:
                    target.shift(d, +1)
                continue
            moved = last_moved.get(d.id)
            if (source is not None and (d.pool_balances or source.load.set_balances)
                    and not d.in_logon
                    and (moved is None or now - moved >= policy.desktop_cooldown)):
                source.movable.append(d)
        for host in self.hosts.values():
            if not self._in_play(host):
                continue
            for resource in Resource:
                use = host.use(resource)
                if use > policy.watermarks(resource).high:
                    host.hot[resource] = use
        self.moves: list[PlannedMove] = []
        self.unresolved: list[str] = []

    def _in_play(self, host: _Host) -> bool:
        """A host the balancer may move desktops off or onto (filters still apply)."""
        return host.facts.state == HostState.ENABLED and host.facts.reachable

    def _excess(self, host: _Host) -> tuple[float, Resource] | None:
        """The hot resource furthest above its goal, or None when the host is relieved."""
        worst: tuple[float, Resource] | None = None
        for resource in host.hot:
            excess = host.use(resource) - self.policy.watermarks(resource).goal
            if excess > 1e-9 and (worst is None or excess > worst[0]):
                worst = (excess, resource)
        return worst

    def run(self) -> BalancePlan:
        queue: list[tuple[float, str, uuid.UUID]] = []
        for host in self.hosts.values():
            excess = self._excess(host)
            if excess is not None:
                queue.append((-excess[0], host.name, host.facts.id))
        heapq.heapify(queue)
        slots = self.policy.max_concurrent_moves - self.in_flight
        cap = self.policy.max_moves_per_host_per_hour
        while queue:
            _, _, host_id = heapq.heappop(queue)
            source = self.hosts[host_id]
            if slots <= 0:
                self._unresolved(source, f"{self.in_flight + len(self.moves)} moves in "
                                 f"flight, the cap is {self.policy.max_concurrent_moves}")
                continue
            if source.moves >= cap:
                self._unresolved(source, f"{source.moves} moves in the last hour, the cap "
                                 f"is {cap}")
                continue
            move = self._relieve(source)
            if move is None:
                continue
            self.moves.append(move)
            slots -= 1
            excess = self._excess(source)
            if excess is not None:
                heapq.heappush(queue, (-excess[0], source.name, host_id))
        return BalancePlan(tuple(self.moves), tuple(self.unresolved))

    def _unresolved(self, host: _Host, why: str) -> None:
        hot = ", ".join(f"{r.value} {host.hot[r]:.0%} > {self.policy.watermarks(r).high:.0%}"
                        for r in host.hot)
        self.unresolved.append(f"host {host.name} {hot}: {why}")

    def _relieve(self, source: _Host) -> PlannedMove | None:
        """One move off ``source`` for its hot resources, the furthest above its goal first;
        None (noted in ``unresolved``) when no desktop can go anywhere."""
        resources = sorted(source.hot, key=lambda r: (
            -(source.use(r) - self.policy.watermarks(r).goal), r.value))
        for resource in resources:
            if source.use(resource) <= self.policy.watermarks(resource).goal:
                continue
            move = self._move_for(source, resource)
            if move is not None:
                return move
        if not source.movable:
            why = ("no desktop on it may move (pool or host set balancing off, logon, "
                   "cooldown or already moving)")
        else:
            why = (f"none of its {len(source.movable)} movable desktops fits another host of "
                   f"its set below the low watermark with a benefit of "
                   f"{self.policy.min_benefit:.0%}")
        self._unresolved(source, why)
        return None

    def _move_for(self, source: _Host, resource: Resource) -> PlannedMove | None:
        marks = self.policy.watermarks(resource)
        excess = source.use(resource) - marks.goal

        # The smallest desktop that relieves the host in one move, else the biggest first:
        # the fewest migrations, each moving as little as it can.
        def preference(d: DesktopLoad) -> tuple[int, float, str]:
            size = source.use(resource, amount(d, resource)) - source.use(resource)
            return (0, size, d.name) if size >= excess else (1, -size, d.name)

        for desktop in sorted(source.movable, key=preference):
            target, benefit = self._target_for(source, desktop, resource)
            if target is not None:
                return self._take(source, target, desktop, resource, benefit)
        return None

    def _target_for(self, source: _Host, desktop: DesktopLoad,
                    resource: Resource) -> tuple[_Host | None, float]:
        """The target left least used in ``resource`` among those the move keeps within the
        policy and the filters, and the move's benefit."""
        policy = self.policy
        before = source.use(resource)
        source_after = source.use(resource, -amount(desktop, resource))
        if before - source_after < policy.min_benefit:
            return None, 0.0  # the benefit is at most what the desktop takes off the source
        second = other(resource)
        ranked: list[tuple[float, str, _Host]] = []
        for host in self.hosts.values():
            if (host is source or host.hot or not self._in_play(host)
                    or host.load.host_set != source.load.host_set
                    or host.moves >= policy.max_moves_per_host_per_hour):
                continue
            after = host.use(resource, amount(desktop, resource))
            if after > policy.watermarks(resource).low:
                continue
            if host.use(second, amount(desktop, second)) > policy.watermarks(second).high:
                continue
            if before - max(source_after, after) < policy.min_benefit:
                continue
            ranked.append((after, host.name, host))
        ranked.sort(key=lambda t: (t[0], t[1]))
        for after, _, host in ranked:
            if first_rejection(host.facts, desktop.request, self.filters) is None:
                return host, before - max(source_after, after)
        return None, 0.0

    def _take(self, source: _Host, target: _Host, desktop: DesktopLoad, resource: Resource,
              benefit: float) -> PlannedMove:
        marks = self.policy.watermarks(resource)
        before = source.use(resource)
        started = source.hot[resource]
        if before > marks.high:
            why = f"{before:.0%} > {marks.high:.0%}"
        else:
            why = f"{before:.0%}, relieving it to {marks.goal:.0%} (hot at {started:.0%})"
        source.shift(desktop, -1)
        target.shift(desktop, +1)
        source.moves += 1
        target.moves += 1
        source.movable.remove(desktop)
        target.facts = consume(target.facts, desktop.request)
        reason = (f"host {source.name} {resource.value} {why}: move {desktop.name} "
                  f"({describe_amount(desktop, resource)}) to {target.name} "
                  f"({target.use(resource):.0%} after); {source.name} "
                  f"{source.use(resource):.0%} after")
        return PlannedMove(desktop.id, desktop.name, source.facts.id, source.name,
                           target.facts.id, target.name, resource, benefit, reason)
