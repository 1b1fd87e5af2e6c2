"""A host's connection lost in the middle of a provisioning step (its libvirtd killed and
restarted; tests/realvm/test_libvirtd_kill.py does it for real): the step raises
``HostConnectionLost``, which is not the desktop's failure. The desktop keeps its state, waits a
short fixed delay, and the same row is finished by the next step: no error, no second desktop
beside it, nothing of the interrupted try left on the host."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from deskpool.domain.errors import HostConnectionLost
from deskpool.domain.states import DesktopState
from deskpool.drivers.base import owned_volume_names
from deskpool.reconciler.loop import HOST_RETRY
from tests.functional.test_host_grid import Grid
from tests.functional.test_reconciler_errors import one_pool_desktop, the_desktop

LOST = "the connection to fake://a was lost (libvirtd restarted)"


@pytest.mark.parametrize(("point", "kept"), [
    ("create_vm.root_volume", DesktopState.PROVISIONING),
    ("create_vm.define", DesktopState.PROVISIONING),
    ("start_vm", DesktopState.CUSTOMIZING),
    ("create_snapshot", DesktopState.CUSTOMIZING),
])
def test_a_lost_connection_mid_step_keeps_the_desktop_and_the_next_step_finishes_it(
        grid: Grid, point: str, kept: DesktopState) -> None:
    reconciler = one_pool_desktop(grid)
    fake = grid.fakes["a"]
    fake.fail_next(point, HostConnectionLost(LOST))

    report = reconciler.run_pass()

    desktop = the_desktop(grid)
    assert report.errors == [f"desktop {desktop.id}: {LOST}"] and report.bugs == 0
    assert (desktop.state, desktop.last_error) == (kept, LOST)
    assert desktop.retry_count == 0  # not counted as the desktop's failure
    assert desktop.next_attempt_at == grid.clock.now + HOST_RETRY
    assert reconciler.run_pass().errors == []  # it waits; nothing new is made meanwhile
    assert [d.id for d in grid.on("a")] == [desktop.id]

    grid.clock.now = desktop.next_attempt_at
    reconciler.run_pass()

    finished = the_desktop(grid)
    assert finished.id == desktop.id and finished.state is DesktopState.READY
    assert finished.has_factory_snapshot
    assert [d.id for d in grid.on("a")] == [desktop.id]
    assert grid.vm_ids("a") == {desktop.id}
    desktop_volumes = {v for v in fake.list_volumes() if not v.startswith("tv-")}
    assert desktop_volumes <= set(owned_volume_names(desktop.id))


def test_a_connection_lost_while_waiting_for_the_guest_agent_is_waited_out(
        grid: Grid) -> None:
    """The agent is asked again through the driver's new connection: the desktop is ready in
    the same step, its booted VM kept."""
    reconciler = one_pool_desktop(grid)
    grid.fakes["a"].fail_next("agent_command", HostConnectionLost(LOST))

    report = reconciler.run_pass()

    assert report.errors == [] and the_desktop(grid).state is DesktopState.READY


def test_the_libvirt_driver_opens_its_connection_again_after_it_died(tmp_path: Path) -> None:
    """(On test:///: the connection is closed behind the driver's back, as a daemon's death
    leaves it.) The next call reconnects; a driver its owner closed does not."""
    from deskpool.drivers.libvirt import LibvirtDriver

    driver = LibvirtDriver("test:///default", storage_dir=tmp_path / "pool",
                           pool_name=f"dp-reconnect-{uuid.uuid4().hex[:8]}")
    try:
        before = driver.list_volumes()
        dead = driver._connection
        dead.close()
        assert driver.list_vms() is not None and driver.list_volumes() == before
        assert driver._connection is not dead  # a new one
    finally:
        driver.forget_storage_pool()
        driver.close()
    with pytest.raises(HostConnectionLost, match="was closed"):
        driver.list_vms()
