"""A host's slots for heavy work (``services/host_slots.py``) hold across brokers: two
service contexts on one database (SQLite and PostgreSQL) stand for two broker processes."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from deskpool.config import Settings
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.host_slots import SlotKind, host_slot
from deskpool.services.hosts import HostLimits, HostService
from deskpool.store.models import HostSlot
from deskpool.store.slots import release_host_slot, take_host_slot
from tests.functional.test_host_grid import GRACE, Grid
from tests.functional.test_reconciler_leases import run_together


@dataclass
class Brokers:
    a: ServiceContext
    b: ServiceContext
    host_id: uuid.UUID

    def holders(self) -> dict[int, str | None]:
        with self.a.uow(read_only=True) as uow:
            rows = uow.session.execute(
                select(HostSlot.slot, HostSlot.holder).where(HostSlot.host_id == self.host_id))
            return {slot: holder for slot, holder in rows}

    def take(self, holder: str, limit: int, until: datetime, now: datetime) -> int | None:
        with self.b.uow() as uow:
            slot = take_host_slot(uow.session, self.host_id, "provisioning", limit, holder,
                                  until, now)
            uow.commit()
        return slot

    def release(self, slot: int, holder: str) -> None:
        with self.b.uow() as uow:
            release_host_slot(uow.session, self.host_id, "provisioning", slot, holder)
            uow.commit()


@pytest.fixture()
def brokers(database_url: str, tmp_path: Path) -> Iterator[Brokers]:
    forget_fake_hosts()
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url)
    a, b = ServiceContext(settings), ServiceContext(settings)
    HostService(a).add("h1", "fake://slots")
    yield Brokers(a, b, HostService(a).get("h1").id)
    a.close()
    b.close()
    forget_fake_hosts()


def test_two_brokers_never_run_more_than_the_limit_at_once(brokers: Brokers) -> None:
    running, most, done = [0], [0], Counter[str]()
    lock = threading.Lock()

    def work(ctx: ServiceContext, who: str) -> None:
        with host_slot(ctx, brokers.host_id, SlotKind.PROVISIONING, 2, holder=who):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(0.1)
            with lock:
                running[0] -= 1
                done[who] += 1

    threads = [threading.Thread(target=work, args=(ctx, f"{name}-{i}"))
               for i in range(3) for name, ctx in (("a", brokers.a), ("b", brokers.b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(done.values()) == 6
    assert most[0] == 2
    assert brokers.holders() == {0: None, 1: None}  # every slot given back


def test_a_dead_brokers_slot_frees_itself_when_it_expires(brokers: Brokers) -> None:
    now = datetime.now(UTC)
    assert brokers.take("dead", 1, until=now + timedelta(seconds=1), now=now) == 0
    assert brokers.take("alive", 1, until=now + timedelta(seconds=60), now=now) is None

    later = now + timedelta(seconds=2)  # the dead broker renewed nothing
    with host_slot(brokers.a, brokers.host_id, SlotKind.PROVISIONING, 1, holder="alive",
                   clock=lambda: later) as slot:
        assert slot == 0
        assert brokers.holders() == {0: "alive"}
    brokers.release(0, "dead")  # a late give-back by the dead one takes nothing from others
    assert brokers.holders() == {0: None}


def test_a_held_slot_is_renewed_while_its_work_runs(brokers: Brokers) -> None:
    hold_for = timedelta(seconds=0.3)
    with host_slot(brokers.a, brokers.host_id, SlotKind.PROVISIONING, 1, holder="busy",
                   hold_for=hold_for):
        for _ in range(4):  # 0.8 s in all, well past one hold_for
            time.sleep(0.2)
            now = datetime.now(UTC)
            assert brokers.take("other", 1, until=now + hold_for, now=now) is None
    now = datetime.now(UTC)
    assert brokers.take("other", 1, until=now + hold_for, now=now) == 0


def test_a_lowered_limit_applies_to_new_work(brokers: Brokers) -> None:
    now, until = datetime.now(UTC), datetime.now(UTC) + timedelta(minutes=1)
    assert [brokers.take("x", 3, until, now) for _ in range(3)] == [0, 1, 2]
    assert brokers.take("y", 2, until, now) is None
    brokers.release(2, "x")  # outside the new limit: frees nothing for it
    assert brokers.take("y", 2, until, now) is None
    brokers.release(0, "x")
    assert brokers.take("y", 2, until, now) == 0


def test_a_hosts_provisioning_limit_holds_across_two_reconcilers(
        grid: Grid, tmp_path: Path) -> None:
    fake = grid.host("a", limits=HostLimits(max_provisioning=1))
    running, most = [0], [0]
    lock = threading.Lock()
    original: Callable[..., Any] = fake.create_vm

    def slow_create(spec: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return original(spec)

    fake.create_vm = slow_create  # type: ignore[method-assign]
    grid.pool("lab", spare=4, max_size=4)
    second = ServiceContext(grid.ctx.settings)
    try:
        reconcilers = [grid.reconciler(),
                       Reconciler(second, workers=4, ready_timeout_s=5, clock=grid.clock,
                                  host_down_after=GRACE)]
        for _ in range(3):
            for report in run_together(reconcilers):
                assert report.errors == []
    finally:
        second.close()
    assert {r.state for r in grid.rows().values()} == {"ready"}
    assert len(grid.rows()) == 4
    assert most[0] == 1


def test_a_reconcilers_slots_expire_no_later_than_its_leases(grid: Grid) -> None:
    """Brokers with short leases (quick take-over of a dead one's work) hold slots as briefly:
    else the survivors would take over the dead broker's desktops, then wait out its slots."""
    fake = grid.host("a", limits=HostLimits(max_provisioning=1))
    held_for: list[timedelta] = []
    original: Callable[..., Any] = fake.create_vm

    def create_and_look(spec: Any) -> Any:
        with grid.ctx.uow(read_only=True) as uow:
            until = uow.session.scalars(select(HostSlot.held_until).where(
                HostSlot.holder.is_not(None))).one()
        held_for.append(until.replace(tzinfo=UTC) - grid.clock.now)
        return original(spec)

    fake.create_vm = create_and_look  # type: ignore[method-assign]
    grid.pool("lab", spare=1, max_size=1)
    assert grid.reconciler(lease=timedelta(seconds=5)).run_pass().errors == []
    assert held_for == [timedelta(seconds=5)]
