"""Two real libvirt hosts on this machine: qemu:///system and a second, independent daemon
(``tests/libvirt_hosts.py``). A pool spreads over both; one host is drained while a user is
connected in Chromium (their desktop moves live to the other host, a process in it counting on,
the browser's console reconnecting by itself to the new host, and the pool carries on there);
then
the other host is lost whole (its daemon and every QEMU process of it SIGKILLed, its /run
emptied as by a reboot): its stateless desktops are replaced on the first host, its stateful
desktop is kept and its user told; when the host returns, its domains shut off, the stateful
desktop is started again with the file written before the loss, the replaced desktops'
leftovers are removed and no VM or volume is left that the database does not know. Last, only
its daemon dies and returns at once: its running guest is re-attached and nothing changes."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from deskpool.api.app import create_app
from deskpool.broker.accounts import AccountService
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.config import Settings
from deskpool.domain.errors import Unavailable
from deskpool.domain.models import PowerState, StopReason
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec
from deskpool.domain.states import HAS_VM_STATES
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import owned_volume_names, root_volume_name
from deskpool.images.builder import GuestImage
from deskpool.reconciler.loop import Reconciler
from deskpool.reconciler.report import Outcome
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.events import messages_for, recent_events
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from deskpool.services.views import DesktopView
from tests.browser.conftest import (
    CANVAS_STATS,
    ConsoleProxyThread,
    LiveServer,
    drawn_canvas,
    launch_chromium,
    sign_in,
    skip_or_fail_without_chromium,
    wait_until,
)
from tests.libvirt_hosts import SecondLibvirtHost
from tests.realvm.conftest import delete_every_desktop, remove_pool_of, settle

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.realvm
WORK_FILE = "/root/work.txt"
MOVE_FILE = "/root/before-move.txt"
# A process that counts five times a second, detached from the agent's command.
COUNTER = ("nohup setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/counter; "
           "sleep 0.2; done' >/dev/null 2>&1 &")
# Volumes a desktop owns are named after its id (``owned_volume_names``).
DESKTOP_VOLUME_ENDINGS = {n[36:] for n in owned_volume_names(uuid.UUID(int=0))}
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
            delete_every_desktop(ctx)
            ctx.close()
            remove_pool_of(tmp_path / "pool")


def console_drawn(page: Page) -> bool:
    from playwright.sync_api import Error as PlaywrightError

    canvas = drawn_canvas(page)
    try:
        stats = canvas.evaluate(CANVAS_STATS) if canvas is not None else None
    except PlaywrightError:  # replaced between two calls
        return False
    return stats is not None and bool(stats["colours"] >= 2 and stats["lit"] > 0.0005)


@contextmanager
def console_in_chromium(ctx: ServiceContext, user: str, pool: str) -> Iterator[Page]:
    """``user`` (a local account made here, in group staff) signs in to the portal in
    Chromium and connects to ``pool``: the page, its console drawn, every later change of
    the console's state recorded in ``window.states``."""
    skip_or_fail_without_chromium()
    from playwright.sync_api import expect, sync_playwright

    password = f"{user}-{uuid.uuid4().hex[:8]}"
    AccountService(ctx).create_user(user, password)
    AccountService(ctx).add_to_group(user, "staff")
    with ConsoleProxyThread(ctx) as proxy, LiveServer(
            create_app(ctx, directories=[], console_ws_port=proxy.port)) as server, \
            sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            sign_in(page, server.url, user, password)
            expect(page.locator("#home")).to_have_attribute("data-loaded", "true")
            page.click(f'#pools li[data-pool="{pool}"] button.connect')
            expect(page.locator("#console-status")).to_have_attribute(
                "data-state", "connected", timeout=90_000)
            wait_until(lambda: console_drawn(page), timeout_s=60, what="the console drawn")
            page.evaluate("""() => { const status = document.getElementById('console-status');
                window.states = [];
                new MutationObserver(() => window.states.push(status.dataset.state)).observe(
                    status, { attributes: true }); }""")
            yield page
        finally:
            browser.close()


def counter(agent: GuestAgent, timeout_s: float = 60) -> int:
    """What the guest's counting process wrote last (it starts a moment after its command)."""
    deadline = time.monotonic() + timeout_s
    while True:
        code, out, _ = agent.exec_capture(["cat", "/run/counter"])
        if code == 0 and out.strip():
            return int(out)
        assert time.monotonic() < deadline, "the counting process never wrote"
        time.sleep(1)


def desktops(ctx: ServiceContext, prefix: str) -> list[DesktopView]:
    return [d for d in DesktopService(ctx).list() if d.name.startswith(prefix)]


def host_state(ctx: ServiceContext, name: str) -> str:
    return HostService(ctx).get(name).state


def assert_no_orphans(ctx: ServiceContext) -> None:
    """On each host, every VM of this deployment and every desktop's volume belongs to a
    desktop the database has there, and every desktop that should have a VM has it."""
    rows = DesktopService(ctx).list()
    for host in (LOCAL, SECOND):
        driver = ctx.driver_for_name(host)
        here = {d.id for d in rows if d.host == host}
        vms = {vm.vm_id for vm in driver.list_vms() if vm.metadata is not None
               and vm.metadata.installation_id == ctx.installation_id}
        assert vms <= here, f"{host}: VMs the database does not know: {vms - here}"
        volumes = set(driver.list_volumes())
        owners = {uuid.UUID(v[:36]) for v in volumes if v[36:] in DESKTOP_VOLUME_ENDINGS}
        assert owners <= here, f"{host}: volumes of unknown desktops {owners - here}"
        for d in rows:
            if d.host == host and d.state in HAS_VM_STATES:
                assert d.id in vms and root_volume_name(d.id) in volumes, (host, d)


def move_alice_live(ctx: ServiceContext, reconciler: Reconciler, desktop_id: uuid.UUID,
                    desktop_name: str) -> None:
    """Drain a-local with alice's desktop running there: it moves live to b-second, with her
    file, an 8 MiB blob on its disk and a counting process, not rebooted."""
    local_agent = GuestAgent(ctx.driver_for_name(LOCAL), desktop_id)
    before = f"written on a-local before the move: {uuid.uuid4()}\n".encode()
    local_agent.write_file(MOVE_FILE, before)
    code, _, err = local_agent.exec_capture(["sh", "-c", COUNTER])
    assert code == 0, err
    # 8 MiB on the overlay's disk (not only in the guest's cache): read back after the move
    # from the target's copy with the cache dropped.
    code, blob_sum, err = local_agent.exec_capture(
        ["sh", "-c", "head -c 8M /dev/urandom > /root/blob && sync && sha256sum /root/blob"])
    assert code == 0, err
    boot_id = local_agent.read_file("/proc/sys/kernel/random/boot_id")
    counted = counter(local_agent)
    HostService(ctx).drain(LOCAL, grace=timedelta(minutes=30))
    moving = time.monotonic()
    report = reconciler.run_pass()  # the move runs in this pass's steps
    assert report.counts[Outcome.MIGRATED] == 1, (report.errors, report.notes)
    with ctx.uow(read_only=True) as uow:
        row = uow.desktops.get(desktop_id)
        assert (row.host.name, row.assigned_user, row.notice) == (SECOND, "alice", None)
        assert row.state.value in ("reserved", "in_use")
    moved = DesktopService(ctx).get(desktop_name)
    (event,) = [e for e in recent_events(ctx) if e.kind == "desktop-migrated"]
    print(f"moved in {time.monotonic() - moving:.1f} s: {event.message}", flush=True)
    agent = GuestAgent(ctx.driver_for_name(SECOND), desktop_id)
    assert agent.read_file(MOVE_FILE) == before
    code, after_sum, err = agent.exec_capture(
        ["sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches && sha256sum /root/blob"])
    assert (code, after_sum) == (0, blob_sum), err
    copied = re.search(r"([0-9.]+) MiB of disk", event.message)
    assert copied is not None and float(copied.group(1)) >= 8.0, event.message  # the blob
    assert agent.read_file("/proc/sys/kernel/random/boot_id") == boot_id  # not rebooted
    first = counter(agent)
    time.sleep(2)
    assert counter(agent) > first > counted  # it counted on
    assert agent.host_name() == moved.hostname
    assert desktop_id not in {vm.vm_id for vm in ctx.driver_for_name(LOCAL).list_vms()}


def test_drain_and_host_failure_across_two_real_hosts(
        grid: tuple[ServiceContext, SecondLibvirtHost]) -> None:
    ctx, second = grid
    pools = PoolService(ctx)
    pools.create(PoolSpec("grid", "golden", spare=1, max_size=3, naming_pattern="grid-{n:02}"))
    pools.create(PoolSpec("keep", "golden", kind=PoolKind.STATEFUL,
                          assignment=Assignment.DEDICATED, min_size=1, spare=0, max_size=1,
                          on_logout=OnLogout.RECYCLE_AS_IS, naming_pattern="keep-{n:02}"),
                 hosts=[SECOND])
    for pool in ("grid", "keep"):
        EntitlementService(ctx).grant(pool, "group", "staff")
    # Generous timeouts: a guest boots in about a minute under TCG on a quiet machine, several
    # times that when other tests load it; none of them is a timed assertion.
    reconciler = Reconciler(ctx, workers=3, ready_timeout_s=420,
                            host_down_after=timedelta(seconds=3))
    broker = Broker(ctx, ready_timeout_s=120)

    # 1. The pools fill: grid's first desktop on a-local (tie, by name), keep's on b-second.
    settle(reconciler, lambda: any(d.state == "ready" for d in desktops(ctx, "grid-"))
           and any(d.state == "ready" for d in desktops(ctx, "keep-")), "the pools to fill")
    alice = broker.connect(ALICE, "grid")
    assert alice.status == "ready"
    kept_handover = broker.connect(ALICE, "keep")  # her own stateful desktop on b-second
    assert kept_handover.status == "ready"
    (held,) = [d for d in desktops(ctx, "grid-") if d.name == alice.desktop]
    assert held.host == LOCAL
    settle(reconciler, lambda: any(d.state == "ready" for d in desktops(ctx, "grid-")),
           "a new spare desktop")

    # 2. Drain a-local while alice is connected in Chromium: her desktop moves live to
    #    b-second, with what runs in it (a counter that keeps counting) and her file, and
    #    the browser's console reconnects by itself; no logoff, no notice.
    assert alice.desktop_id is not None
    with console_in_chromium(ctx, "alice", "grid") as page:
        move_alice_live(ctx, reconciler, alice.desktop_id, alice.desktop or "")
        wait_until(lambda: page.evaluate("() => window.states").count("reconnecting") > 0
                   and page.locator("#console-status").get_attribute("data-state")
                   == "connected", timeout_s=120, what="the console reconnecting")
        wait_until(lambda: console_drawn(page), timeout_s=60, what="the moved console drawn")
        assert "disconnected" not in page.evaluate("() => window.states")
        print(f"console states during the move: {page.evaluate('() => window.states')}")
    assert not any(e.kind == "drain-warning" for e in recent_events(ctx))
    bob = broker.connect(BOB, "grid")  # no new session on a draining host: bob goes elsewhere
    assert bob.status == "ready"
    assert DesktopService(ctx).get(bob.desktop or "").host == SECOND
    settle(reconciler, lambda: host_state(ctx, LOCAL) == "maintenance",
           "a-local to reach maintenance")
    # The pool carries on on b-second alone: bob's desktop and a ready spare, none left here.
    live = [d for d in desktops(ctx, "grid-") if d.state not in ("retiring", "retired")]
    assert {d.host for d in live} == {SECOND}
    settle(reconciler, lambda: any(d.state == "ready" and d.host == SECOND
                                   for d in desktops(ctx, "grid-")), "a spare on b-second")
    HostService(ctx).enable(LOCAL)

    # 3. b-second is lost whole: its daemon and every QEMU process of it SIGKILLed, its /run
    #    emptied as by the reboot that brings it back. It goes down after the grace; grid's
    #    desktops there are replaced on a-local; keep's stateful desktop, with a file alice
    #    wrote, stays, and alice is told; nothing is deleted meanwhile.
    (kept,) = desktops(ctx, "keep-")
    on_second = {d.id for d in desktops(ctx, "grid-") if d.host == SECOND}
    assert on_second
    agent = GuestAgent(ctx.driver_for_name(SECOND), kept.id)
    work = f"alice's work, written before the loss: {uuid.uuid4()}\n".encode()
    agent.write_file(WORK_FILE, work)
    code, _, err = agent.exec_capture(["sync"])  # on the disk, not in the guest's cache
    assert code == 0, err
    killed = second.lose_host()
    assert set(killed) >= {kept.name} | {d.name for d in desktops(ctx, "grid-")
                                         if d.id in on_second}
    lost_at = time.monotonic()
    settle(reconciler, lambda: host_state(ctx, SECOND) == "down", "b-second to be down")
    assert any(e.kind == "host-down" for e in recent_events(ctx))
    print(f"b-second lost: marked down in {time.monotonic() - lost_at:.0f} s", flush=True)
    # Replaced on a-local (made there in the pass that marked b-second down), its own
    # desktops out of service.
    assert {d.state for d in desktops(ctx, "grid-") if d.id in on_second} <= {"retiring"}
    assert {d.host for d in desktops(ctx, "grid-") if d.id not in on_second} == {LOCAL}
    assert DesktopService(ctx).get(kept.name).state == kept.state  # untouched
    (told,) = messages_for(ctx, "alice", limit=1)
    assert told.message == (f"your desktop {kept.name} is on host {SECOND}, which is down; "
                            "your files are kept on it, and it comes back when the host does")
    with pytest.raises(Unavailable, match=f"{kept.name} is on host {SECOND}, which is down"):
        broker.connect(ALICE, "keep")
    assert (second.storage_dir / root_volume_name(kept.id)).is_file()  # its disk is there

    # 4. b-second comes back: its persistent domains are defined and shut off, QEMU having
    #    died. The replaced desktops' VMs and disks are removed; the stateful desktop is
    #    started again, reaches ready, is alice's again, and her file is there as written.
    second.start_daemon()
    back_at = time.monotonic()
    driver = ctx.driver_for_name(SECOND)
    assert driver.get_vm(kept.id).power_state is PowerState.SHUTOFF
    assert driver.get_vm(kept.id).stop_reason is StopReason.UNKNOWN  # a rebooted host's
    assert second.qemu_pids() == {}
    settle(reconciler, lambda: host_state(ctx, SECOND) == "enabled"
           and not any(d.id in on_second for d in desktops(ctx, "grid-"))
           and DesktopService(ctx).get(kept.name).state == "ready"
           and any(d.state == "ready" and d.host == LOCAL for d in desktops(ctx, "grid-")),
           "b-second back, its replaced desktops removed, keep's desktop and grid's "
           "replacement ready")
    print(f"b-second back: keep's desktop and grid's replacement ready in "
          f"{time.monotonic() - back_at:.0f} s", flush=True)
    assert any(e.kind == "host-up" for e in recent_events(ctx))
    (crash,) = [e for e in recent_events(ctx) if e.kind == "desktop-crashed"]
    assert crash.desktop == kept.name and f"host {SECOND} restarted while it ran" in crash.message
    assert "your files are kept" in messages_for(ctx, "alice", limit=1)[0].message
    again = broker.connect(ALICE, "keep")
    assert (again.status, again.desktop) == ("ready", kept.name)  # the same desktop, hers
    agent = GuestAgent(ctx.driver_for_name(SECOND), kept.id)
    assert agent.host_name() == kept.hostname
    assert agent.read_file(WORK_FILE) == work
    assert set(second.qemu_pids()) == {kept.name}  # no replaced desktop was booted here
    assert_no_orphans(ctx)

    # 5. Only b-second's daemon dies and returns within the grace (a libvirtd restart): its
    #    running guest is re-attached, not taken for dead; nothing changes.
    pids = second.qemu_pids()
    second.kill_daemon()
    silent_pass = reconciler.run_pass()
    assert any(f"host {SECOND}" in e for e in silent_pass.errors)
    second.start_daemon()
    for _ in range(2):
        assert not reconciler.run_pass().errors
    assert second.qemu_pids() == pids
    assert host_state(ctx, SECOND) == "enabled"
    assert DesktopService(ctx).get(kept.name).state in ("reserved", "in_use")
    # The restarted daemon reconnects the guest agent's channel a moment after the VM: wait.
    agent = GuestAgent(ctx.driver_for_name(SECOND), kept.id)
    agent.wait_until_ready(120, poll_s=1)
    assert agent.read_file(WORK_FILE) == work
    assert_no_orphans(ctx)
