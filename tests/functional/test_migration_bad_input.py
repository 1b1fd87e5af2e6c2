"""Live migration when things go wrong part way (issue 17), on two fake hosts: the target
runs out of memory mid-move (the desktop runs on where it was, once), the connection to
the source is lost mid-move (the reconciler finds the one running copy and records it), and
a second drain of a host whose desktop is moving (a clear answer, no second move). Refusals
before a move starts (an incompatible or full target) are in test_live_migration.py."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deskpool.cli import common
from deskpool.cli.main import app
from deskpool.domain.errors import DriverError, HostConnectionLost
from deskpool.domain.models import MigrationStats, PowerState
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver, root_volume_name
from deskpool.reconciler.moves import DrainMoves
from deskpool.reconciler.report import Outcome, PassReport
from deskpool.services.hosts import HostService
from deskpool.services.migration import MigrationService
from tests.functional import test_host_grid as grid_world
from tests.functional.test_host_grid import Grid
from tests.functional.test_live_migration import WORK, alice_on_a

grid = grid_world.grid
TIB_MIB = 1024 * 1024  # a fake host's memory unless its URI says otherwise


def one_copy_running_on(g: Grid, desktop_id: uuid.UUID, host: str) -> None:
    """The desktop runs on ``host`` and nowhere else, its row says so, its work is there."""
    assert desktop_id in g.vm_ids(host)
    assert all(desktop_id not in g.vm_ids(h) for h in g.fakes if h != host)
    row = g.rows()["lab-01"]
    assert (row.host, row.state, row.user) == (host, "in_use", "alice")
    assert g.fakes[host].get_vm(desktop_id).power_state is PowerState.RUNNING
    assert GuestAgent(g.fakes[host], desktop_id).read_file(WORK) == b"alice's work\n"


def test_a_target_out_of_memory_mid_move_leaves_the_desktop_running_where_it_was(
    grid: Grid,
) -> None:
    desktop_id = alice_on_a(grid)
    # b's own processes take all but 512 MiB: placement (by allocations) still lets the
    # move start, and the guest's GiB does not fit once its disk has crossed.
    grid.fakes["b"].set_host_load(memory_mib=TIB_MIB - 512)
    moves = MigrationService(grid.ctx, clock=grid.clock)
    with pytest.raises(
        DriverError,
        match=r"host fake://b ran out of memory during the live "
        r"migration of VM .*: it needs 1024 MiB, 512 MiB "
        r"are free there; the VM runs on at fake://a",
    ):
        moves.migrate("lab-01", target="b", reason="test")
    one_copy_running_on(grid, desktop_id, "a")
    assert root_volume_name(desktop_id) not in grid.fakes["b"].list_volumes()
    assert grid.events("desktop-migrated") == []
    # A drain's move that fails so warns its user, saying why; the desktop stays.
    HostService(grid.ctx).drain("a", grace=timedelta(minutes=10))
    report = grid.reconciler().run_pass()
    assert report.counts[Outcome.MIGRATED] == 0
    (warned,) = grid.events("drain-warning")
    assert "could not move to another host" in warned.message
    assert "ran out of memory" in warned.message
    one_copy_running_on(grid, desktop_id, "a")
    # Room again: the lease was given back and the next try moves it.
    grid.fakes["b"].set_host_load(memory_mib=0)
    assert moves.migrate("lab-01", target="b", reason="test").target == "b"
    one_copy_running_on(grid, desktop_id, "b")


def test_the_source_lost_mid_move_leaves_one_copy_that_the_reconciler_records(grid: Grid) -> None:
    desktop_id = alice_on_a(grid)

    def lose_a(done: int, total: int) -> None:
        grid.fakes["a"].set_reachable(False)

    moves = MigrationService(grid.ctx, clock=grid.clock)
    with pytest.raises(
        HostConnectionLost,
        match=r"the connection to host a was lost while desktop lab-01 moved "
        r"to b: it runs on one of the two",
    ):
        moves.migrate("lab-01", target="b", reason="test", progress=lose_a)
    # The hypervisors finished the move; the database does not know it yet.
    assert grid.rows()["lab-01"].host == "a" and desktop_id in grid.vm_ids("b")
    report = grid.reconciler().run_pass()
    assert report.counts[Outcome.ADOPTED] == 1
    (adopted,) = grid.events("desktop-migrated")
    assert "lab-01 was found running on host b" in adopted.message
    grid.fakes["a"].set_reachable(True)
    grid.reconciler().run_pass()
    one_copy_running_on(grid, desktop_id, "b")
    assert grid.host_state("a") == "enabled"


def test_a_drains_move_that_loses_its_source_warns_no_one_and_is_recorded_later(
    grid: Grid, monkeypatch: pytest.MonkeyPatch
) -> None:
    desktop_id = alice_on_a(grid)
    fake_a = grid.fakes["a"]
    migrate = fake_a.migrate_vm

    def losing_a(
        vm_id: uuid.UUID,
        target: HypervisorDriver,
        *,
        base_volume: str,
        timeout_s: float = 600.0,
        progress: Any = None,
    ) -> MigrationStats:
        return migrate(
            vm_id,
            target,
            base_volume=base_volume,
            timeout_s=timeout_s,
            progress=lambda done, total: fake_a.set_reachable(False),
        )

    monkeypatch.setattr(fake_a, "migrate_vm", losing_a)
    HostService(grid.ctx).drain("a", grace=timedelta(minutes=10))
    reconciler = grid.reconciler()
    report = reconciler.run_pass()
    # It may have moved: no drain notice, no "could not move" warning; the pass says why.
    assert report.counts[Outcome.MIGRATED] == 0
    assert any(
        "the connection to host a was lost while desktop lab-01 moved to b" in n
        for n in report.notes
    ), report.notes
    assert grid.events("drain-warning") == [] and grid.rows()["lab-01"].notice is None
    report = reconciler.run_pass()  # a still silent: b's copy is the one, and recorded
    assert report.counts[Outcome.ADOPTED] == 1
    fake_a.set_reachable(True)
    reconciler.run_pass()
    one_copy_running_on(grid, desktop_id, "b")
    assert grid.host_state("a") == "maintenance"


def test_a_second_drain_while_the_first_ones_move_runs_moves_nothing_twice(
    grid: Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    desktop_id = alice_on_a(grid)
    hosts = HostService(grid.ctx)
    first = hosts.drain("a", grace=timedelta(minutes=10))
    second_pass = PassReport()
    seen: dict[str, Any] = {}
    fake_a = grid.fakes["a"]
    migrate = fake_a.migrate_vm

    def while_moving(done: int, total: int) -> None:
        # The drain's move is under way (its lease held): drain again, and let a second
        # broker's drain step try the same desktop.
        seen["second"] = hosts.drain("a", grace=timedelta(minutes=20))
        DrainMoves(grid.ctx, grid.clock).move(desktop_id, second_pass)

    def watched(
        vm_id: uuid.UUID,
        target: HypervisorDriver,
        *,
        base_volume: str,
        timeout_s: float = 600.0,
        progress: Any = None,
    ) -> MigrationStats:
        return migrate(
            vm_id, target, base_volume=base_volume, timeout_s=timeout_s, progress=while_moving
        )

    monkeypatch.setattr(fake_a, "migrate_vm", watched)
    report = grid.reconciler().run_pass()
    assert report.counts[Outcome.MIGRATED] == 1 and report.errors == []
    # The second drain moved the deadline only; the second step left the desktop alone.
    assert seen["second"].state == "draining"
    assert seen["second"].drain_deadline > first.drain_deadline
    assert second_pass.counts[Outcome.MIGRATED] == 0 and second_pass.notes == []
    assert len(grid.events("desktop-migrated")) == 1 and grid.events("drain-warning") == []
    one_copy_running_on(grid, desktop_id, "b")
    # The CLI says what a second drain does.
    monkeypatch.undo()
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))  # the grid's database
    monkeypatch.setattr(common.out, "width", 200)
    result = CliRunner().invoke(app, ["host", "drain", "a", "--grace", "30m"])
    assert result.exit_code == 0, result.output
    assert "host a was draining already" in result.output
    assert "the desktops moving now are not moved again" in result.output
