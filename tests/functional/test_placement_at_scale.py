"""Placement at scale through the database: 100 fake hosts of four shapes registered with
``HostService.add``, and 10,000 desktop rows of one pool placed by ``Placer`` and written by
``insert_pool_desktop``, the path the reconciler and the broker take (no VM is made: placement
is what is tested). Read back from the database, no host is over a limit, every desktop says
why it is where it is, and the spread promise of ``tests/unit/test_scheduler_scale.py`` holds.

Shapes as in the unit test (CPU overcommit 4.0, memory overcommit 1.0; a desktop is 2 vCPU
and 1 GiB; linked clones, so storage, 1 TiB a host, is never the limit):

  shape  vCPU  memory   max_desktops  holds  limited by
  A         8   16 GiB  -               16   vCPUs and memory alike
  B        32   48 GiB  -               48   memory
  C        64  256 GiB  -              128   vCPUs
  D       128  384 GiB  220            220   the desktop limit
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.scheduler.facts import HostFacts, PlacementRequest, Strategy
from deskpool.scheduler.placement import place_many
from deskpool.scheduler.weighers import DEFAULT_WEIGHERS, StrategyWeigher
from deskpool.services.context import ServiceContext
from deskpool.services.factory import DesktopFactory
from deskpool.services.hosts import HostLimits, HostService
from deskpool.services.placement import Placer
from deskpool.services.pools import PoolService, insert_pool_desktop
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.store.models import Desktop, Host, TemplateVersion

DESKTOP_VCPUS, DESKTOP_MIB = 2, 1024
# name: (vcpus, memory GiB, max_desktops, desktops it holds)
SHAPES: dict[str, tuple[int, int, int | None, int]] = {
    "A": (8, 16, None, 16),
    "B": (32, 48, None, 48),
    "C": (64, 256, None, 128),
    "D": (128, 384, 220, 220),
}
HOSTS = 100
DESKTOPS = 10_000
BATCHES = 10  # units of work, each with its own Placer reading what the ones before placed


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    forget_fake_hosts()
    context = ServiceContext(Settings(data_dir=tmp_path / "data"))
    yield context
    context.close()
    forget_fake_hosts()


def register_fleet(ctx: ServiceContext) -> None:
    """100 hosts, shapes alternating in name order (so the name tie-break does not line up
    with the shapes), each read from its fake hypervisor by ``HostService.add``."""
    hosts = HostService(ctx)
    for i in range(HOSTS):
        shape = "ABCD"[i % 4]
        vcpus, mem_gib, max_desktops, _ = SHAPES[shape]
        hosts.add(f"h{i:03}-{shape.lower()}",
                  f"fake://scale-{i:03}?vcpus={vcpus}&memory_mib={mem_gib * 1024}"
                  "&storage_gib=1024",
                  limits=HostLimits(cpu_overcommit=4.0, memory_overcommit=1.0,
                                    max_desktops=max_desktops))


def place_pool(ctx: ServiceContext, pool_name: str) -> None:
    factory = DesktopFactory(ctx)
    for _ in range(BATCHES):
        with ctx.uow() as uow:
            pool = uow.pools.get_by_name(pool_name)
            placer = Placer(uow)
            taken_macs = uow.desktops.macs()
            for _ in range(DESKTOPS // BATCHES):
                insert_pool_desktop(uow, factory, pool, taken_macs, placer=placer)
            uow.commit()


def used_fraction(host: Host, n: int) -> float:
    """How full a host with n desktops is in its limiting resource."""
    parts = [n * DESKTOP_VCPUS / (host.vcpus * host.cpu_overcommit),
             n * DESKTOP_MIB / (host.memory_mib * host.memory_overcommit)]
    if host.max_desktops is not None:
        parts.append(n / host.max_desktops)
    return max(parts)


def test_10000_desktops_placed_through_the_database_on_100_hosts(
        ctx: ServiceContext, tmp_path: Path) -> None:
    start = time.perf_counter()
    register_fleet(ctx)
    registered_s = time.perf_counter() - start
    disk = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk), vcpus=DESKTOP_VCPUS,
                                 memory_mib=DESKTOP_MIB)
    PoolService(ctx).create(PoolSpec("scale", "golden", spare=0, max_size=DESKTOPS,
                                     naming_pattern="s-{n:05}"))

    start = time.perf_counter()
    place_pool(ctx, "scale")
    placed_s = time.perf_counter() - start
    print(f"registered {HOSTS} hosts in {registered_s:.1f} s; placed {DESKTOPS} desktops "
          f"in {BATCHES} units of work in {placed_s:.1f} s")

    with ctx.uow(read_only=True) as uow:
        hosts = {h.id: h for h in uow.hosts.list()}
        for h in hosts.values():
            uow.session.expunge(h)  # read below, after this unit of work
        usage = {host_id: (n, vcpus, memory) for host_id, n, vcpus, memory in
                 uow.session.execute(
                     select(Desktop.host_id, func.count(), func.sum(TemplateVersion.vcpus),
                            func.sum(TemplateVersion.memory_mib))
                     .join(TemplateVersion, TemplateVersion.id == Desktop.template_version_id)
                     .group_by(Desktop.host_id))}
        reasons = uow.session.execute(
            select(Desktop.placement_reason, Host.name)
            .join(Host, Host.id == Desktop.host_id)).all()
        names = set(uow.session.scalars(select(Desktop.name)))

    assert len(hosts) == HOSTS
    assert sum(n for n, _, _ in usage.values()) == DESKTOPS
    assert names == {f"s-{n:05}" for n in range(1, DESKTOPS + 1)}
    # Every desktop says why it is where it is, naming its host.
    assert len(reasons) == DESKTOPS
    for reason, host in reasons:
        assert reason is not None and reason.startswith(f"host {host}: "), (reason, host)
        assert "spread" in reason

    # No host is over any of its limits.
    counts: dict[uuid.UUID, int] = {}
    for host_id, host in hosts.items():
        n, vcpus, memory = usage.get(host_id, (0, 0, 0))
        counts[host_id] = n
        assert vcpus <= host.vcpus * host.cpu_overcommit, host.name
        assert memory <= host.memory_mib * host.memory_overcommit, host.name
        if host.max_desktops is not None:
            assert n <= host.max_desktops, host.name
        assert n <= SHAPES[host.name[-1].upper()][3], host.name

    # The spread promise of the unit test: every host within delta / (1 - k) of the others in
    # how full it is (delta: the largest share one desktop takes of a host's limiting
    # resource, 1/16 on an A host; k: the other weighers' multipliers over the strategy's).
    delta = max(max(DESKTOP_VCPUS / (h.vcpus * h.cpu_overcommit),
                    DESKTOP_MIB / (h.memory_mib * h.memory_overcommit),
                    1 / h.max_desktops if h.max_desktops else 0.0)
                for h in hosts.values())
    assert delta == 1 / 16
    strategy = next(w for w in DEFAULT_WEIGHERS if isinstance(w, StrategyWeigher))
    k = sum(w.multiplier for w in DEFAULT_WEIGHERS if w is not strategy) / strategy.multiplier
    bound = delta / (1 - k)
    fractions = [used_fraction(h, counts[h.id]) for h in hosts.values()]
    print(f"used fractions: {min(fractions):.3f} to {max(fractions):.3f} "
          f"(band {max(fractions) - min(fractions):.3f}, promised <= {bound:.3f})")
    assert max(fractions) - min(fractions) <= bound + 1e-9
    by_shape = {s: [counts[h.id] for h in hosts.values() if h.name.endswith(s.lower())]
                for s in SHAPES}
    assert min(by_shape["D"]) > 10 * max(by_shape["A"])

    # The database path places exactly as the scheduler does on the same facts in memory:
    # what each Placer read back from the rows is what the one before it had placed.
    facts = [HostFacts(
        id=h.id, name=h.name, state=h.state.value, reachable=True, hypervisor=h.hypervisor,
        arch=h.arch, cpu_model=h.cpu_model, domain_types=tuple(h.domain_types.split(",")),
        vcpus=h.vcpus, memory_mib=h.memory_mib, storage_free_bytes=h.storage_free_bytes,
        cpu_overcommit=h.cpu_overcommit, memory_overcommit=h.memory_overcommit,
        max_desktops=h.max_desktops, used_vcpus=0, used_memory_mib=0, desktops=0)
        for h in hosts.values()]
    request = PlacementRequest(what="pool 'scale'", vcpus=DESKTOP_VCPUS,
                               memory_mib=DESKTOP_MIB, storage_bytes=256 * 1024**2,
                               strategy=Strategy.SPREAD)
    expected: dict[uuid.UUID, int] = dict.fromkeys(hosts, 0)
    for p in place_many(request, facts, DESKTOPS):
        expected[p.host_id] += 1
    assert counts == expected
