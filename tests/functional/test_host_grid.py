"""The host grid on the fake driver: placement over hosts of different sizes and limits, pools
pinned to hosts, refused host registrations, drain into maintenance, a host that dies and comes
back, and two reconcilers sharing one database through leases.

Every host is a fake hypervisor shaped by its URI (``fake://NAME?vcpus=..&memory_mib=..``); the
reconciler runs on a clock the tests move, so grace periods and leases are exact.
"""

from __future__ import annotations

import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.config import Settings
from deskpool.domain.errors import (
    Conflict,
    HypervisorUnreachable,
    InvalidInput,
    NotFound,
    Unavailable,
)
from deskpool.domain.models import DomainType, PowerState, StopReason
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec, PowerPolicy
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.registry import forget_fake_hosts, open_driver
from deskpool.reconciler.loop import Reconciler
from deskpool.reconciler.report import Outcome
from deskpool.services.context import ServiceContext
from deskpool.services.events import EventView, recent_events
from deskpool.services.hosts import HostLimits, HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.store.models import Desktop, Host, Pool, PoolHost, TemplateVersion, utcnow
from tests.broker_world import BrokerWorld

GRACE = timedelta(seconds=60)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class Row:
    """One desktop as the database has it."""

    id: uuid.UUID
    name: str
    state: str
    host: str
    pool: str | None
    user: str | None
    placement_reason: str | None
    notice: str | None


@dataclass
class Grid:
    ctx: ServiceContext
    clock: Clock
    world: BrokerWorld  # users, tokens and HTTP clients
    fakes: dict[str, FakeDriver]

    def host(self, name: str, limits: HostLimits | None = None, **shape: object) -> FakeDriver:
        query = "&".join(f"{k}={v}" for k, v in shape.items())
        uri = f"fake://{name}" + (f"?{query}" if query else "")
        HostService(self.ctx).add(name, uri, limits=limits)
        fake = open_driver(uri)
        assert isinstance(fake, FakeDriver)
        self.fakes[name] = fake
        return fake

    def pool(self, name: str, *, hosts: tuple[str, ...] = (), **kw: object) -> str:
        fields: dict[str, object] = {"name": name, "template": "golden", "spare": 2,
                                     "max_size": 10, "naming_pattern": f"{name}-{{n:02}}"}
        fields.update(kw)
        PoolService(self.ctx).create(PoolSpec(**fields), hosts=hosts)  # type: ignore[arg-type]
        return name

    def reconciler(self, **kw: Any) -> Reconciler:
        return Reconciler(self.ctx, workers=4, ready_timeout_s=5, clock=self.clock,
                          host_down_after=GRACE, **kw)

    def rows(self) -> dict[str, Row]:
        return desktop_rows(self.ctx)

    def on(self, host: str, *, pool: str | None = None) -> list[Row]:
        return sorted((r for r in self.rows().values()
                       if r.host == host and (pool is None or r.pool == pool)),
                      key=lambda r: r.name)

    def host_state(self, name: str) -> str:
        return HostService(self.ctx).get(name).state

    def vm_ids(self, host: str) -> set[uuid.UUID]:
        return {vm.vm_id for vm in self.fakes[host].list_vms()}

    def events(self, kind: str) -> list[EventView]:
        return [e for e in recent_events(self.ctx) if e.kind == kind]


def desktop_rows(ctx: ServiceContext) -> dict[str, Row]:
    with ctx.uow(read_only=True) as uow:
        found = uow.session.execute(
            select(Desktop, Host.name, Pool.name).join(Host, Host.id == Desktop.host_id)
            .outerjoin(Pool, Pool.id == Desktop.pool_id)).all()
        return {d.name: Row(d.id, d.name, d.state, host, pool, d.assigned_user,
                            d.placement_reason, d.notice) for d, host, pool in found}


def person(name: str) -> Identity:
    return Identity(name, name, "local")


@pytest.fixture()
def grid(tmp_path: Path) -> Iterator[Grid]:
    forget_fake_hosts()
    ctx = ServiceContext(Settings(data_dir=tmp_path / "data"))
    disk = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    # 1 vCPU and 1 GiB a desktop keeps the hosts' limits easy to count.
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk), vcpus=1, memory_mib=1024,
                                 runs_on="FAKE", arch="x86_64")
    world = BrokerWorld(ctx=ctx, fake=None)  # type: ignore[arg-type]  # only users and clients
    yield Grid(ctx=ctx, clock=Clock(), world=world, fakes={})
    ctx.close()
    forget_fake_hosts()


def assert_within_limits(ctx: ServiceContext) -> dict[str, int]:
    """No host holds more live desktops than its vCPU, memory or desktop limit allows;
    returns the live desktops per host."""
    live = ("provisioning", "customizing", "ready", "reserved", "in_use", "idle", "recycling")
    with ctx.uow(read_only=True) as uow:
        usage = {name: (n, vcpus, mem) for name, n, vcpus, mem in uow.session.execute(
            select(Host.name, func.count(), func.sum(TemplateVersion.vcpus),
                   func.sum(TemplateVersion.memory_mib))
            .join(Desktop, Desktop.host_id == Host.id)
            .join(TemplateVersion, TemplateVersion.id == Desktop.template_version_id)
            .where(Desktop.state.in_(live)).group_by(Host.name))}
        for host in uow.hosts.list():
            n, vcpus, mem = usage.get(host.name, (0, 0, 0))
            assert vcpus <= host.vcpus * host.cpu_overcommit, host.name
            assert mem <= host.memory_mib * host.memory_overcommit, host.name
            if host.max_desktops is not None:
                assert n <= host.max_desktops, host.name
    return {name: n for name, (n, _, _) in usage.items()}


# --- placement over hosts of different sizes ------------------------------------------------


def test_a_pool_spreads_over_hosts_of_different_sizes_within_their_limits(grid: Grid) -> None:
    # Desktops each host holds: big 4 (its desktop limit; vCPUs would allow 32), mid 3 (its
    # limit), small 2 (memory: 2 GiB for 1 GiB desktops). 9 in all.
    grid.host("big", HostLimits(max_desktops=4), vcpus=8, memory_mib=16384)
    grid.host("mid", HostLimits(max_desktops=3), vcpus=4, memory_mib=8192)
    grid.host("small", vcpus=2, memory_mib=2048)
    grid.world.user("root", admin=True)
    grid.pool("grid", spare=6, max_size=10)
    reconciler = grid.reconciler()

    report = reconciler.run_pass()
    assert report.created == 6 and report.errors == []
    per_host = assert_within_limits(grid.ctx)
    assert sorted(per_host) == ["big", "mid", "small"]  # spread: every host took some
    assert per_host["big"] >= per_host["mid"] >= per_host["small"]  # by size

    # Asking for more than the grid holds fills every host to its limit, and no further.
    PoolService(grid.ctx).resize("grid", spare=10)
    report = reconciler.run_pass()
    assert report.created == 3
    assert len(report.errors) == 1
    assert report.errors[0].startswith("no host can take a desktop for pool 'grid': ")
    assert "1 host lacks memory (small: 2048 of 2048 MiB used, 1024 asked)" in report.errors[0]
    assert "2 are full" in report.errors[0]
    assert assert_within_limits(grid.ctx) == {"big": 4, "mid": 3, "small": 2}
    reconciler.run_pass()  # the last ones made ready; still no tenth desktop
    assert assert_within_limits(grid.ctx) == {"big": 4, "mid": 3, "small": 2}

    # The admin sees, for every desktop, the host and why it was chosen.
    rows = grid.world.client("root").get("/api/v1/admin/desktops").json()
    assert len(rows) == 9 and {r["state"] for r in rows} == {"ready"}
    for r in rows:
        assert r["placement_reason"].startswith(f"host {r['host']}: "), r
        assert "spread" in r["placement_reason"]
    # The VMs are where the rows say.
    for host, fake in grid.fakes.items():
        assert {vm.name for vm in fake.list_vms()} == {r["name"] for r in rows
                                                       if r["host"] == host}


# --- pinned pools -----------------------------------------------------------------------------


def test_a_pinned_pool_uses_only_its_hosts_and_bad_pins_store_nothing(grid: Grid) -> None:
    for name in ("a", "b", "c"):
        grid.host(name)
    grid.host("x", hypervisor="TEST")  # the template runs on FAKE only
    grid.host("y", arch="aarch64")  # the template is x86_64
    grid.pool("pinned", hosts=("b", "c"), spare=6)
    grid.pool("anywhere", spare=6)
    reconciler = grid.reconciler()
    reconciler.run_pass()
    reconciler.run_pass()
    rows = grid.rows()
    assert len(rows) == 12 and {r.state for r in rows.values()} == {"ready"}
    pinned = Counter(r.host for r in rows.values() if r.pool == "pinned")
    assert set(pinned) == {"b", "c"}  # both pinned hosts, nothing else
    # The unpinned pool goes anywhere the template runs: never on x or y.
    assert {r.host for r in rows.values() if r.pool == "anywhere"} <= {"a", "b", "c"}
    assert grid.vm_ids("x") == set() and grid.vm_ids("y") == set()

    pools = PoolService(grid.ctx)
    with pytest.raises(InvalidInput) as wrong_hypervisor:
        pools.create(PoolSpec("bad", "golden"), hosts=["a", "x"])
    assert str(wrong_hypervisor.value) == (
        "pool 'bad' cannot be pinned there: host 'x' is a TEST hypervisor; the template "
        "runs on FAKE")
    with pytest.raises(InvalidInput, match="host 'y' is aarch64; the template is x86_64"):
        pools.create(PoolSpec("bad", "golden"), host="y")
    with pytest.raises(NotFound, match="host 'nosuch' does not exist"):
        pools.create(PoolSpec("bad", "golden"), hosts=["b", "nosuch"])
    assert [p.name for p in pools.list()] == ["anywhere", "pinned"]
    with grid.ctx.uow(read_only=True) as uow:
        assert uow.session.scalar(select(func.count()).select_from(PoolHost)) == 2


# --- registering and managing hosts -----------------------------------------------------------


def test_bad_hosts_and_limits_are_refused_and_nothing_is_stored(grid: Grid) -> None:
    hosts = HostService(grid.ctx)
    with pytest.raises(HypervisorUnreachable) as refused:
        hosts.add("dead", "qemu+tcp://127.0.0.1:1/system")
    assert "cannot reach a hypervisor at 'qemu+tcp://127.0.0.1:1/system'" in str(refused.value)
    assert "Connection refused" in str(refused.value)
    with pytest.raises(HypervisorUnreachable, match="no connection driver available"):
        hosts.add("notahv", "file:///etc/passwd")
    with pytest.raises(HypervisorUnreachable, match="bad fake host shape"):
        hosts.add("shapeless", "fake://shapeless?vcpus=many")
    with pytest.raises(InvalidInput, match="does not offer domain type 'kvm'"):
        hosts.add("nokvm", "fake://nokvm", domain_type=DomainType.KVM)
    with pytest.raises(InvalidInput, match=r"host 'neg': cpu_overcommit \(-1.0\) must be"):
        hosts.add("neg", "fake://neg", limits=HostLimits(cpu_overcommit=-1.0))
    with pytest.raises(InvalidInput, match=r"memory_overcommit \(0\) must be a ratio above 0"):
        hosts.add("zero", "fake://zero", limits=HostLimits(memory_overcommit=0))
    with pytest.raises(InvalidInput, match=r"cpu_overcommit \(nan\) must be"):
        hosts.add("nan", "fake://nan", limits=HostLimits(cpu_overcommit=float("nan")))
    with pytest.raises(InvalidInput, match=r"max_desktops \(-1\) must be from 0 to 100000"):
        hosts.add("minus", "fake://minus", limits=HostLimits(max_desktops=-1))
    with pytest.raises(InvalidInput, match="must be 1-63 characters"):
        hosts.add("Bad Name", "fake://ok")
    assert hosts.list() == []

    grid.host("real")
    with pytest.raises(Conflict, match="a host named 'real' already exists"):
        hosts.add("real", "fake://other")
    with pytest.raises(InvalidInput, match=r"cpu_overcommit \(-2.0\) must be"):
        hosts.set_limits("real", HostLimits(cpu_overcommit=-2.0))
    assert hosts.get("real").cpu_overcommit == 4.0  # unchanged
    for verb in (hosts.drain, hosts.enable, hosts.get):
        with pytest.raises(NotFound, match="host 'ghost' does not exist"):
            verb("ghost")
    with pytest.raises(InvalidInput, match="deadline cannot be in the past"):
        hosts.drain("real", grace=timedelta(minutes=-1))
    assert [h.name for h in hosts.list()] == ["real"]
    assert hosts.get("real").state == "enabled"


# --- drain into maintenance -------------------------------------------------------------------


def test_drain_moves_users_and_desktops_off_a_host_into_maintenance(grid: Grid) -> None:
    """Without live moves (``drain_by_migration`` off, or a desktop that cannot move): its
    user is warned and logged off at the deadline. Moves: ``test_live_migration.py``."""
    grid.host("a")
    grid.host("b")
    grid.pool("lab", spare=2)
    for name in ("alice", "bob", "carol"):
        grid.world.user(name, entitled_to=("lab",))
    broker, sessions = Broker(grid.ctx), SessionService(grid.ctx)
    reconciler = grid.reconciler(move_on_drain=False)
    reconciler.run_pass()
    # Spread over two empty equal hosts: lab-01 on a, lab-02 on b; alice takes lab-01.
    alice = broker.connect(person("alice"), "lab")
    assert alice.desktop == "lab-01" and grid.rows()["lab-01"].host == "a"
    assert alice.desktop_id is not None
    sessions.console_connected(alice.desktop_id, "alice")
    reconciler.run_pass()  # a spare for the next user: lab-03, on a (a tie, broken by name)
    free_on_a = [r for r in grid.on("a") if r.state == "ready" and r.user is None]
    assert [r.name for r in free_on_a] == ["lab-03"]

    drained = HostService(grid.ctx).drain("a", grace=timedelta(minutes=10))
    assert drained.state == "draining" and drained.drain_deadline is not None
    deadline = drained.drain_deadline
    report = reconciler.run_pass()
    # a's free desktop left service (retired and removed in this pass), a replacement was
    # made on b, and alice, still working on a, was warned.
    assert report.retired == 1 and report.created == 1 and report.errors == []
    rows = grid.rows()
    assert "lab-03" not in rows and free_on_a[0].id not in grid.vm_ids("a")
    assert [r.name for r in grid.on("a")] == ["lab-01"]
    assert rows["lab-01"].state == "in_use" and rows["lab-01"].user == "alice"
    free = [r for r in rows.values() if r.state == "ready" and r.user is None]
    assert len(free) == 2 and {r.host for r in free} == {"b"}
    assert grid.host_state("a") == "draining"
    mine = grid.world.client("alice").get("/api/v1/desktops").json()
    assert [d["name"] for d in mine] == ["lab-01"]
    assert mine[0]["notice"].startswith("Host maintenance: please save your work; you will be "
                                        f"logged off at {deadline:%H:%M} UTC")
    assert [e.user for e in grid.events("drain-warning")] == ["alice"]
    reconciler.run_pass()
    assert len(grid.events("drain-warning")) == 1  # warned once

    # Other users land on b; their desktops carry no notice.
    for name in ("bob", "carol"):
        handed = broker.connect(person(name), "lab")
        assert handed.status == "ready" and grid.rows()[handed.desktop or ""].host == "b"
        assert grid.world.client(name).get("/api/v1/desktops").json()[0]["notice"] is None
        reconciler.run_pass()
    assert [r.name for r in grid.on("a")] == ["lab-01"]

    # Before the deadline alice keeps working; after it she is logged off.
    assert sessions.run_timers(utcnow(), poll_guests=False).logged_off == []
    assert grid.rows()["lab-01"].state == "in_use"
    timers = sessions.run_timers(deadline + timedelta(seconds=1), poll_guests=False)
    assert timers.logged_off == ["lab-01"] and timers.errors == []
    (off,) = grid.events("logged-off")
    assert off.user == "alice" and "host a is going into maintenance" in off.message
    assert grid.world.client("alice").get("/api/v1/desktops").json() == []

    reconciler.run_pass()
    reconciler.run_pass()
    assert grid.host_state("a") == "maintenance"
    assert len(grid.events("host-maintenance")) == 1
    # Nothing of the stateless pool is left on a: the desktop alice left was not handed
    # back to the pool on a host in maintenance.
    assert grid.on("a") == [] and grid.vm_ids("a") == set()
    again = broker.connect(person("alice"), "lab")
    assert again.status == "ready" and grid.rows()[again.desktop or ""].host == "b"
    reconciler.run_pass()  # a spare for the next user, on b
    assert grid.on("a") == [] and grid.host_state("a") == "maintenance"
    assert_within_limits(grid.ctx)

    # Back in service: the next desktop goes to the empty host a.
    assert HostService(grid.ctx).enable("a").state == "enabled"
    PoolService(grid.ctx).resize("lab", spare=3)
    report = reconciler.run_pass()
    assert report.created == 1 and report.errors == []
    (back,) = grid.on("a")
    assert back.state == "ready" and back.placement_reason is not None
    assert back.placement_reason.startswith("host a: ")


# --- a host that dies and comes back -----------------------------------------------------------


def test_a_dead_host_is_marked_down_after_the_grace_and_comes_back(grid: Grid) -> None:
    fake_a = grid.host("a")
    grid.host("b")
    grid.pool("lab", spare=2)
    grid.pool("home", spare=2, kind=PoolKind.STATEFUL, assignment=Assignment.DEDICATED,
              on_logout=OnLogout.RECYCLE_AS_IS)
    for name in ("alice", "carol"):
        grid.world.user(name, entitled_to=("lab", "home"))
    broker, sessions = Broker(grid.ctx), SessionService(grid.ctx)
    reconciler = grid.reconciler()
    reconciler.run_pass()
    # Two equal empty hosts, ties broken by name: the -01 desktops of both pools are on a.
    alice = broker.connect(person("alice"), "lab")
    carol = broker.connect(person("carol"), "home")
    assert (alice.desktop, carol.desktop) == ("lab-01", "home-01")
    assert alice.desktop_id is not None and carol.desktop_id is not None
    assert {grid.rows()[n].host for n in ("lab-01", "home-01")} == {"a"}
    sessions.console_connected(alice.desktop_id, "alice")
    sessions.console_connected(carol.desktop_id, "carol")
    reconciler.run_pass()  # spares for the next users
    before = grid.rows()
    vms_on_a = grid.vm_ids("a")
    assert {r.id for r in grid.on("a")} == vms_on_a

    fake_a.set_reachable(False)
    for _ in range(2):  # silent, but within the grace period: nothing changes
        report = reconciler.run_pass()
        assert any("host a" in e and "cannot reach" in e for e in report.errors)
        assert grid.host_state("a") == "enabled"
        assert grid.rows() == before
        grid.clock.now += timedelta(seconds=29)
    # Users coming back meanwhile are told to wait; their desktops (and work) are kept.
    for user, desktop in (("alice", "lab-01"), ("carol", "home-01")):
        with pytest.raises(Unavailable, match=f"your desktop {desktop} cannot be reached "
                           "right now .*it is kept for you"):
            broker.connect(person(user), "lab" if user == "alice" else "home")
    assert grid.rows() == before
    assert grid.events("host-down") == []

    grid.clock.now += timedelta(seconds=10)  # 68 s of silence
    report = reconciler.run_pass()
    assert grid.host_state("a") == "down"
    (down,) = grid.events("host-down")
    assert down.severity == "error" and "host a has not answered since" in down.message
    rows = grid.rows()
    for r in before.values():
        if r.host == "a" and r.pool == "lab":  # stateless: out of service, users let go
            assert rows[r.name].state == "retiring" and rows[r.name].user is None
        elif r.host == "a":  # stateful: kept as it was, with its user
            assert rows[r.name] == r
    # alice's stateless desktop is lost; carol's stateful one waits for its host.
    told = {e.user: e.message for e in grid.events("desktop-lost")}
    assert set(told) == {"alice", "carol"}
    assert told["alice"].startswith("lab-01 of alice was on host a, which is down")
    assert told["carol"] == ("your desktop home-01 is on host a, which is down; your files "
                             "are kept on it, and it comes back when the host does")
    # The pool refills on b; nothing new goes to a.
    assert {r.host for r in rows.values() if r.pool == "lab" and r.state == "ready"} == {"b"}

    # alice gets a new desktop on b at once; carol's desktop waits for its host.
    again = broker.connect(person("alice"), "lab")
    assert again.status == "ready" and again.desktop != "lab-01"
    assert grid.rows()[again.desktop or ""].host == "b"
    with pytest.raises(Unavailable) as unavailable:
        broker.connect(person("carol"), "home")
    assert str(unavailable.value) == ("your desktop home-01 is on host a, which is down; it "
                                      "comes back when the host does")
    grid.clock.now += timedelta(minutes=5)
    reconciler.run_pass()  # still down: nothing on a is touched
    fake_a.set_reachable(True)
    assert grid.vm_ids("a") == vms_on_a  # no VM was deleted while the host was away

    report = reconciler.run_pass()
    assert grid.host_state("a") == "enabled"
    assert len(grid.events("host-up")) == 1
    # The stateless desktops retired while it was down are removed now; the stateful ones
    # and their VMs are there as they were.
    lab_on_a = {r.id for r in before.values() if r.host == "a" and r.pool == "lab"}
    home_on_a = {r.id for r in before.values() if r.host == "a" and r.pool == "home"}
    assert lab_on_a and home_on_a
    assert grid.vm_ids("a") == home_on_a
    assert not lab_on_a & {r.id for r in grid.rows().values()}
    for r in before.values():
        if r.id in home_on_a:
            assert grid.rows()[r.name] == r
    back = broker.connect(person("carol"), "home")
    assert back.status == "ready" and back.reconnect and back.desktop == "home-01"


@pytest.mark.parametrize("reason", [StopReason.UNKNOWN, StopReason.CRASHED])
def test_a_host_lost_whole_comes_back_with_its_stateful_desktop_started_again(
        grid: Grid, reason: StopReason) -> None:
    """Every VM of the host died with it: when it answers again they read off, for an unknown
    reason if it rebooted (the hypervisor lost their status), else crashed. The stateful
    desktop is started again and given back with its files; a free VM that was off on
    purpose is left off."""
    fake_a = grid.host("a")
    grid.pool("lab", spare=1, max_size=2)
    grid.pool("home", spare=0, min_size=1, max_size=1, kind=PoolKind.STATEFUL,
              assignment=Assignment.DEDICATED, on_logout=OnLogout.RECYCLE_AS_IS)
    grid.world.user("carol", entitled_to=("home",))
    broker = Broker(grid.ctx)
    reconciler = grid.reconciler()
    reconciler.run_pass()
    carol = broker.connect(person("carol"), "home")
    assert carol.desktop_id is not None
    GuestAgent(fake_a, carol.desktop_id).write_file("/home/carol/notes", b"kept")
    (spare,) = grid.on("a", pool="lab")

    fake_a.set_reachable(False)
    reconciler.run_pass()
    grid.clock.now += GRACE
    reconciler.run_pass()
    assert grid.host_state("a") == "down"
    for vm_id in (carol.desktop_id, spare.id):
        fake_a.crash_vm(vm_id, reason)
    fake_a.set_reachable(True)

    report = reconciler.run_pass()
    assert grid.host_state("a") == "enabled"
    assert report.counts[Outcome.CRASHED] == 1  # the spare was retired while the host was down
    home = grid.rows()["home-01"]
    assert (home.state, home.user) == ("error", "carol")
    grid.clock.now += timedelta(minutes=1)  # its backoff
    reconciler.run_pass()
    assert spare.id not in grid.vm_ids("a")
    home = grid.rows()["home-01"]
    assert (home.state, home.user) == ("ready", "carol")
    assert fake_a.get_vm(carol.desktop_id).power_state is PowerState.RUNNING
    again = broker.connect(person("carol"), "home")
    assert again.status == "ready" and again.desktop_id == carol.desktop_id
    assert GuestAgent(fake_a, carol.desktop_id).read_file("/home/carol/notes") == b"kept"


def test_a_vm_never_booted_on_a_rebooted_host_is_no_crash(grid: Grid) -> None:
    """Off for an unknown reason alone is no crash: a free desktop the power policy had shut
    off reads so after a host reboot, and is left to its policy."""
    fake_a = grid.host("a")
    grid.pool("lab", spare=1, max_size=1, power_policy=PowerPolicy.SHUTOFF)
    reconciler = grid.reconciler()
    reconciler.run_pass()
    reconciler.run_pass()  # the policy shuts the free desktop off
    (free,) = grid.on("a")
    assert fake_a.get_vm(free.id).power_state is PowerState.SHUTOFF
    fake_a.set_power_state(free.id, PowerState.RUNNING)
    fake_a.crash_vm(free.id, StopReason.UNKNOWN)  # the host rebooted
    report = reconciler.run_pass()
    assert report.counts[Outcome.CRASHED] == 0
    assert grid.rows()[free.name].state == "ready"


def test_a_host_dying_while_a_desktop_is_made_on_it_is_still_marked_down(grid: Grid) -> None:
    fake_a = grid.host("a")
    grid.host("b")
    grid.pool("lab", spare=0, max_size=4)
    grid.world.user("alice", entitled_to=("lab",))
    reconciler = grid.reconciler()
    # No desktop is ready: one is made for alice (a row in provisioning, placed on a).
    pending = Broker(grid.ctx).connect(person("alice"), "lab")
    assert pending.status == "pending"
    (made,) = grid.rows().values()
    assert made.host == "a" and made.state == "provisioning" and made.user == "alice"

    fake_a.set_reachable(False)
    reconciler.run_pass()
    grid.clock.now += GRACE
    report = reconciler.run_pass()
    assert grid.host_state("a") == "down"
    assert grid.rows()[made.name].state in ("retiring", "error")
    assert grid.rows()[made.name].user is None
    # alice's next connect makes her one on b.
    again = Broker(grid.ctx).connect(person("alice"), "lab")
    assert again.status == "pending"
    report = reconciler.run_pass()
    assert report.readied == 1
    ready = Broker(grid.ctx).connect(person("alice"), "lab")
    assert ready.status == "ready" and grid.rows()[ready.desktop or ""].host == "b"
    fake_a.set_reachable(True)
    reconciler.run_pass()
    reconciler.run_pass()
    assert made.name not in grid.rows() and grid.vm_ids("a") == set()


# --- two reconcilers on one database ----------------------------------------------------------
