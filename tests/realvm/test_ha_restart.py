"""HA restart on two real libvirt hosts sharing one storage directory (issue 17, item 4):
qemu:///system and a second, independent daemon (``tests/libvirt_hosts.py``), both with their
deskpool storage pool on the same directory, as two hypervisors mounting one NFS export.

A user's stateful desktop runs on the second host with a file she wrote. First only the second
daemon dies, its QEMU running on: the host goes down, but the desktop's disk is still locked by
that QEMU, so the restart on the first host is refused by the lock itself (a real QEMU start
that fails) and nothing runs twice; the admin and the user are told why. Then the host is lost
whole (every QEMU of it killed): the desktop comes back on the first host with her file, is
hers again, and when the second daemon returns, its stale definition is forgotten there while
the disk stays in use on the first host."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.config import Settings
from deskpool.domain.errors import NotFound, VmNotFound
from deskpool.domain.models import PowerState
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import root_volume_name
from deskpool.images.builder import GuestImage
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.events import messages_for, recent_events
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.libvirt_hosts import SecondLibvirtHost
from tests.realvm.conftest import delete_every_desktop, remove_pool_of, settle

pytestmark = pytest.mark.realvm
LOCAL, SECOND, STORAGE = "a-local", "b-second", "nas"
WORK_FILE = "/root/ha-work.txt"
CAROL = Identity("carol", "Carol", "local", frozenset({"staff"}))


@pytest.fixture()
def shared(guest_image: GuestImage, tmp_path: Path) -> Iterator[tuple[ServiceContext,
                                                                     SecondLibvirtHost]]:
    with SecondLibvirtHost() as second:
        # Retried every 5 s once refused, so the test sees the restart soon after the loss.
        ctx = ServiceContext(Settings(data_dir=tmp_path / "data", ha_retry_s=5))
        try:
            HostService(ctx).add(SECOND, second.uri, storage_dir=second.storage_dir,
                                 shared_storage=STORAGE)
            TemplateService(ctx).publish("golden", ImageFiles.from_guest_image(guest_image),
                                         recipe_hash=guest_image.recipe_hash, arch="x86_64")
            yield ctx, second
        finally:
            delete_every_desktop(ctx)
            ctx.close()
            remove_pool_of(second.storage_dir)  # the system daemon's pool on that directory


def desktop_of(ctx: ServiceContext, name: str) -> tuple[str, str]:
    try:
        d = DesktopService(ctx).get(name)
    except NotFound:  # not made yet
        return "", ""
    return d.host, d.state


def test_a_lost_hosts_stateful_desktop_restarts_on_the_host_sharing_its_storage(
        shared: tuple[ServiceContext, SecondLibvirtHost]) -> None:
    ctx, second = shared
    PoolService(ctx).create(PoolSpec("ha", "golden", kind=PoolKind.STATEFUL,
                                     assignment=Assignment.DEDICATED, min_size=1, spare=0,
                                     max_size=1, on_logout=OnLogout.RECYCLE_AS_IS,
                                     naming_pattern="ha-{n:02}"))
    EntitlementService(ctx).grant("ha", "group", "staff")
    reconciler = Reconciler(ctx, workers=2, ready_timeout_s=420,
                            host_down_after=timedelta(seconds=3))
    broker = Broker(ctx, ready_timeout_s=120)

    # 1. The desktop is made on b-second (the only host yet); then a-local joins, its
    #    storage pool on the same directory.
    settle(reconciler, lambda: desktop_of(ctx, "ha-01")[1] == "ready", "ha-01 to be ready")
    HostService(ctx).add(LOCAL, "qemu:///system", storage_dir=second.storage_dir,
                         shared_storage=STORAGE)
    carol = broker.connect(CAROL, "ha")
    assert (carol.status, carol.desktop) == ("ready", "ha-01") and carol.desktop_id
    vm_id = carol.desktop_id
    hostname = DesktopService(ctx).get("ha-01").hostname
    agent = GuestAgent(ctx.driver_for_name(SECOND), vm_id)
    work = f"carol's work, written before the loss: {uuid.uuid4()}\n".encode()
    agent.write_file(WORK_FILE, work)
    code, _, err = agent.exec_capture(["sync"])  # on the disk, not in the guest's cache
    assert code == 0, err
    local = ctx.driver_for_name(LOCAL)

    # 2. Only b-second's daemon dies: its QEMU runs on, holding the disk. The host goes
    #    down; the restart on a-local is tried, and QEMU's image lock refuses it.
    (qemu_pid,) = second.qemu_pids().values()
    second.kill_daemon()
    settle(reconciler, lambda: any(e.kind == "desktop-ha-refused" for e in recent_events(ctx)),
           "the HA restart to be refused", timeout_s=120)
    (refused,) = [e for e in recent_events(ctx) if e.kind == "desktop-ha-refused"]
    print(f"refused: {refused.message}", flush=True)
    assert "its disk is still locked by a QEMU process" in refused.message
    assert desktop_of(ctx, "ha-01")[0] == SECOND
    with pytest.raises(VmNotFound):
        local.get_vm(vm_id)  # nothing left defined on a-local
    assert second.qemu_pids() == {"ha-01": qemu_pid}  # the one copy, still running
    told = [m.message for m in messages_for(ctx, "carol", limit=5)]
    assert any("it may still be running there, so it is not started on another host" in m
               for m in told)
    for _ in range(3):  # retried every 5 s; refused each time, never running twice
        reconciler.run_pass()
        time.sleep(2)
    assert desktop_of(ctx, "ha-01")[0] == SECOND and second.qemu_pids() == {"ha-01": qemu_pid}

    # 3. The host is lost whole: its QEMU killed too. The lock goes with it; the desktop
    #    starts on a-local over the same disk, reaches ready and is carol's, with her file.
    second.lose_host()
    lost_at = time.monotonic()
    settle(reconciler, lambda: desktop_of(ctx, "ha-01") == (LOCAL, "ready"),
           "ha-01 restarted on a-local and ready")
    print(f"ha-01 back on {LOCAL} in {time.monotonic() - lost_at:.0f} s", flush=True)
    assert any(e.kind == "desktop-ha-restarted" for e in recent_events(ctx))
    again = broker.connect(CAROL, "ha")
    assert (again.status, again.desktop_id) == ("ready", vm_id)
    agent = GuestAgent(local, vm_id)
    assert agent.host_name() == hostname
    assert agent.read_file(WORK_FILE) == work

    # 4. b-second returns: its stale definition of ha-01 (off) is forgotten there; the disk
    #    stays, in use on a-local.
    second.start_daemon()
    settle(reconciler, lambda: HostService(ctx).get(SECOND).state == "enabled"
           and any(e.kind == "desktop-ha-forgotten" for e in recent_events(ctx)),
           "b-second back and its stale definition forgotten", timeout_s=180)
    with pytest.raises(VmNotFound):
        ctx.driver_for_name(SECOND).get_vm(vm_id)
    assert (second.storage_dir / root_volume_name(vm_id)).is_file()
    assert local.get_vm(vm_id).power_state is PowerState.RUNNING
    assert second.qemu_pids() == {}
    assert GuestAgent(local, vm_id).read_file(WORK_FILE) == work
