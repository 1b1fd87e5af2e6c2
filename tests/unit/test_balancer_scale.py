"""The balancer at scale: 100 hosts, 5,000 desktops, a skewed load, run pass after pass until
it settles (no host hot, or nothing left that waiting for a cap or cooldown would allow), each
planned move applied one at a time on a simulated clock; then the load turns around and the
run goes on, to show that moved desktops do not come straight back.

The state is a pure simulation (no driver: the fake driver has neither live migration nor
load stats yet). A move takes the desktop's measured memory and CPU and its allocation
(vCPUs, memory, one desktop) off its source and puts them on its target; a pass runs every
five minutes and each move takes 30 seconds, moves of one pass running one after another.

The grid (seeded, so every run is the same):

- hosts alternate between 256 GiB / 64 CPUs and 192 GiB / 48 CPUs; overcommit 4 vCPUs per
  CPU and 1.5 (memory); at most 90 desktops each;
- h000-h032 (a third) run 70 desktops each at 90-97% memory, far over the 85% high mark;
- h033-h037 run 40 desktops each at 88-95% CPU (over 80%), memory cool;
- the rest run about 40 desktops at 35-60% memory and 15-45% CPU;
- h097 is alone in another host set (a move never leaves a set), h098 is draining, h099 is
  down (never targets);
- 10% of desktops are in pools that forbid balancing, 3% are in a logon for the whole run,
  2% are pinned to three hosts (their own and two others).
"""

from __future__ import annotations

import random
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from deskpool.scheduler.balancer import (
    BalancePolicy,
    DesktopLoad,
    HostLoad,
    PastMove,
    PlannedMove,
    Resource,
    Watermarks,
    plan_moves,
)
from deskpool.scheduler.facts import HostFacts, PlacementRequest
from deskpool.scheduler.placement import consume

GIB = 1024
HOSTS, DESKTOPS = 100, 5_000
HOT_MEMORY = range(0, 33)
HOT_CPU = range(33, 38)
OTHER_SET, DRAINING, DOWN = 97, 98, 99
POLICY = BalancePolicy(
    enabled=True, memory=Watermarks(high=0.85, low=0.70), cpu=Watermarks(high=0.80, low=0.60),
    max_moves_per_host_per_hour=4, max_concurrent_moves=20, min_benefit=0.02,
    desktop_cooldown=timedelta(hours=2),
)
# Tighter caps make the run take many more passes; the short cooldown lets a desktop move
# again within the run, so "never back within the cooldown" is tested, not just implied.
TIGHT = replace(POLICY, max_moves_per_host_per_hour=2, max_concurrent_moves=5,
                desktop_cooldown=timedelta(minutes=30))
START = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
PASS_EVERY = timedelta(minutes=5)
MOVE_TAKES = timedelta(seconds=30)
MAX_PASSES = 200


@dataclass
class SimHost:
    facts: HostFacts
    memory_used_mib: float
    cpu_busy: float
    host_set: str | None = None

    def use(self, resource: Resource) -> float:
        if resource == Resource.MEMORY:
            return self.memory_used_mib / self.facts.memory_mib
        return self.cpu_busy / self.facts.vcpus

    def load(self) -> HostLoad:
        return HostLoad(self.facts, self.memory_used_mib, self.cpu_busy / self.facts.vcpus,
                        host_set=self.host_set)


def release(facts: HostFacts, request: PlacementRequest) -> HostFacts:
    return replace(facts, used_vcpus=facts.used_vcpus - request.vcpus,
                   used_memory_mib=facts.used_memory_mib - request.memory_mib,
                   desktops=facts.desktops - 1)


class Grid:
    def __init__(self, hosts: list[SimHost], desktops: list[DesktopLoad],
                 policy: BalancePolicy = POLICY) -> None:
        self.policy = policy
        self.hosts = {h.facts.id: h for h in hosts}
        self.desktops = {d.id: d for d in desktops}

    def plan(self, history: list[PastMove], now: datetime,
             policy: BalancePolicy | None = None) -> tuple[PlannedMove, ...]:
        loads = [h.load() for h in self.hosts.values()]
        return plan_moves(loads, self.desktops.values(), history, policy or self.policy,
                          now).moves

    def apply(self, move: PlannedMove) -> None:
        d = self.desktops[move.desktop_id]
        assert d.host_id == move.source_id
        source, target = self.hosts[move.source_id], self.hosts[move.target_id]
        source.memory_used_mib -= d.memory_used_mib
        source.cpu_busy -= d.cpu_used
        source.facts = release(source.facts, d.request)
        target.memory_used_mib += d.memory_used_mib
        target.cpu_busy += d.cpu_used
        target.facts = consume(target.facts, d.request)
        self.desktops[d.id] = replace(d, host_id=target.facts.id)

    def hot(self) -> list[str]:
        """Hosts in play above a high watermark (in the default set, with hosts to take
        their load)."""
        return [f"{h.facts.name} {r.value} {h.use(r):.0%}" for h in self.hosts.values()
                if h.host_set is None and h.facts.state == "enabled" and h.facts.reachable
                for r in Resource if h.use(r) > self.policy.watermarks(r).high]


def assert_within_hard_limits(h: SimHost) -> None:
    f = h.facts
    assert f.used_vcpus <= f.vcpus * f.cpu_overcommit, f.name
    assert f.used_memory_mib <= f.memory_mib * f.memory_overcommit, f.name
    assert f.max_desktops is None or f.desktops <= f.max_desktops, f.name
    assert h.memory_used_mib <= f.memory_mib, f.name
    assert h.cpu_busy <= f.vcpus, f.name


def host_uuid(i: int) -> uuid.UUID:
    return uuid.UUID(int=i + 1)


def make_grid(policy: BalancePolicy = POLICY, *, seed: int = 17, skewed: bool = True) -> Grid:
    rng = random.Random(seed)
    counts = [70 if skewed and i in HOT_MEMORY else 40 for i in range(HOSTS)]
    for i in range(DESKTOPS - sum(counts)):  # spread the rest over the cool hosts
        counts[len(HOT_MEMORY) + i % (HOSTS - len(HOT_MEMORY))] += 1
    assert sum(counts) == DESKTOPS
    hosts: list[SimHost] = []
    desktops: list[DesktopLoad] = []
    for i, count in enumerate(counts):
        memory_gib, cpus = (256, 64) if i % 2 == 0 else (192, 48)
        if not skewed:
            memory_use, cpu_load = rng.uniform(0.71, 0.84), rng.uniform(0.61, 0.79)
        elif i in HOT_MEMORY:
            memory_use, cpu_load = rng.uniform(0.90, 0.97), rng.uniform(0.15, 0.45)
        elif i in HOT_CPU:
            memory_use, cpu_load = rng.uniform(0.35, 0.60), rng.uniform(0.88, 0.95)
        else:
            memory_use, cpu_load = rng.uniform(0.35, 0.60), rng.uniform(0.15, 0.45)
        host_id = host_uuid(i)
        overhead_mib = 4 * GIB  # the host's own memory
        # Desktop sizes vary 1:4 and are scaled so the host's total is what was drawn.
        mem_weights = [rng.choice([1.0, 1.5, 2.0, 3.0, 4.0]) for _ in range(count)]
        cpu_weights = [rng.uniform(0.5, 2.0) for _ in range(count)]
        mem_scale = (memory_use * memory_gib * GIB - overhead_mib) / sum(mem_weights)
        cpu_scale = cpu_load * cpus / sum(cpu_weights)
        used_vcpus = used_mib = 0
        for j in range(count):
            mem = mem_weights[j] * mem_scale
            alloc_mib = max(2 * GIB, -(-int(mem) // GIB) * GIB)  # rounded up to a GiB
            roll = rng.random()
            allowed = None
            if roll < 0.02:
                others = rng.sample([k for k in range(HOSTS) if k != i], 2)
                allowed = frozenset({host_id, *(host_uuid(k) for k in others)})
            request = PlacementRequest(what=f"desk-{len(desktops):04}", vcpus=2,
                                       memory_mib=alloc_mib, storage_bytes=0,
                                       allowed_hosts=allowed)
            desktops.append(DesktopLoad(
                uuid.UUID(int=100_000 + len(desktops)),
                f"desk-{len(desktops):04}", host_id, request, mem, cpu_weights[j] * cpu_scale,
                pool_balances=not 0.02 <= roll < 0.12, in_logon=0.12 <= roll < 0.15))
            used_vcpus += 2
            used_mib += alloc_mib
        state = {DRAINING: "draining", DOWN: "down"}.get(i, "enabled")
        facts = HostFacts(
            id=host_id, name=f"h{i:03}", state=state, reachable=i != DOWN, hypervisor="QEMU",
            arch="x86_64", cpu_model="", domain_types=("kvm",), vcpus=cpus,
            memory_mib=memory_gib * GIB, storage_free_bytes=10**13, cpu_overcommit=4.0,
            memory_overcommit=1.5, max_desktops=90, used_vcpus=used_vcpus,
            used_memory_mib=used_mib, desktops=count,
        )
        hosts.append(SimHost(facts, memory_use * memory_gib * GIB, cpu_load * cpus,
                             host_set="lab" if i == OTHER_SET else None))
    return Grid(hosts, desktops, policy)


class Simulation:
    """Passes every five minutes until the grid has settled, asserting the step invariants
    after every move; a second ``run`` continues from where the first stopped."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.policy = grid.policy
        self.history: list[PastMove] = []
        self.left_at: dict[tuple[uuid.UUID, uuid.UUID], datetime] = {}  # (desktop, host)
        self.clock = START
        self.passes = 0
        self.cpu_s = 0.0

    def run(self) -> None:
        start_cpu = time.process_time()
        for _ in range(MAX_PASSES):
            self.passes += 1
            pass_start = self.clock
            moves = self.grid.plan(self.history, self.clock)
            if not moves and self.settled():
                self.cpu_s += time.process_time() - start_cpu
                return
            assert len(moves) <= self.policy.max_concurrent_moves
            for move in moves:
                self.step(move)
                self.clock += MOVE_TAKES
            self.clock = max(self.clock, pass_start + PASS_EVERY)
        pytest.fail(f"no convergence in {MAX_PASSES} passes; still hot: {self.grid.hot()[:5]}")

    def settled(self) -> bool:
        """Nothing is hot, or no cap or cooldown still holds a move back: waiting longer
        would plan nothing more."""
        if not self.grid.hot() or not self.history:
            return True
        waits = max(self.policy.desktop_cooldown, timedelta(hours=1))
        return self.clock - self.history[-1].at >= waits

    def step(self, move: PlannedMove) -> None:
        policy, grid = self.policy, self.grid
        d = grid.desktops[move.desktop_id]
        assert d.pool_balances and not d.in_logon, move.reason
        assert d.request.allowed_hosts is None or move.target_id in d.request.allowed_hosts
        came_from = self.left_at.get((d.id, move.target_id))
        assert came_from is None or self.clock - came_from >= policy.desktop_cooldown, (
            f"ping-pong: {move.reason}")
        grid.apply(move)
        self.history.append(PastMove(d.id, move.source_id, move.target_id, self.clock))
        self.left_at[(d.id, move.source_id)] = self.clock
        target = grid.hosts[move.target_id]
        assert target.facts.state == "enabled" and target.facts.reachable
        assert target.host_set == grid.hosts[move.source_id].host_set
        # A target is never made hot, in either resource, and ends under the low mark of
        # the resource it relieved.
        assert target.use(move.resource) <= policy.watermarks(move.resource).low + 1e-9
        for r in Resource:
            assert target.use(r) <= policy.watermarks(r).high + 1e-9, move.reason
        # Only these two hosts changed: checking them checks every host at this step.
        assert_within_hard_limits(grid.hosts[move.source_id])
        assert_within_hard_limits(target)


def assert_no_desktop_moved_twice_within_the_cooldown(sim: Simulation) -> None:
    last: dict[uuid.UUID, datetime] = {}
    for m in sim.history:
        seen = last.get(m.desktop_id)
        assert seen is None or m.at - seen >= sim.policy.desktop_cooldown
        last[m.desktop_id] = m.at


def moves_in_any_hour(history: list[PastMove]) -> Iterator[tuple[uuid.UUID, int]]:
    """For each host, the most moves (as source or target) started in any hour-long window
    ending at a move, the way the planner counts them: (t - 1 h, t]."""
    times: dict[uuid.UUID, list[datetime]] = defaultdict(list)
    for m in history:
        times[m.source_id].append(m.at)
        times[m.target_id].append(m.at)
    for host_id, ts in times.items():
        ts.sort()
        lo, most = 0, 0
        for hi, t in enumerate(ts):
            while ts[lo] <= t - timedelta(hours=1):
                lo += 1
            most = max(most, hi - lo + 1)
        yield host_id, most


@pytest.mark.parametrize("policy", [POLICY, TIGHT], ids=["default", "tight"])
def test_a_skewed_grid_converges_within_the_caps_without_ping_pong(
        policy: BalancePolicy) -> None:
    grid = make_grid(policy)
    for h in grid.hosts.values():
        assert_within_hard_limits(h)
    hot_before = grid.hot()
    assert len(hot_before) == len(HOT_MEMORY) + len(HOT_CPU)
    still = {d.id: d.host_id for d in grid.desktops.values()
             if not d.pool_balances or d.in_logon}

    run = Simulation(grid)
    run.run()

    moved = {m.desktop_id for m in run.history}
    hours = (run.clock - START) / timedelta(hours=1)
    busiest = max(most for _, most in moves_in_any_hour(run.history))
    print(f"\nbalanced {len(hot_before)} hot hosts in {run.passes} passes, "
          f"{len(run.history)} moves of {len(moved)} desktops, {hours:.1f} simulated hours, "
          f"at most {busiest} moves on a host in an hour, {run.cpu_s:.2f} s of CPU")
    # Converged: no host in play is above a high watermark.
    assert grid.hot() == []
    # The per-host hourly cap held over every hour, on sources and targets alike.
    assert busiest <= policy.max_moves_per_host_per_hour
    # No desktop moved twice within the cooldown (so none went back where it came from).
    assert_no_desktop_moved_twice_within_the_cooldown(run)
    # Desktops in logon or in pools without balancing stayed where they were.
    assert all(grid.desktops[d].host_id == h for d, h in still.items())
    # A host of another set, draining or down hosts took nothing and gave nothing.
    for i in (OTHER_SET, DRAINING, DOWN):
        host_id = host_uuid(i)
        assert host_id not in {m.target_id for m in run.history}
        assert host_id not in {m.source_id for m in run.history}
    # Only hot hosts gave desktops away; cool ones only received.
    hot_names = {entry.split()[0] for entry in hot_before}
    assert {grid.hosts[m.source_id].facts.name for m in run.history} <= hot_names
    # Stable: once the caps and cooldowns have all expired, there is still nothing to do.
    assert grid.plan(run.history, run.clock + timedelta(days=1)) == ()


def test_a_balanced_grid_at_scale_plans_nothing() -> None:
    # Every host inside the band between the watermarks: hysteresis holds everything still.
    grid = make_grid(skewed=False)
    assert len(grid.desktops) == DESKTOPS
    assert grid.hot() == []
    assert grid.plan([], START) == ()


def resize(grid: Grid, desktop_id: uuid.UUID, memory_mib: float) -> None:
    """The desktop now uses ``memory_mib``, given at least that much (rounded up to a GiB)."""
    d = grid.desktops[desktop_id]
    host = grid.hosts[d.host_id]
    alloc = max(d.request.memory_mib, -(-int(memory_mib) // GIB) * GIB)
    host.memory_used_mib += memory_mib - d.memory_used_mib
    host.facts = replace(host.facts, used_memory_mib=host.facts.used_memory_mib
                         + alloc - d.request.memory_mib)
    grid.desktops[desktop_id] = replace(d, memory_used_mib=memory_mib,
                                        request=replace(d.request, memory_mib=alloc))


def test_load_that_turns_around_does_not_send_desktops_back() -> None:
    """Right after balancing, the load turns around: the desktops that just moved grow until
    the ten hosts that took the most are at 92% memory, and the hosts they left go quiet
    (their desktops use 40% less). The grown desktops are the ones that would relieve their
    new hosts in one move and the hosts they left are now the coolest: only the cooldown
    keeps them from moving again at once."""
    grid = make_grid()
    sim = Simulation(grid)
    sim.run()
    first = len(sim.history)
    arrived: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)  # host -> desktops
    for m in sim.history:
        arrived[m.target_id].append(m.desktop_id)
    takers = sorted(arrived, key=lambda h: (-len(arrived[h]), grid.hosts[h].facts.name))[:10]
    for host_id in takers:
        host = grid.hosts[host_id]
        extra = (0.92 * host.facts.memory_mib - host.memory_used_mib) / len(arrived[host_id])
        for d_id in arrived[host_id]:
            resize(grid, d_id, grid.desktops[d_id].memory_used_mib + extra)
    sources = {m.source_id for m in sim.history}
    for d in list(grid.desktops.values()):
        if d.host_id in sources:
            resize(grid, d.id, d.memory_used_mib * 0.6)
    for h in grid.hosts.values():
        assert_within_hard_limits(h)
    assert len(grid.hot()) == 10
    turned = sim.clock
    grown = {d for h in takers for d in arrived[h]}
    # Without the cooldown, the grown desktops would move again at once.
    eager = grid.plan(sim.history, turned, replace(POLICY, desktop_cooldown=timedelta(0)))
    again = [m for m in eager if m.desktop_id in grown]
    assert again, "the scenario should tempt the balancer to move desktops again"

    sim.run()

    later = sim.history[first:]
    print(f"\nafter the turn: {len(later)} moves in {sim.passes} passes in all, "
          f"{(sim.clock - turned) / timedelta(hours=1):.1f} simulated hours; without the "
          f"cooldown {len(again)} of the first pass's {len(eager)} moves would move a desktop "
          f"again")
    assert later, "the turned load needed moves"
    assert grid.hot() == []
    # Each desktop waited out its cooldown (from its own last move) before moving again.
    assert_no_desktop_moved_twice_within_the_cooldown(sim)
    assert max(most for _, most in moves_in_any_hour(sim.history)) <= (
        POLICY.max_moves_per_host_per_hour)
