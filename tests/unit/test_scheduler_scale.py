"""Placement at scale: 10,000 desktops on 100 hosts of four shapes, each limited by a different
resource. No limit is ever exceeded, SPREAD keeps every host equally full (within a proven
band), PACK fills hosts one after another, and demand beyond capacity fails at exactly capacity.

Shapes (CPU overcommit 4.0, memory overcommit 1.0; a desktop is 2 vCPU, 1 GiB, 2 GiB of disk):

  shape  vCPU  memory   max_desktops  holds  limited by
  A         8   16 GiB  -               16   vCPUs (32/2) and memory (16/1) alike
  B        32   48 GiB  -               48   memory (vCPUs would hold 64)
  C        64  256 GiB  -              128   vCPUs (memory would hold 256)
  D       128  384 GiB  220            220   the desktop limit (vCPUs 256, memory 384)

25 hosts of each: 25 x (16 + 48 + 128 + 220) = 10,300 desktops. Disk is 25% more than each
host's desktops need, so it is never the limit. Shapes alternate in name order so that the
name tie-break does not line up with the shapes.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Sequence

import pytest

from deskpool.scheduler.facts import HostFacts, Placement, PlacementRequest, Strategy
from deskpool.scheduler.placement import NoValidHost, place_many
from deskpool.scheduler.weighers import DEFAULT_WEIGHERS, StrategyWeigher

GIB = 1024**3
CPU_RATIO, MEM_RATIO = 4.0, 1.0
DESKTOP_VCPUS, DESKTOP_MIB, DESKTOP_DISK = 2, 1024, 2 * GIB
# name: (vcpus, memory GiB, max_desktops, desktops it holds)
SHAPES: dict[str, tuple[int, int, int | None, int]] = {
    "A": (8, 16, None, 16),
    "B": (32, 48, None, 48),
    "C": (64, 256, None, 128),
    "D": (128, 384, 220, 220),
}
CAPACITY = 25 * sum(s[3] for s in SHAPES.values())  # 10,300


def fleet() -> list[HostFacts]:
    hosts = []
    for i in range(100):
        shape = "ABCD"[i % 4]
        vcpus, mem_gib, max_desktops, holds = SHAPES[shape]
        hosts.append(HostFacts(
            id=uuid.UUID(int=i + 1), name=f"h{i:03}-{shape}", state="enabled", reachable=True,
            hypervisor="QEMU", arch="x86_64", cpu_model="", domain_types=("qemu", "kvm"),
            vcpus=vcpus, memory_mib=mem_gib * 1024,
            storage_free_bytes=math.ceil(holds * 1.25) * DESKTOP_DISK,
            cpu_overcommit=CPU_RATIO, memory_overcommit=MEM_RATIO, max_desktops=max_desktops,
            used_vcpus=0, used_memory_mib=0, desktops=0,
        ))
    return hosts


def request(strategy: Strategy) -> PlacementRequest:
    return PlacementRequest(what="pool 'scale'", vcpus=DESKTOP_VCPUS, memory_mib=DESKTOP_MIB,
                            storage_bytes=DESKTOP_DISK, hypervisors=frozenset({"QEMU"}),
                            arch="x86_64", strategy=strategy)


def holds(h: HostFacts) -> int:
    return SHAPES[h.name[-1]][3]


def limits(h: HostFacts) -> list[tuple[int, float]]:
    """(per-desktop amount, limit) for each resource a desktop takes, and the desktop count."""
    out: list[tuple[int, float]] = [
        (DESKTOP_VCPUS, h.vcpus * h.cpu_overcommit),
        (DESKTOP_MIB, h.memory_mib * h.memory_overcommit),
        (DESKTOP_DISK, h.storage_free_bytes),
    ]
    if h.max_desktops is not None:
        out.append((1, h.max_desktops))
    return out


def used_fraction(h: HostFacts, n: int) -> float:
    """How full a host with n desktops is in its limiting resource."""
    return max(n * each / limit for each, limit in limits(h))


def check_limits(hosts: Sequence[HostFacts], counts: Counter[uuid.UUID]) -> None:
    for h in hosts:
        n = counts[h.id]
        assert n <= holds(h), h.name
        for each, limit in limits(h):
            assert n * each <= limit, h.name


def timed_place_many(req: PlacementRequest, hosts: list[HostFacts],
                     count: int) -> tuple[list[Placement], float]:
    """Placements and the CPU seconds they took (printed, never asserted: machines are
    noisy; a benchmark is the place for speed)."""
    start = time.process_time()
    placed = place_many(req, hosts, count)
    cpu_s = time.process_time() - start
    print(f"placed {count} desktops in {cpu_s:.2f} s of CPU")
    return placed, cpu_s


def test_capacity_is_what_the_shapes_say() -> None:
    assert CAPACITY == 10_300
    for h in fleet():
        # holds(h) more would exactly fill the limiting resource; one more would not fit.
        assert used_fraction(h, holds(h)) == 1.0
        assert used_fraction(h, holds(h) + 1) > 1.0


def test_spread_10000_desktops_on_100_hosts() -> None:
    """Every host ends within a band of the others in how full it is.

    Bound: max - min of the hosts' used fractions <= delta / (1 - k) (+ 1e-9 for rounding),
    where delta = the largest share one desktop takes of any host's limiting resource (1/16,
    a shape-A host) and k = (sum of the other weighers' multipliers) / (strategy multiplier)
    = 2/10, so the band is 1.25/16 = 0.078.

    Proof sketch: every weigher adds between 0 and its multiplier, and the least used candidate
    gets the full strategy multiplier S, so the winner w scores >= S; the others add at most
    k*S, so w's normalized strategy value is >= 1 - k, i.e. f_w <= f_min + k*R (R: the band).
    After placing, f_w grows by at most delta and f_min does not fall, so the band becomes at
    most max(R, k*R + delta), which stays <= delta / (1 - k) once it is (it starts at 0). Full
    hosts are at fraction 1 here, above everyone, so dropping them from the candidates changes
    neither f_min nor the argument.
    """
    hosts = fleet()
    placed, _cpu_s = timed_place_many(request(Strategy.SPREAD), hosts, 10_000)
    assert len(placed) == 10_000
    counts = Counter(p.host_id for p in placed)
    check_limits(hosts, counts)

    delta = max(max(each / limit for each, limit in limits(h)) for h in hosts)
    assert delta == 1 / 16
    strategy = next(w for w in DEFAULT_WEIGHERS if isinstance(w, StrategyWeigher))
    k = sum(w.multiplier for w in DEFAULT_WEIGHERS if w is not strategy) / strategy.multiplier
    bound = delta / (1 - k)
    assert bound == pytest.approx(0.078125)

    fractions = [used_fraction(h, counts[h.id]) for h in hosts]
    assert max(fractions) - min(fractions) <= bound + 1e-9
    # Big hosts took proportionally more: a D host ~13.75x an A host (220 : 16).
    by_shape = {s: [counts[h.id] for h in hosts if h.name.endswith(s)] for s in SHAPES}
    assert min(by_shape["D"]) > 10 * max(by_shape["A"])


def test_pack_fills_hosts_one_after_another() -> None:
    """At most one host is partly used, and the biggest hosts are started first, so the number
    of hosts used is the minimum that can hold the desktops (asserted: at most one more)."""
    hosts = fleet()
    for count in (1_000, 10_000):
        placed, _ = timed_place_many(request(Strategy.PACK), hosts, count)
        counts = Counter(p.host_id for p in placed)
        check_limits(hosts, counts)
        used = [h for h in hosts if counts[h.id] > 0]
        partly = [h.name for h in used if counts[h.id] < holds(h)]
        assert len(partly) <= 1, partly
        sizes = sorted((holds(h) for h in hosts), reverse=True)
        minimal = next(n for n in range(1, 101) if sum(sizes[:n]) >= count)
        assert minimal <= len(used) <= minimal + 1
        # Hosts fill one after another: each host's desktops are one unbroken run.
        runs = [p.host for i, p in enumerate(placed) if i == 0 or placed[i - 1].host != p.host]
        assert len(runs) == len(used)


def test_demand_beyond_capacity_fails_at_exactly_capacity() -> None:
    hosts = fleet()
    with pytest.raises(NoValidHost) as err:
        place_many(request(Strategy.SPREAD), hosts, CAPACITY + 5)
    placed = err.value.placed
    assert len(placed) == CAPACITY
    counts = Counter(p.host_id for p in placed)
    check_limits(hosts, counts)
    assert all(counts[h.id] == holds(h) for h in hosts)
    # Shape A runs out of vCPUs first (filter order), B of memory, C of vCPUs, D of desktops.
    assert err.value.rejected == {"vcpus": 50, "memory": 25, "desktops": 25}
    assert str(err.value) == (
        "no host can take a desktop for pool 'scale': 50 hosts lack vCPUs "
        "(h000-A: 32 of 32 vCPUs used, 2 asked), 25 lack memory "
        "(h001-B: 49152 of 49152 MiB used, 1024 asked), 25 are full "
        "(h003-D has 220 of 220 desktops) (after placing 10300 of 10305 desktops)"
    )
