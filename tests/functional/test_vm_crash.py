"""A desktop's QEMU dies under it (the fake's ``crash_vm``, as libvirt reports a SIGKILLed
QEMU): the desktop is marked with the reason, its user told, a stateless one replaced, and
nothing of a stateful one deleted: it is started again and given back to its user."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deskpool.domain.errors import Unavailable
from deskpool.domain.models import PowerState, StopReason
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import root_volume_name
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.reconciler.report import Outcome
from deskpool.services.context import ServiceContext
from deskpool.services.events import recent_events
from deskpool.services.pools import PoolService
from tests.fake_pool_world import Clock, fake_driver, fake_host_context
from tests.pool_users import PoolUsers

CRASH = "its VM stopped unexpectedly: QEMU ended (crashed)"


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    with fake_host_context(tmp_path, "fake://crash") as context:
        yield context


@pytest.fixture()
def fake(ctx: ServiceContext) -> FakeDriver:
    return fake_driver("fake://crash")


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def reconciler(ctx: ServiceContext, clock: Clock) -> Reconciler:
    return Reconciler(ctx, workers=2, ready_timeout_s=5, clock=clock)


def make_pool(ctx: ServiceContext, name: str, **kw: object) -> PoolUsers:
    fields: dict[str, object] = {"spare": 1, "max_size": 3, **kw}
    PoolService(ctx).create(PoolSpec(name=name, template="golden",  # type: ignore[arg-type]
                                     naming_pattern=f"{name}-{{n:02}}", **fields))
    users = PoolUsers(ctx, name)
    users.entitle("alice", "bob")
    return users


@dataclass(frozen=True)
class Row:
    id: uuid.UUID
    name: str
    state: str
    power_state: str
    last_error: str | None
    assigned_user: str | None


def desktop(ctx: ServiceContext, desktop_id: uuid.UUID) -> Row:
    with ctx.uow(read_only=True) as uow:
        d = uow.desktops.get(desktop_id)
        return Row(d.id, d.name, d.state.value, d.power_state.value, d.last_error,
                   d.assigned_user)


def live(ctx: ServiceContext, pool: str) -> list[Row]:
    with ctx.uow(read_only=True) as uow:
        (pool_id,) = [p.id for p in uow.pools.list() if p.name == pool]
        ids = [d.id for d in uow.desktops.summaries(pool_id=pool_id)
               if d.state.value not in ("retiring", "retired", "error")]
    return [desktop(ctx, d) for d in ids]


def messages_of(ctx: ServiceContext, user: str) -> list[str]:
    return [e.message for e in recent_events(ctx, user=user) if e.kind == "desktop-lost"]


def after_backoff(clock: Clock, ctx: ServiceContext, desktop_id: uuid.UUID) -> None:
    with ctx.uow(read_only=True) as uow:
        wait_until = uow.desktops.get(desktop_id).next_attempt_at
    assert wait_until is not None and wait_until > clock.now
    clock.now = wait_until


def test_a_crashed_stateless_desktop_is_marked_its_user_told_and_replaced(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, clock: Clock
) -> None:
    users = make_pool(ctx, "lab")
    reconciler.run_pass()
    crashed_id = users.connect("alice")
    users.open_console(crashed_id, "alice")
    fake.crash_vm(crashed_id)

    # The broker's timers alone change nothing (the guest does not answer: an error of theirs,
    # no logoff of a session whose desktop is dead).
    users.sessions.run_timers()
    assert desktop(ctx, crashed_id).state == "in_use"

    report = reconciler.run_pass()
    assert report.counts[Outcome.CRASHED] == 1
    failed = desktop(ctx, crashed_id)
    assert (failed.state, failed.last_error, failed.power_state) == ("error", CRASH, "shutoff")
    assert failed.assigned_user is None  # alice may take another desktop at once
    (told,) = messages_of(ctx, "alice")
    assert told.startswith(f"your desktop {failed.name} stopped: {CRASH}")
    assert "gives you a new desktop" in told
    assert report.created == 1  # the pool refills to its size in the same pass

    after_backoff(clock, ctx, crashed_id)
    report = reconciler.run_pass()
    assert report.counts[Outcome.RETIRED] == 1
    assert crashed_id not in {vm.vm_id for vm in fake.list_vms()}  # the broken one is gone
    assert [d.state for d in live(ctx, "lab")] == ["ready"]
    replacement = users.connect("alice")
    assert replacement != crashed_id
    users.sessions.run_timers()  # nothing left of the dead session for the timers to trip on
    assert desktop(ctx, replacement).state == "reserved"


def test_a_crashed_stateful_desktop_keeps_its_disk_and_comes_back_to_its_user(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, clock: Clock
) -> None:
    users = make_pool(ctx, "home", kind=PoolKind.STATEFUL, assignment=Assignment.DEDICATED,
                      on_logout=OnLogout.RECYCLE_AS_IS, max_size=1)
    reconciler.run_pass()
    mine = users.connect("bob")
    users.open_console(mine, "bob")
    GuestAgent(fake, mine).write_file("/home/bob/thesis.txt", b"chapter 1")
    fake.crash_vm(mine)

    report = reconciler.run_pass()
    assert report.counts[Outcome.CRASHED] == 1
    failed = desktop(ctx, mine)
    assert (failed.state, failed.last_error, failed.assigned_user) == ("error", CRASH, "bob")
    assert root_volume_name(mine) in fake.list_volumes()  # nothing deleted
    (told,) = messages_of(ctx, "bob")
    assert "your files are kept" in told and CRASH in told
    with pytest.raises(Unavailable, match="being repaired, with your files kept"):
        users.try_connect("bob")
    assert report.created == 0  # it keeps its seat: no second desktop made beside it

    after_backoff(clock, ctx, mine)
    report = reconciler.run_pass()
    assert report.counts[Outcome.RETIRED] == 0 and report.counts[Outcome.READIED] == 1
    back = desktop(ctx, mine)
    assert (back.state, back.assigned_user, back.power_state) == ("ready", "bob", "running")
    assert users.connect("bob") == mine  # the same desktop, given back
    assert GuestAgent(fake, mine).read_file("/home/bob/thesis.txt") == b"chapter 1"


def test_a_free_ready_desktop_that_crashes_is_replaced_without_telling_anyone(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver
) -> None:
    make_pool(ctx, "lab")
    reconciler.run_pass()
    (free,) = live(ctx, "lab")
    fake.crash_vm(free.id, StopReason.FAILED)
    report = reconciler.run_pass()
    assert report.counts[Outcome.CRASHED] == 1 and report.created == 1
    assert desktop(ctx, free.id).last_error == "its VM stopped unexpectedly: QEMU ended (failed)"
    assert [e for e in recent_events(ctx) if e.kind == "desktop-lost"] == []
    (event,) = [e for e in recent_events(ctx) if e.kind == "desktop-crashed"]
    assert event.severity == "error" and event.desktop == free.name


@pytest.mark.parametrize("force", [False, True])
def test_a_vm_stopped_on_purpose_is_no_crash(
    ctx: ServiceContext, reconciler: Reconciler, fake: FakeDriver, force: bool
) -> None:
    """A guest shut down from inside, or forced off with virsh destroy, is not marked failed:
    the power policy starts a free desktop again, as before."""
    make_pool(ctx, "lab")
    reconciler.run_pass()
    (free,) = live(ctx, "lab")
    fake.stop_vm(free.id, force=force)
    while fake.get_vm(free.id).power_state is not PowerState.SHUTOFF:
        pass  # a graceful stop completes on the next observation
    report = reconciler.run_pass()
    assert report.counts[Outcome.CRASHED] == 0
    assert desktop(ctx, free.id).state == "ready" and desktop(ctx, free.id).last_error is None
    assert fake.get_vm(free.id).power_state is PowerState.RUNNING
