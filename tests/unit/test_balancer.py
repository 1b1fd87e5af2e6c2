"""The balancer's planner on small grids: each rule of the policy on its own (the scale
simulation is in test_balancer_scale.py)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from deskpool.domain.errors import InvalidInput
from deskpool.scheduler.balancer import (
    BalancePolicy,
    DesktopLoad,
    HostLoad,
    PastMove,
    Resource,
    Watermarks,
    plan_moves,
)
from deskpool.scheduler.facts import HostFacts, PlacementRequest

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
POLICY = BalancePolicy(enabled=True, memory=Watermarks(high=0.85, low=0.70),
                       cpu=Watermarks(high=0.80, low=0.60), max_moves_per_host_per_hour=4,
                       max_concurrent_moves=10, min_benefit=0.02,
                       desktop_cooldown=timedelta(hours=2))
HOST_GIB = 100  # 100 GiB hosts: a desktop of n GiB is n% of one


def host(n: int, memory_use: float, *, cpu_load: float = 0.2, state: str = "enabled",
         reachable: bool = True, max_desktops: int | None = None, used_memory_mib: int = 0,
         host_set: str | None = None, set_balances: bool = False) -> HostLoad:
    facts = HostFacts(
        id=uuid.UUID(int=n), name=f"h{n}", state=state, reachable=reachable, hypervisor="QEMU",
        arch="x86_64", cpu_model="", domain_types=("kvm",), vcpus=50,
        memory_mib=HOST_GIB * 1024, storage_free_bytes=10**12, cpu_overcommit=4.0,
        memory_overcommit=1.5, max_desktops=max_desktops, used_vcpus=0,
        used_memory_mib=used_memory_mib, desktops=0,
    )
    return HostLoad(facts, memory_use * HOST_GIB * 1024, cpu_load, host_set=host_set,
                    set_balances=set_balances)


def desk(n: int, on: HostLoad, gib: float = 4.0, *, cpu: float = 0.1,
         pool_balances: bool = True, in_logon: bool = False,
         moving_to: uuid.UUID | None = None) -> DesktopLoad:
    request = PlacementRequest(what=f"desk-{n}", vcpus=2, memory_mib=4096, storage_bytes=0)
    return DesktopLoad(uuid.UUID(int=10_000 + n), f"desk-{n}", on.facts.id, request,
                       gib * 1024, cpu, pool_balances=pool_balances, in_logon=in_logon,
                       moving_to=moving_to)


def test_a_hot_host_sheds_to_the_middle_of_the_band_onto_the_coolest_host() -> None:
    hot, warm, cool = host(1, 0.90), host(2, 0.65), host(3, 0.40)
    desktops = [desk(i, hot) for i in range(10)]
    plan = plan_moves([hot, warm, cool], desktops, [], POLICY, NOW)
    # 90% -> the goal 77.5%: four 4% desktops (86, 82, 78, 74): 78 is still above it.
    assert len(plan.moves) == 4
    assert {m.source for m in plan.moves} == {"h1"}
    # Each goes to the host left least used: h3 until it passes h2, never over the low mark.
    assert [m.target for m in plan.moves] == ["h3", "h3", "h3", "h3"]
    assert all(m.resource == Resource.MEMORY for m in plan.moves)
    assert plan.moves[0].reason == (
        "host h1 memory 90% > 85%: move desk-0 (4 GiB) to h3 (44% after); h1 86% after")
    assert plan.moves[1].reason.startswith("host h1 memory 86% > 85%")
    assert "82%, relieving it to 77% (hot at 90%)" in plan.moves[2].reason
    assert plan.unresolved == ()


def test_the_smallest_desktop_that_relieves_the_host_in_one_move_goes() -> None:
    hot, cool = host(1, 0.80 + 0.02), host(2, 0.30)
    small, medium, large = desk(1, hot, 2.0), desk(2, hot, 6.0), desk(3, hot, 12.0)
    plan = plan_moves([replace(hot, memory_used_mib=0.88 * HOST_GIB * 1024), cool],
                      [small, medium, large], [], POLICY, NOW)
    # 88% -> 77.5% needs 10.5 points: only the 12 GiB desktop does it in one move.
    assert [m.desktop for m in plan.moves] == ["desk-3"]


def test_a_balanced_grid_plans_nothing() -> None:
    # Hysteresis: every host inside the band (or below it) is neither a source nor a target.
    hosts = [host(i, 0.70 + 0.14 * (i % 2), cpu_load=0.75) for i in range(1, 11)]
    hosts.append(host(11, 0.10, cpu_load=0.05))
    desktops = [desk(i * 10 + j, h) for i, h in enumerate(hosts) for j in range(5)]
    assert plan_moves(hosts, desktops, [], POLICY, NOW).moves == ()


def test_off_by_default() -> None:
    hot, cool = host(1, 0.99), host(2, 0.10)
    assert plan_moves([hot, cool], [desk(1, hot)], [], BalancePolicy(), NOW).moves == ()


def test_no_target_has_room_under_the_low_watermark() -> None:
    hot, warm = host(1, 0.95), host(2, 0.68)
    plan = plan_moves([hot, warm], [desk(i, hot) for i in range(5)], [], POLICY, NOW)
    assert plan.moves == ()
    assert len(plan.unresolved) == 1
    assert plan.unresolved[0].startswith("host h1 memory 95% > 85%: none of its 5 movable")


def test_all_hosts_hot_plans_nothing() -> None:
    hosts = [host(i, 0.9 + i / 100) for i in range(1, 5)]
    desktops = [desk(i * 10 + j, h) for i, h in enumerate(hosts) for j in range(5)]
    plan = plan_moves(hosts, desktops, [], POLICY, NOW)
    assert plan.moves == ()
    assert len(plan.unresolved) == 4


@pytest.mark.parametrize("state,reachable", [("draining", True), ("down", True),
                                             ("maintenance", True), ("enabled", False)])
def test_a_draining_down_or_silent_host_is_never_a_target(state: str, reachable: bool) -> None:
    hot, idle = host(1, 0.95), host(2, 0.05, state=state, reachable=reachable)
    plan = plan_moves([hot, idle], [desk(i, hot) for i in range(5)], [], POLICY, NOW)
    assert plan.moves == ()
    # With an enabled host as well, every move goes there.
    ok = host(3, 0.50)
    plan = plan_moves([hot, idle, ok], [desk(i, hot) for i in range(5)], [], POLICY, NOW)
    assert plan.moves and {m.target for m in plan.moves} == {"h3"}


def test_a_draining_hot_host_is_left_to_the_drain() -> None:
    hot, cool = host(1, 0.95, state="draining"), host(2, 0.10)
    assert plan_moves([hot, cool], [desk(1, hot)], [], POLICY, NOW).moves == ()


def test_the_minimum_benefit_is_not_met_by_a_small_desktop() -> None:
    hot, cool = host(1, 0.90), host(2, 0.10)
    tiny = [desk(i, hot, gib=1.5) for i in range(5)]  # 1.5 points each, the minimum is 2
    plan = plan_moves([hot, cool], tiny, [], POLICY, NOW)
    assert plan.moves == ()
    assert "benefit of 2%" in plan.unresolved[0]
    # With a lower minimum (and a cap that allows it) all five go.
    loose = replace(POLICY, min_benefit=0.01, max_moves_per_host_per_hour=10)
    assert len(plan_moves([hot, cool], tiny, [], loose, NOW).moves) == 5


def test_a_desktop_in_logon_or_in_a_pool_without_balancing_stays() -> None:
    hot, cool = host(1, 0.95), host(2, 0.10)
    desktops = [desk(1, hot, in_logon=True), desk(2, hot, pool_balances=False),
                desk(3, hot, moving_to=cool.facts.id), desk(4, hot)]
    plan = plan_moves([hot, cool], desktops, [], POLICY, NOW)
    assert [m.desktop for m in plan.moves] == ["desk-4"]
    assert "no desktop on it may move" in plan.unresolved[0]


def test_a_move_in_flight_counts_on_its_target_and_against_the_concurrency_cap() -> None:
    hot, cool = host(1, 0.90), host(2, 0.10)
    # Two moves of 4 GiB in flight: h1 is at 82% once they land, inside the band.
    flying = [desk(i, hot, moving_to=cool.facts.id) for i in range(2)]
    plan = plan_moves([hot, cool], [*flying, *(desk(i, hot) for i in range(2, 8))], [],
                      POLICY, NOW)
    assert plan.moves == ()
    capped = replace(POLICY, max_concurrent_moves=2)
    hotter = replace(hot, memory_used_mib=0.99 * HOST_GIB * 1024)
    plan = plan_moves([hotter, cool], [*flying, *(desk(i, hot) for i in range(2, 8))], [],
                      capped, NOW)
    assert plan.moves == ()
    assert "2 moves in flight, the cap is 2" in plan.unresolved[0]


def test_the_concurrency_cap_goes_to_the_hottest_hosts_first() -> None:
    hosts = [host(1, 0.88), host(2, 0.99), host(3, 0.20), host(4, 0.20)]
    desktops = [desk(i * 10 + j, h) for i, h in enumerate(hosts[:2]) for j in range(6)]
    plan = plan_moves(hosts, desktops, [], replace(POLICY, max_concurrent_moves=2), NOW)
    assert [m.source for m in plan.moves] == ["h2", "h2"]


def test_the_hourly_cap_counts_moves_on_both_ends() -> None:
    hot, cool, other = host(1, 0.99), host(2, 0.10), host(3, 0.10)
    old = NOW - timedelta(minutes=61)
    recent = NOW - timedelta(minutes=30)
    # h2 took 4 moves in the last hour (as a target): it is full for now; h3's are too old.
    elsewhere = uuid.UUID(int=77)  # a host outside the grid
    history = [PastMove(uuid.UUID(int=90 + i), elsewhere, cool.facts.id, recent)
               for i in range(4)]
    history += [PastMove(uuid.UUID(int=95 + i), hot.facts.id, other.facts.id, old)
                for i in range(4)]
    plan = plan_moves([hot, cool, other], [desk(i, hot) for i in range(10)], history,
                      POLICY, NOW)
    assert {m.target for m in plan.moves} == {"h3"}
    # Four per host: h1 (the source) stops at four although it is still above its goal.
    assert len(plan.moves) == 4
    assert "4 moves in the last hour, the cap is 4" in plan.unresolved[0]


def test_a_desktop_moved_within_the_cooldown_does_not_move_back() -> None:
    hot, cool = host(1, 0.95), host(2, 0.10)
    # desk-1 came from h2 90 minutes ago; it alone would relieve h1 in one move.
    came, other = desk(1, hot, gib=18.0), desk(2, hot, gib=4.0)
    back = [PastMove(came.id, cool.facts.id, hot.facts.id, NOW - timedelta(minutes=90))]
    plan = plan_moves([hot, cool], [came, other], back, POLICY, NOW)
    assert [m.desktop for m in plan.moves] == ["desk-2"]
    later = NOW + timedelta(minutes=31)  # the two hours are over
    plan = plan_moves([hot, cool], [came, other], back, POLICY, later)
    assert [m.desktop for m in plan.moves] == ["desk-1"]


def test_a_pinned_desktop_goes_only_to_its_hosts() -> None:
    # The placement filters apply: h2 is the coolest, but the desktop is pinned to h1 and h3.
    hot, coolest, cool = host(1, 0.90), host(2, 0.10), host(3, 0.50)
    pinned = desk(1, hot, gib=14.0)
    pinned = replace(pinned, request=replace(
        pinned.request, allowed_hosts=frozenset({hot.facts.id, cool.facts.id})))
    plan = plan_moves([hot, coolest, cool], [pinned], [], POLICY, NOW)
    assert [(m.desktop, m.target) for m in plan.moves] == [("desk-1", "h3")]


def test_moves_in_one_pass_never_push_a_target_over_its_limits() -> None:
    # h2 is nearly empty by measure but its allocations allow 2 more desktops of 4 GiB
    # (150 GiB with overcommit, 142 GiB given); h3 takes the rest.
    hot = host(1, 0.99)
    small = host(2, 0.10, used_memory_mib=142 * 1024)
    slim = host(3, 0.20, max_desktops=3)
    plan = plan_moves([hot, small, slim], [desk(i, hot) for i in range(10)], [],
                      replace(POLICY, max_moves_per_host_per_hour=10), NOW)
    targets = [m.target for m in plan.moves]
    assert targets.count("h2") == 2
    assert targets.count("h3") == 3
    assert "none of its 5 movable desktops fits" in plan.unresolved[0]


def test_a_move_never_makes_the_target_hot_in_the_other_resource() -> None:
    hot = host(1, 0.95)
    busy = host(2, 0.10, cpu_load=0.79)  # cool in memory, nearly hot in CPU
    desktops = [desk(i, hot, cpu=1.0) for i in range(5)]  # 2% of h2's 50 CPUs each
    assert plan_moves([hot, busy], desktops, [], POLICY, NOW).moves == ()


def test_cpu_pressure_moves_the_busiest_desktops() -> None:
    hot = host(1, 0.50, cpu_load=0.95)
    cool = host(2, 0.50, cpu_load=0.20)
    desktops = [desk(i, hot, cpu=0.5 + i) for i in range(4)]  # 0.5 .. 3.5 CPUs
    plan = plan_moves([hot, cool], desktops, [], POLICY, NOW)
    # 95% of 50 CPUs -> the goal 70% needs 12.5 CPUs off: the biggest go first; desk-0's
    # 0.5 CPUs (1%) is below the minimum benefit, so h1 stays above its goal.
    assert [m.desktop for m in plan.moves] == ["desk-3", "desk-2", "desk-1"]
    assert "benefit of 2%" in plan.unresolved[0]
    assert all(m.resource == Resource.CPU for m in plan.moves)
    assert plan.moves[0].reason.startswith("host h1 CPU 95% > 80%: move desk-3 (3.5 CPUs busy)")


def test_a_move_never_leaves_its_host_set() -> None:
    # A cool host of another set (or of the default set) is never the target.
    hot, cool = host(1, 0.95, host_set="rack-a"), host(2, 0.10, host_set="rack-b")
    plan = plan_moves([hot, cool], [desk(1, hot)], [], POLICY, NOW)
    assert plan.moves == () and "fits another host" in plan.unresolved[0]
    hot, cool = host(1, 0.95, host_set="rack-a"), host(2, 0.10)
    assert plan_moves([hot, cool], [desk(1, hot)], [], POLICY, NOW).moves == ()
    hot, cool = host(1, 0.95), host(2, 0.10, host_set="rack-a")
    assert plan_moves([hot, cool], [desk(1, hot)], [], POLICY, NOW).moves == ()
    # Within the set the same desktop goes, to the set's host even when another is cooler.
    hot, other_set, same = (host(1, 0.95, host_set="rack-a"), host(2, 0.05, host_set="b"),
                            host(3, 0.30, host_set="rack-a"))
    plan = plan_moves([hot, other_set, same], [desk(1, hot)], [], POLICY, NOW)
    assert [m.target for m in plan.moves] == ["h3"]


def test_a_balanced_host_set_moves_desktops_of_pools_without_balancing() -> None:
    # Either switch is enough: the pool's or the set's.
    hot, cool = host(1, 0.95, host_set="rack-a"), host(2, 0.10, host_set="rack-a")
    still = desk(1, hot, pool_balances=False)
    plan = plan_moves([hot, cool], [still], [], POLICY, NOW)
    assert plan.moves == () and "no desktop on it may move" in plan.unresolved[0]
    hot, cool = (host(1, 0.95, host_set="rack-a", set_balances=True),
                 host(2, 0.10, host_set="rack-a", set_balances=True))
    plan = plan_moves([hot, cool], [desk(1, hot, pool_balances=False)], [], POLICY, NOW)
    assert [(m.desktop, m.target) for m in plan.moves] == [("desk-1", "h2")]
    # Never during a logon, whatever the switches.
    plan = plan_moves([hot, cool], [desk(1, hot, pool_balances=False, in_logon=True)], [],
                      POLICY, NOW)
    assert plan.moves == ()


def test_bad_watermarks_are_refused() -> None:
    with pytest.raises(InvalidInput):
        Watermarks(high=0.7, low=0.8)
    with pytest.raises(InvalidInput):
        BalancePolicy(max_moves_per_host_per_hour=-1)
