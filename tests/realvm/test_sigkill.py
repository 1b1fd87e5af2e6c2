"""SIGKILL the broker's reconciler process at random moments while it provisions and recycles,
restart it, and check nothing was lost.

The hypervisor must outlive the killed process, so this runs on qemu:///system (libvirtd
keeps the VMs). The template is an empty disk with no OS and customization "none" (ready means
running), so many kill-and-restart rounds fit in a short test; the in-process crash test in
tests/functional does the same on the fake driver and libvirt's test:///.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deskpool.config import Settings
from deskpool.domain.errors import PoolExhausted, Unavailable
from deskpool.domain.models import Customization
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.libvirt import LibvirtDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.conftest import qemu_system_unreachable_reason, skip_or_fail_without_real_vms
from tests.crash_invariants import check_invariants
from tests.pool_users import PoolUsers
from tests.realvm.conftest import remove_pool_of

pytestmark = pytest.mark.realvm
SPARE, MAX, ROUNDS = 2, 4, 8
DESKPOOL = Path(sys.executable).parent / "deskpool"


@pytest.fixture()
def deployment(tmp_path: Path) -> Iterator[tuple[Settings, LibvirtDriver]]:
    reason = qemu_system_unreachable_reason()
    if reason:
        skip_or_fail_without_real_vms(reason)
    settings = Settings(data_dir=tmp_path / "data")
    ctx = ServiceContext(settings)
    HostService(ctx).add("local", "qemu:///system", storage_dir=tmp_path / "pool")
    disk = tmp_path / "empty.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    TemplateService(ctx).publish("blank", ImageFiles(disk=disk), memory_mib=128,
                                 customization=Customization.NONE)
    PoolService(ctx).create(PoolSpec("kill", "blank", spare=SPARE, max_size=MAX,
                                     naming_pattern="kill-{n:02}"))
    PoolUsers(ctx, "kill").entitle("ann", "bob")
    driver = LibvirtDriver("qemu:///system", storage_dir=tmp_path / "pool")
    installation = ctx.installation_id
    ctx.close()
    try:
        yield settings, driver
    finally:
        for vm in driver.list_vms():
            if vm.metadata is not None and vm.metadata.installation_id == installation:
                driver.delete_vm(vm.vm_id)
        driver.close()
        remove_pool_of(tmp_path / "pool")


def _start_broker(settings: Settings) -> subprocess.Popen[bytes]:
    # Short leases: a killed broker's claims on work run out between two rounds, so the next
    # broker takes over what it left half done (leases are renewed while work runs).
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(settings.data_dir), "DESKPOOL_LEASE_S": "3"}
    return subprocess.Popen([str(DESKPOOL), "reconcile", "--loop", "--interval", "0.2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_at_random_points_then_restart_loses_nothing(
    deployment: tuple[Settings, LibvirtDriver]
) -> None:
    settings, driver = deployment
    rng = random.Random(1123)
    users: dict[str, uuid.UUID] = {}
    waiting: set[str] = set()  # told a desktop is being prepared for them
    served = logged_off = 0
    for _ in range(ROUNDS):
        ctx = ServiceContext(settings)
        pool_users = PoolUsers(ctx, "kill", ready_timeout_s=60)
        for name in ("ann", "bob"):  # logons and logoffs so recycling happens too
            if name in users and rng.random() < 0.6:
                pool_users.log_off(users.pop(name), name)
                logged_off += 1
            elif name not in users:
                # The pool is exhausted right now, or its desktops are still coming up.
                with contextlib.suppress(PoolExhausted, Unavailable):
                    handover = pool_users.try_connect(name)
                    if handover.status == "ready":
                        assert handover.desktop_id is not None
                        users[name] = handover.desktop_id
                        waiting.discard(name)
                        served += 1
                    else:  # a desktop is being made (or prepared) for them
                        waiting.add(name)
        ctx.close()
        broker = _start_broker(settings)
        # Long enough for a started process to get through start-up into real work (about a
        # second), short enough to catch it mid-step.
        time.sleep(rng.uniform(1.0, 8.0))
        broker.send_signal(signal.SIGKILL)
        broker.wait(timeout=10)
        assert broker.returncode == -signal.SIGKILL
    # Between the kills the broker did real work: users got desktops and gave them back.
    assert served >= 1 and logged_off >= 1, (served, logged_off)
    # The restart: one process, passes until the pool has settled (backoffs expired).
    ctx = ServiceContext(settings)
    clock = [datetime.now(UTC)]

    def later() -> datetime:
        clock[0] += timedelta(hours=1)
        return clock[0]

    def settle() -> None:
        quiet = 0
        for _ in range(12):  # until two passes in a row find nothing left to do
            report = Reconciler(ctx, workers=2, ready_timeout_s=60, clock=later).run_pass()
            busy = (report.created + report.readied + report.recycled + report.retired
                    + report.deleted + report.power_changes + report.vanished
                    + report.orphans_removed + len(report.errors))
            quiet = 0 if busy else quiet + 1
            if quiet == 2:
                return

    settle()
    # Users told to come back once their desktop was made come back for it; the pool then
    # makes up the spare desktops they took.
    pool_users = PoolUsers(ctx, "kill", ready_timeout_s=60)
    for name in sorted(waiting):
        users[name] = pool_users.connect(name)
    settle()
    ctx.close()
    check_invariants(settings, driver, users, pool="kill", spare=SPARE, max_size=MAX)
