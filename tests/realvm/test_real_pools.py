"""Pools on qemu:///system with the project's own image: the reconciler fills a pool by itself,
recycling reverts a desktop so the last user's files are gone, a rollout leaves only desktops
of the new version, and instant clones each come up with their own hostname and MAC."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from deskpool.domain.errors import DriverError
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.images.builder import GuestImage
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.instant import InstantCloneService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.services.views import DesktopView
from tests.pool_users import PoolUsers
from tests.realvm.conftest import TEMPLATE

pytestmark = pytest.mark.realvm
READY_TIMEOUT_S = 240  # for a guest agent to answer, in a reconciler build or a hand-over


def reconcile_until(ctx: ServiceContext, done: Callable[[], bool], timeout_s: float = 400) -> None:
    reconciler = Reconciler(ctx, workers=3, ready_timeout_s=READY_TIMEOUT_S)
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the pool did not settle in time"
        report = reconciler.run_pass()
        assert not report.errors, report.errors


def pool_desktops(ctx: ServiceContext, pool: str) -> list[DesktopView]:
    prefix = f"{pool}-"
    return [d for d in DesktopService(ctx).list() if d.name.startswith(prefix)]


def ready_count(ctx: ServiceContext, pool: str, version: int | None = None) -> int:
    return sum(1 for d in pool_desktops(ctx, pool) if d.state == "ready"
               and (version is None or d.version == version))


@pytest.fixture(scope="module")
def lab(real_ctx: ServiceContext) -> Iterator[str]:
    PoolService(real_ctx).create(PoolSpec("lab", TEMPLATE, spare=2, max_size=3,
                                          naming_pattern="lab-{n:02}"))
    PoolUsers(real_ctx, "lab").entitle("alice", "bob")
    yield "lab"
    PoolService(real_ctx).resize("lab", min_size=0, spare=0)
    for desktop in pool_desktops(real_ctx, "lab"):
        DesktopService(real_ctx).delete(str(desktop.id))


def test_spare_two_pool_reaches_two_ready_desktops_by_itself(
    real_ctx: ServiceContext, lab: str
) -> None:
    reconcile_until(real_ctx, lambda: ready_count(real_ctx, lab) >= 2)
    desktops = pool_desktops(real_ctx, lab)
    assert len(desktops) == 2
    driver = real_ctx.driver_for_name("local")
    for desktop in desktops:
        assert GuestAgent(driver, desktop.id).host_name() == desktop.hostname


def test_recycle_with_revert_removes_the_previous_users_files(
    real_ctx: ServiceContext, lab: str
) -> None:
    reconcile_until(real_ctx, lambda: ready_count(real_ctx, lab) >= 2)
    users = PoolUsers(real_ctx, lab, ready_timeout_s=READY_TIMEOUT_S)
    desktop_id = users.connect("alice")
    users.open_console(desktop_id, "alice")
    agent = GuestAgent(real_ctx.driver_for_name("local"), desktop_id)
    code, _, err = agent.exec_capture(["sh", "-c", "echo alice > /root/alice.txt && sync"])
    assert code == 0, err
    assert agent.read_file("/root/alice.txt") == b"alice\n"
    assert users.log_off(desktop_id, "alice") == "recycling"
    reconcile_until(real_ctx, lambda: DesktopService(real_ctx).get(str(desktop_id)).state
                    == "ready")
    with pytest.raises(DriverError):
        agent.read_file("/root/alice.txt")
    assert agent.host_name() == DesktopService(real_ctx).get(str(desktop_id)).hostname


def test_rollout_leaves_only_new_version_desktops_once_users_leave(
    real_ctx: ServiceContext, lab: str, guest_image: GuestImage
) -> None:
    reconcile_until(real_ctx, lambda: ready_count(real_ctx, lab) >= 2)
    users = PoolUsers(real_ctx, lab, ready_timeout_s=READY_TIMEOUT_S)
    held = users.connect("bob")
    new = TemplateService(real_ctx).publish(TEMPLATE, ImageFiles.from_guest_image(guest_image),
                                            notes="rollout test")
    PoolService(real_ctx).rollout(lab, new.number)
    reconcile_until(real_ctx, lambda: ready_count(real_ctx, lab, new.number) >= 2)
    versions = {d.id: d.version for d in pool_desktops(real_ctx, lab)}
    assert versions[held] < new.number  # bob keeps his desktop while he works
    users.log_off(held, "bob")
    reconcile_until(real_ctx, lambda: {d.version for d in pool_desktops(real_ctx, lab)}
                    == {new.number})
    assert ready_count(real_ctx, lab, new.number) == 2


@pytest.fixture(scope="module")
def instant_pool(real_ctx: ServiceContext) -> Iterator[str]:
    InstantCloneService(real_ctx).capture(TEMPLATE, host="local")
    PoolService(real_ctx).create(PoolSpec("fast", TEMPLATE, spare=2, max_size=2,
                                          clone_mode="instant", naming_pattern="fast-{n:02}"))
    yield "fast"
    PoolService(real_ctx).resize("fast", min_size=0, spare=0)
    for desktop in pool_desktops(real_ctx, "fast"):
        DesktopService(real_ctx).delete(str(desktop.id))
    InstantCloneService(real_ctx).forget(TEMPLATE, host="local")


def test_instant_clone_desktops_each_have_their_own_hostname_and_mac(
    real_ctx: ServiceContext, instant_pool: str
) -> None:
    reconcile_until(real_ctx, lambda: ready_count(real_ctx, instant_pool) >= 2)
    driver = real_ctx.driver_for_name("local")
    seen_macs = set()
    for desktop in pool_desktops(real_ctx, instant_pool):
        agent = GuestAgent(driver, desktop.id)
        assert desktop.clone_mode == "instant"
        assert agent.host_name() == desktop.hostname
        assert agent.read_file("/etc/machine-id").decode().strip() == desktop.machine_id
        macs = {mac for name, mac in agent.interfaces().items() if name != "lo"}
        assert desktop.mac in macs
        seen_macs |= macs
        guest_ns = int(driver.agent_command(desktop.id, "guest-get-time"))
        assert abs(guest_ns - time.time_ns()) < 30e9  # the saved clock was set forward
    assert len(seen_macs) == 2
