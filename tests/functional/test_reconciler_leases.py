"""Two reconcilers on one database: they share a pool through leases without doing anything
twice, a stale view does not redo finished work, and a dead broker's lease blocks others only
until it expires. (The grid itself is in ``test_host_grid.py``.)"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from deskpool.broker.handover import Broker, Handover
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import PassReport, Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.pools import PoolService
from deskpool.store.models import Desktop, Pool
from tests.functional.test_host_grid import GRACE, Grid, person


def count_creates(fake: FakeDriver, counts: Counter[uuid.UUID], lock: threading.Lock) -> None:
    """Count ``create_vm`` calls per VM id on this fake host."""
    original: Callable[..., Any] = fake.create_vm

    def counted(spec: Any) -> Any:
        with lock:
            counts[spec.vm_id] += 1
        return original(spec)

    fake.create_vm = counted  # type: ignore[method-assign]


def run_together(reconcilers: list[Reconciler]) -> list[PassReport]:
    """One pass of each reconciler, all at once."""
    start = threading.Barrier(len(reconcilers))
    reports: list[PassReport | BaseException] = [RuntimeError("no pass")] * len(reconcilers)

    def run(i: int) -> None:
        start.wait()
        try:
            reports[i] = reconcilers[i].run_pass()
        except BaseException as exc:
            reports[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reconcilers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for r in reports:
        if isinstance(r, BaseException):
            raise r
    return reports  # type: ignore[return-value]


@pytest.fixture()
def second_ctx(grid: Grid) -> Iterator[ServiceContext]:
    """A second broker process's view: its own engine on the same SQLite file."""
    ctx = ServiceContext(grid.ctx.settings)
    yield ctx
    ctx.close()


def test_two_reconcilers_share_a_pool_without_doing_anything_twice(
        grid: Grid, second_ctx: ServiceContext) -> None:
    counts: Counter[uuid.UUID] = Counter()
    lock = threading.Lock()
    for name in ("a", "b"):
        count_creates(grid.host(name), counts, lock)
    grid.pool("lab", spare=12, max_size=12)
    reconcilers = [grid.reconciler(),
                   Reconciler(second_ctx, workers=4, ready_timeout_s=5, clock=grid.clock,
                              host_down_after=GRACE)]
    assert reconcilers[0].owner != reconcilers[1].owner

    created = 0
    for _ in range(3):
        reports = run_together(reconcilers)
        created += sum(r.created for r in reports)
        for r in reports:
            assert r.errors == []
    rows = grid.rows()
    assert created == 12 and len(rows) == 12
    assert {r.state for r in rows.values()} == {"ready"}
    assert set(counts) == {r.id for r in rows.values()}
    assert set(counts.values()) == {1}  # each desktop's VM was made once

    # Shrinking: each spare desktop is retired once, by one of them.
    PoolService(grid.ctx).resize("lab", spare=4)
    retired = 0
    for _ in range(2):
        reports = run_together(reconcilers)
        retired += sum(r.retired for r in reports)
        for r in reports:
            assert r.errors == []
    assert retired == 8
    assert len(grid.rows()) == 4
    assert len(grid.vm_ids("a") | grid.vm_ids("b")) == 4


def test_a_reconciler_acting_on_a_stale_view_does_not_redo_finished_work(
        grid: Grid, second_ctx: ServiceContext) -> None:
    counts: Counter[uuid.UUID] = Counter()
    lock = threading.Lock()
    count_creates(grid.host("a"), counts, lock)
    grid.pool("lab", spare=2)
    first = grid.reconciler()
    second = Reconciler(second_ctx, workers=4, ready_timeout_s=5, clock=grid.clock)
    report = PassReport()
    reachable, _ = first._sync_hosts(report)
    first._plan_pools(report, reachable)
    stale = first._collect_steps(report, reachable)  # provision both desktops...
    assert len(stale) == 2
    second.run_pass()  # ...but the second reconciler gets there first
    assert {r.state for r in grid.rows().values()} == {"ready"}
    for step in stale:
        first.run_step(step, report)
    assert report.errors == []
    assert {r.state for r in grid.rows().values()} == {"ready"}
    assert set(counts.values()) == {1}


def test_a_vm_made_while_another_reconciler_looks_is_not_called_vanished(
        grid: Grid, second_ctx: ServiceContext) -> None:
    fake = grid.host("a")
    grid.pool("lab", spare=2)
    first = grid.reconciler()
    second = Reconciler(second_ctx, workers=4, ready_timeout_s=5, clock=grid.clock)
    list_vms = fake.list_vms
    interleaved: list[PassReport] = []
    armed = [True]

    def list_then_let_the_other_work() -> Any:
        listed = list_vms()
        if armed:  # once: the first reconciler makes the desktops right after this list
            armed.clear()
            interleaved.append(first.run_pass())
        return listed

    fake.list_vms = list_then_let_the_other_work  # type: ignore[method-assign]
    report = second.run_pass()
    assert interleaved[0].readied == 2
    # The second saw rows whose VMs were not in its (older) list: they were made meanwhile.
    assert report.vanished == 0 and report.errors == [] and report.created == 0
    assert {r.state for r in grid.rows().values()} == {"ready"}
    assert len(list_vms()) == 2


def test_leases_make_others_skip_until_they_expire(grid: Grid) -> None:
    counts: Counter[uuid.UUID] = Counter()
    lock = threading.Lock()
    count_creates(grid.host("a"), counts, lock)
    grid.pool("spares", spare=2)
    grid.pool("lazy", spare=0, max_size=4)
    for name in ("alice", "bob"):
        grid.world.user(name, entitled_to=("lazy",))
        assert Broker(grid.ctx).connect(person(name), "lazy").status == "pending"
    made = {r.user: r.id for r in grid.rows().values()}  # rows in provisioning, no VM yet
    # A killed broker left its lease on the pool "spares" and on bob's desktop; a live one
    # works on alice's desktop.
    with grid.ctx.uow() as uow:
        uow.session.execute(update(Pool).where(Pool.name == "spares").values(
            lease_owner="killed:1:dead", lease_until=grid.clock.now + timedelta(seconds=30)))
        uow.session.execute(update(Desktop).where(Desktop.id == made["alice"]).values(
            lease_owner="live:2:busy", lease_until=grid.clock.now + timedelta(hours=1)))
        uow.session.execute(update(Desktop).where(Desktop.id == made["bob"]).values(
            lease_owner="killed:1:dead", lease_until=grid.clock.now + timedelta(seconds=30)))
        uow.commit()
    reconciler = grid.reconciler()
    report = reconciler.run_pass()
    assert report.created == 0 and report.readied == 0 and counts == Counter()
    assert {r.state for r in grid.rows().values()} == {"provisioning"}

    grid.clock.now += timedelta(seconds=31)  # the killed broker's leases ran out
    report = reconciler.run_pass()
    assert report.created == 2 and report.errors == []
    states = {r.name: r.state for r in grid.rows().values()}
    assert states == {"lazy-01": "provisioning", "lazy-02": "ready",
                      "spares-01": "ready", "spares-02": "ready"}
    assert counts[made["bob"]] == 1 and made["alice"] not in counts


def test_a_step_failing_after_its_desktop_went_to_a_user_leaves_it_with_the_user(
        grid: Grid) -> None:
    """A provisioning step made a user's desktop ready, the user took it, then the step
    failed (say, on the database): the desktop is the user's now, not an error."""
    grid.host("a")
    grid.pool("lab", spare=0, max_size=2)
    grid.world.user("alice", entitled_to=("lab",))
    assert Broker(grid.ctx).connect(person("alice"), "lab").status == "pending"
    reconciler = grid.reconciler()
    make_ready: Callable[..., Any] = reconciler.factory.make_ready
    answers: list[Handover] = []

    def ready_then_taken_then_failed(desktop_id: uuid.UUID, **kw: Any) -> None:
        make_ready(desktop_id, **kw)
        answers.append(Broker(grid.ctx).connect(person("alice"), "lab"))
        raise RuntimeError("the database went away")

    reconciler.factory.make_ready = ready_then_taken_then_failed  # type: ignore[method-assign]
    report = reconciler.run_pass()
    assert len(report.errors) == 1 and "the database went away" in report.errors[0]
    assert answers[0].status == "ready"
    (row,) = grid.rows().values()
    assert (row.id, row.state, row.user) == (answers[0].desktop_id, "reserved", "alice")


def test_a_working_broker_keeps_its_lease_past_the_lease_time_by_renewing_it(
        grid: Grid, second_ctx: ServiceContext) -> None:
    """Leases are short (a dead broker's work is taken over soon) and renewed while a step
    runs, so a step longer than the lease is not done a second time by another broker."""
    counts: Counter[uuid.UUID] = Counter()
    lock = threading.Lock()
    count_creates(grid.host("a"), counts, lock)
    grid.pool("lab", spare=1, max_size=1)
    lease = timedelta(seconds=0.3)  # renewed every 0.1 s (real time) while the step runs
    first = grid.reconciler(lease=lease)
    second = Reconciler(second_ctx, workers=4, ready_timeout_s=5, clock=grid.clock,
                        host_down_after=GRACE, lease=lease)
    provision: Callable[..., Any] = first.factory.provision
    working, finish = threading.Event(), threading.Event()

    def slow_provision(desktop_id: uuid.UUID) -> None:
        working.set()
        assert finish.wait(30)
        provision(desktop_id)

    first.factory.provision = slow_provision  # type: ignore[method-assign]
    passes = [threading.Thread(target=first.run_pass)]
    passes[0].start()
    try:
        assert working.wait(30)
        grid.clock.now += timedelta(minutes=10)  # far past the lease as first written...
        time.sleep(0.6)  # ...but the working broker renewed it since
        with grid.ctx.uow(read_only=True) as uow:
            (row,) = uow.pools.desktops(uow.pools.get_by_name("lab").id)
            assert row.lease_owner == first.owner
            assert row.lease_until is not None and row.lease_until > grid.clock.now
        report = second.run_pass()
        assert report.created == 0 and report.readied == 0 and counts == Counter()
    finally:
        finish.set()
        passes[0].join(timeout=60)
    (made,) = grid.rows().values()
    assert made.state == "ready" and counts == Counter({made.id: 1})
    with grid.ctx.uow(read_only=True) as uow:  # given back when the step ended
        assert uow.desktops.get(made.id).lease_owner is None
