"""HA restart on the fake driver (issue 17, item 4): hosts on one shared storage; a host lost
whole has its stateful desktop started again on another with the user's files, after the
fence (the disk's lock) says its old QEMU is gone; a host whose daemon died while its QEMU may
run is not restarted elsewhere, and the admin and the user are told why; the old host's stale
definition is forgotten when it returns, the disk kept."""

from __future__ import annotations

from datetime import timedelta

import pytest

from deskpool.broker.handover import Broker
from deskpool.domain.errors import Conflict, InvalidInput
from deskpool.domain.models import PowerState
from deskpool.domain.pools import Assignment, OnLogout, PoolKind
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import root_volume_name
from deskpool.drivers.fake import FakeDriver
from deskpool.reconciler.loop import Reconciler
from deskpool.reconciler.report import Outcome
from deskpool.services.events import messages_for
from deskpool.services.hosts import HostService
from deskpool.services.migration import MigrationService
from tests.functional.test_host_grid import GRACE, Grid, person

NOTES = "/home/carol/notes"


def shared_grid(grid: Grid, *names: str, storage: str = "nas") -> list[FakeDriver]:
    fakes = []
    for name in names:
        fakes.append(grid.host(name, shared_storage=storage))
        HostService(grid.ctx).set_shared_storage(name, storage)
    return fakes


def carols_desktop(grid: Grid) -> tuple[Reconciler, Broker, str]:
    """carol's stateful desktop, ready and hers, with a file in it; on host a (ties go by
    name)."""
    grid.pool("home", spare=0, min_size=1, max_size=1, kind=PoolKind.STATEFUL,
              assignment=Assignment.DEDICATED, on_logout=OnLogout.RECYCLE_AS_IS)
    grid.world.user("carol", entitled_to=("home",))
    reconciler, broker = grid.reconciler(), Broker(grid.ctx)
    reconciler.run_pass()
    carol = broker.connect(person("carol"), "home")
    assert carol.status == "ready" and carol.desktop_id is not None
    assert grid.rows()["home-01"].host == "a"
    GuestAgent(grid.fakes["a"], carol.desktop_id).write_file(NOTES, b"carol's work")
    return reconciler, broker, "home-01"


def mark_down(grid: Grid, reconciler: Reconciler) -> None:
    reconciler.run_pass()
    grid.clock.now += GRACE
    reconciler.run_pass()
    assert grid.host_state("a") == "down"


def settle_ready(grid: Grid, reconciler: Reconciler, name: str) -> None:
    for _ in range(6):
        if grid.rows()[name].state == "ready":
            return
        grid.clock.now += timedelta(minutes=1)  # the crash path's backoff
        reconciler.run_pass()
    raise AssertionError(f"{name} is {grid.rows()[name].state}, not ready")


def test_a_lost_hosts_stateful_desktop_restarts_on_a_host_sharing_its_storage(
        grid: Grid) -> None:
    fake_a, fake_b = shared_grid(grid, "a", "b")
    reconciler, broker, name = carols_desktop(grid)
    desktop = grid.rows()[name]

    fake_a.lose_power()  # the host and every QEMU of it gone: the disk's lock with them
    mark_down(grid, reconciler)
    # Restarted on b in the pass that marked a down, its row moved with it.
    assert grid.rows()[name].host == "b"
    assert fake_b.get_vm(desktop.id).power_state is PowerState.RUNNING
    (restarted,) = grid.events("desktop-ha-restarted")
    assert restarted.message == (f"{name}: its host a was lost; it was restarted on host b "
                                 "from the shared storage")
    told = [m.message for m in messages_for(grid.ctx, "carol", limit=5)]
    assert any("your files are kept; it is being started again" in m for m in told)
    assert any(m.endswith("it is being started again on another host") for m in told)

    settle_ready(grid, reconciler, name)
    again = broker.connect(person("carol"), "home")
    assert (again.status, again.desktop_id) == ("ready", desktop.id)
    assert GuestAgent(fake_b, desktop.id).read_file(NOTES) == b"carol's work"

    # a returns: its stale definition of the desktop goes, the disk (b's now) stays.
    fake_a.set_reachable(True)
    report = reconciler.run_pass()
    assert report.counts[Outcome.HA_FORGOTTEN] == 1
    assert desktop.id not in grid.vm_ids("a")
    assert fake_b.volume_info(root_volume_name(desktop.id)).name == root_volume_name(desktop.id)
    assert fake_b.get_vm(desktop.id).power_state is PowerState.RUNNING
    assert grid.rows()[name].host == "b" and grid.host_state("a") == "enabled"
    reconciler.run_pass()
    assert len(grid.events("desktop-ha-forgotten")) == 1


def test_a_desktop_whose_qemu_may_still_run_is_not_restarted_until_its_disk_is_free(
        grid: Grid) -> None:
    fake_a, fake_b = shared_grid(grid, "a", "b")
    reconciler, _, name = carols_desktop(grid)
    desktop = grid.rows()[name]

    fake_a.set_reachable(False)  # its libvirtd is dead; its QEMU runs on, holding the disk
    mark_down(grid, reconciler)
    assert grid.rows()[name].host == "a" and grid.rows()[name].state == desktop.state
    assert desktop.id not in grid.vm_ids("b")
    (refused,) = grid.events("desktop-ha-refused")
    assert refused.severity == "error"
    assert "its disk is still locked by a QEMU process" in refused.message
    assert "starting it on another host could run it twice" in refused.message
    (told,) = [m.message for m in messages_for(grid.ctx, "carol", limit=5)
               if "does not answer" in m.message]
    assert told == (f"your desktop {name} is on host a, which does not answer; it may still be "
                    "running there, so it is not started on another host until that is sure. "
                    "Your files are kept")

    reconciler.run_pass()  # within the retry interval: not tried again, not told again
    assert len(grid.events("desktop-ha-refused")) == 1 and desktop.id not in grid.vm_ids("b")

    fake_a.lose_power()  # now the old QEMU is gone (the admin powered the host off)
    grid.clock.now += timedelta(seconds=61)
    reconciler.run_pass()
    assert grid.rows()[name].host == "b"
    assert fake_b.get_vm(desktop.id).power_state is PowerState.RUNNING
    settle_ready(grid, reconciler, name)
    assert GuestAgent(fake_b, desktop.id).read_file(NOTES) == b"carol's work"


def test_without_another_host_on_its_storage_nothing_is_restarted_and_the_admin_is_told(
        grid: Grid) -> None:
    (fake_a,) = shared_grid(grid, "a")
    grid.host("b")  # storage of its own
    reconciler, _, name = carols_desktop(grid)
    fake_a.lose_power()
    mark_down(grid, reconciler)
    assert grid.rows()[name].host == "a"
    (refused,) = grid.events("desktop-ha-refused")
    assert refused.message.endswith("no other host of shared storage nas answers and takes "
                                    "desktops")


def test_hosts_on_one_storage_are_no_live_move_targets_and_bad_names_are_refused(
        grid: Grid) -> None:
    shared_grid(grid, "a", "b")
    reconciler, _, name = carols_desktop(grid)
    with pytest.raises(Conflict, match="both hosts are on shared storage nas, and a live move "
                       "between them is not supported yet"):
        MigrationService(grid.ctx, grid.clock).migrate(name, target="b", reason="test")
    with pytest.raises(Conflict, match="nowhere to go"):
        MigrationService(grid.ctx, grid.clock).migrate(name, reason="test")
    with pytest.raises(InvalidInput, match="shared storage name 'NAS/1' must be"):
        HostService(grid.ctx).set_shared_storage("a", "NAS/1")
    assert HostService(grid.ctx).set_shared_storage("a", None).shared_storage is None
    reconciler.run_pass()
    assert grid.rows()[name].host == "a"
