"""Two real libvirt hosts on this machine: qemu:///system and a second, independent daemon
(``tests/libvirt_hosts.py``). A pool spreads over both; one host is drained while a user is
connected (warned, logged off at the deadline, the pool carries on on the other host); then
the other host's daemon is killed: its stateless desktops are replaced on the first host, its
stateful desktop is kept, and when the daemon returns nothing was deleted that should not
have been."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.config import Settings
from deskpool.domain.errors import Unavailable
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.images.builder import GuestImage
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.events import recent_events
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.services.views import DesktopView
from deskpool.store.models import utcnow
from tests.libvirt_hosts import SecondLibvirtHost
from tests.realvm.conftest import remove_pool_of

pytestmark = pytest.mark.realvm
LOCAL, SECOND = "a-local", "b-second"  # ties in placement go by name: a-local first
ALICE = Identity("alice", "Alice", "local", frozenset({"staff"}))
BOB = Identity("bob", "Bob", "local", frozenset({"staff"}))


@pytest.fixture()
def grid(guest_image: GuestImage, tmp_path: Path) -> Iterator[tuple[ServiceContext,
                                                                   SecondLibvirtHost]]:
    with SecondLibvirtHost() as second:
        ctx = ServiceContext(Settings(data_dir=tmp_path / "data"))
        try:
            hosts = HostService(ctx)
            hosts.add(LOCAL, "qemu:///system", storage_dir=tmp_path / "pool")
            hosts.add(SECOND, second.uri, storage_dir=second.storage_dir)
            TemplateService(ctx).publish("golden", ImageFiles.from_guest_image(guest_image),
                                         recipe_hash=guest_image.recipe_hash, arch="x86_64")
            yield ctx, second
        finally:
            for desktop in DesktopService(ctx).list():
                try:
                    DesktopService(ctx).delete(desktop.name)
                except Exception as exc:  # the host may be gone; its daemon is cleaned up
                    print(f"cleanup of {desktop.name}: {exc}")
            ctx.close()
            remove_pool_of(tmp_path / "pool")


def settle(reconciler: Reconciler, done: Callable[[], bool], what: str,
           timeout_s: float = 420) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        reconciler.run_pass()
        time.sleep(0.5)


def desktops(ctx: ServiceContext, prefix: str) -> list[DesktopView]:
    return [d for d in DesktopService(ctx).list() if d.name.startswith(prefix)]


def host_state(ctx: ServiceContext, name: str) -> str:
    return HostService(ctx).get(name).state


def test_drain_and_host_failure_across_two_real_hosts(
        grid: tuple[ServiceContext, SecondLibvirtHost]) -> None:
    ctx, second = grid
    pools = PoolService(ctx)
    pools.create(PoolSpec("lab", "golden", spare=1, max_size=3, naming_pattern="lab-{n:02}"))
    pools.create(PoolSpec("keep", "golden", kind=PoolKind.STATEFUL,
                          assignment=Assignment.DEDICATED, min_size=1, spare=0, max_size=1,
                          on_logout=OnLogout.RECYCLE_AS_IS, naming_pattern="keep-{n:02}"),
                 hosts=[SECOND])
    for pool in ("lab", "keep"):
        EntitlementService(ctx).grant(pool, "group", "staff")
    reconciler = Reconciler(ctx, workers=3, ready_timeout_s=240,
                            host_down_after=timedelta(seconds=3))
    broker, sessions = Broker(ctx, ready_timeout_s=120), SessionService(ctx)

    # 1. The pools fill: lab's first desktop on a-local (tie, by name), keep's on b-second.
    settle(reconciler, lambda: any(d.state == "ready" for d in desktops(ctx, "lab-"))
           and any(d.state == "ready" for d in desktops(ctx, "keep-")), "the pools to fill")
    alice = broker.connect(ALICE, "lab")
    assert alice.status == "ready"
    kept_handover = broker.connect(ALICE, "keep")  # her own stateful desktop on b-second
    assert kept_handover.status == "ready"
    (held,) = [d for d in desktops(ctx, "lab-") if d.name == alice.desktop]
    assert held.host == LOCAL
    settle(reconciler, lambda: any(d.state == "ready" for d in desktops(ctx, "lab-")),
           "a new spare desktop")

    # 2. Drain a-local while alice is connected: warned now, logged off at the deadline.
    HostService(ctx).drain(LOCAL, grace=timedelta(seconds=20))
    reconciler.run_pass()
    with ctx.uow(read_only=True) as uow:
        assert "logged off" in (uow.desktops.get(alice.desktop_id).notice or "")
    assert any(e.kind == "drain-warning" and e.user == "alice" for e in recent_events(ctx))
    bob = broker.connect(BOB, "lab")  # no new session on a draining host: bob goes elsewhere
    assert bob.status == "ready"
    assert DesktopService(ctx).get(bob.desktop or "").host == SECOND
    report = sessions.run_timers(utcnow() + timedelta(seconds=21), poll_guests=False)
    assert alice.desktop in report.logged_off
    settle(reconciler, lambda: host_state(ctx, LOCAL) == "maintenance",
           "a-local to reach maintenance")
    # The pool carries on on b-second alone: bob's desktop and a ready spare, none left here.
    live = [d for d in desktops(ctx, "lab-") if d.state not in ("retiring", "retired")]
    assert {d.host for d in live} == {SECOND}
    settle(reconciler, lambda: any(d.state == "ready" and d.host == SECOND
                                   for d in desktops(ctx, "lab-")), "a spare on b-second")
    HostService(ctx).enable(LOCAL)

    # 3. Kill b-second's daemon: it goes down after the grace; lab's desktops there are
    #    replaced on a-local; keep's stateful desktop stays; nothing is deleted meanwhile.
    (kept,) = desktops(ctx, "keep-")
    on_second = {d.id for d in desktops(ctx, "lab-") if d.host == SECOND}
    assert on_second
    pids_before = second.qemu_pids()
    second.kill_daemon()
    settle(reconciler, lambda: host_state(ctx, SECOND) == "down", "b-second to be down")
    assert any(e.kind == "host-down" for e in recent_events(ctx))
    settle(reconciler, lambda: any(d.state == "ready" and d.host == LOCAL
                                   for d in desktops(ctx, "lab-")),
           "lab to be refilled on a-local")
    assert {d.state for d in desktops(ctx, "lab-") if d.id in on_second} <= {"retiring"}
    assert DesktopService(ctx).get(kept.name).state == kept.state  # untouched
    with pytest.raises(Unavailable, match=f"{kept.name} is on host {SECOND}, which is down"):
        broker.connect(ALICE, "keep")
    assert second.qemu_pids() == pids_before  # not one VM of b-second was touched

    # 4. The daemon returns: b-second is back, the replaced desktops' VMs are removed, the
    #    stateful desktop is still there and its guest answers.
    second.start_daemon()
    settle(reconciler, lambda: host_state(ctx, SECOND) == "enabled"
           and not any(d.id in on_second for d in desktops(ctx, "lab-")),
           "b-second back and its replaced desktops removed", timeout_s=180)
    assert DesktopService(ctx).get(kept.name).state == kept.state
    driver = ctx.driver_for_name(SECOND)
    assert GuestAgent(driver, kept.id).host_name() == kept.hostname
    assert any(e.kind == "host-up" for e in recent_events(ctx))

