"""Desktops that outlive their host's maintenance, on two fake hosts: a draining host's
desktops in use move live to the other host with their user's session and files; one that
cannot move is warned with the reason and logged off at the deadline as before; a move whose
broker died before the database heard of it is adopted by the reconciler, never deleted as an
orphan; and what cannot move is refused before anything changes."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest

from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.domain.errors import Conflict, DriverError, InvalidInput, LostRace
from deskpool.drivers.agent import GuestAgent
from deskpool.reconciler.report import Outcome
from deskpool.services.factory import copy_version_to_host
from deskpool.services.hosts import HostService
from deskpool.services.migration import MigrationService
from deskpool.store.leases import Leased
from deskpool.store.models import utcnow
from tests.functional import test_host_grid as grid_world
from tests.functional.test_host_grid import Grid, person

grid = grid_world.grid
WORK = "/root/work.txt"


def alice_on_a(g: Grid) -> uuid.UUID:
    """Hosts a and b, a pool spread over them, alice working on lab-01 on a."""
    g.host("a")
    g.host("b")
    g.pool("lab", spare=1)
    g.world.user("alice", entitled_to=("lab",))
    g.reconciler().run_pass()
    handed = Broker(g.ctx).connect(person("alice"), "lab")
    assert handed.desktop == "lab-01" and g.rows()["lab-01"].host == "a"
    assert handed.desktop_id is not None
    SessionService(g.ctx).console_connected(handed.desktop_id, "alice")
    GuestAgent(g.fakes["a"], handed.desktop_id).write_file(WORK, b"alice's work\n")
    return handed.desktop_id


def has_factory_snapshot(g: Grid, desktop_id: uuid.UUID) -> bool:
    with g.ctx.uow(read_only=True) as uow:
        return uow.desktops.get(desktop_id).has_factory_snapshot


def test_a_desktop_in_use_moves_live_off_a_draining_host(grid: Grid) -> None:
    desktop_id = alice_on_a(grid)
    assert has_factory_snapshot(grid, desktop_id)
    reconciler = grid.reconciler()
    HostService(grid.ctx).drain("a", grace=timedelta(minutes=10))
    report = reconciler.run_pass()
    assert report.counts[Outcome.MIGRATED] == 1 and report.errors == []
    moved = grid.rows()["lab-01"]
    assert (moved.host, moved.state, moved.user, moved.notice) == ("b", "in_use", "alice", None)
    assert desktop_id in grid.vm_ids("b") and desktop_id not in grid.vm_ids("a")
    assert GuestAgent(grid.fakes["b"], desktop_id).read_file(WORK) == b"alice's work\n"
    (event,) = grid.events("desktop-migrated")
    assert event.message.startswith("lab-01 moved live from host a to b (host a is draining)")
    assert grid.events("drain-warning") == []
    # Its factory snapshot stayed behind (libvirt cannot move one): at logoff the desktop
    # is replaced, not reverted.
    assert not has_factory_snapshot(grid, desktop_id)
    reconciler.run_pass()
    assert grid.host_state("a") == "maintenance"
    assert SessionService(grid.ctx).log_off(desktop_id, by=None, reason="done") == "retiring"


def test_a_desktop_that_cannot_move_is_warned_why_and_logged_off_at_the_deadline(
    grid: Grid
) -> None:
    desktop_id = alice_on_a(grid)
    HostService(grid.ctx).drain("b")  # the only other host takes nothing either
    HostService(grid.ctx).drain("a", grace=timedelta(minutes=10))
    report = grid.reconciler().run_pass()
    assert report.counts[Outcome.MIGRATED] == 0
    assert grid.rows()["lab-01"].host == "a"
    assert (grid.rows()["lab-01"].notice or "").startswith("Host maintenance:")
    (warned,) = [e for e in grid.events("drain-warning") if e.user == "alice"]
    assert "could not move to another host: desktop lab-01 has nowhere to go" in (
        warned.message)
    grid.reconciler().run_pass()
    assert len([e for e in grid.events("drain-warning") if e.user == "alice"]) == 1
    assert GuestAgent(grid.fakes["a"], desktop_id).read_file(WORK) == b"alice's work\n"


def test_a_move_its_broker_never_recorded_is_adopted_not_deleted(grid: Grid) -> None:
    desktop_id = alice_on_a(grid)
    with grid.ctx.uow(read_only=True) as uow:
        base, _ = copy_version_to_host(grid.fakes["b"], uow.desktops.get(desktop_id)
                                       .template_version)
    grid.fakes["a"].delete_snapshot(desktop_id, "factory")
    # The hypervisor moved it; the broker died before writing the new host down, while
    # its lease is still live: nothing is decided then, nothing is deleted.
    grid.fakes["a"].migrate_vm(desktop_id, grid.fakes["b"], base_volume=base)
    with grid.ctx.uow() as uow:
        assert uow.leases.take(Leased.DESKTOP, desktop_id, "dead-broker",
                               grid.clock.now + timedelta(minutes=5), grid.clock.now)
        uow.commit()
    reconciler = grid.reconciler()
    report = reconciler.run_pass()
    assert report.counts[Outcome.ADOPTED] == 0 and report.orphans_removed == 0
    assert desktop_id in grid.vm_ids("b") and grid.rows()["lab-01"].host == "a"
    assert grid.rows()["lab-01"].state == "in_use"  # not "vanished" from a
    grid.clock.now += timedelta(minutes=6)  # the dead broker's lease expires
    report = reconciler.run_pass()
    assert report.counts[Outcome.ADOPTED] == 1 and report.errors == []
    row = grid.rows()["lab-01"]
    assert (row.host, row.state, row.user) == ("b", "in_use", "alice")
    assert GuestAgent(grid.fakes["b"], desktop_id).read_file(WORK) == b"alice's work\n"
    assert any("was found running on host b" in e.message
               for e in grid.events("desktop-migrated"))


def test_what_cannot_move_is_refused_and_a_failed_move_changes_nothing(grid: Grid) -> None:
    desktop_id = alice_on_a(grid)
    moves = MigrationService(grid.ctx, clock=grid.clock)
    with pytest.raises(InvalidInput, match="on host a already"):
        moves.migrate("lab-01", target="a", reason="test")
    HostService(grid.ctx).drain("b")
    with pytest.raises(Conflict, match="host b is draining"):
        moves.migrate("lab-01", target="b", reason="test")
    HostService(grid.ctx).enable("b")
    # Hosts placement would never pick are refused before anything starts, saying why.
    grid.host("arm", arch="aarch64")
    with pytest.raises(Conflict, match=r"cannot move to host arm: .*aarch64"):
        moves.migrate("lab-01", target="arm", reason="test")
    grid.host("tiny", memory_mib=512)
    with pytest.raises(Conflict, match=r"cannot move to host tiny: .*memory"):
        moves.migrate("lab-01", target="tiny", reason="test")
    assert grid.rows()["lab-01"].host == "a"
    assert grid.vm_ids("arm") == grid.vm_ids("tiny") == set()
    grid.fakes["a"].fail_next("migrate_vm.transfer")
    with pytest.raises(DriverError):
        moves.migrate("lab-01", target="b", reason="test")
    assert grid.rows()["lab-01"].host == "a" and desktop_id in grid.vm_ids("a")
    assert desktop_id not in grid.vm_ids("b")
    # Its lease was given back: the next try moves it.
    assert moves.migrate(str(desktop_id), reason="test").target == "b"
    assert grid.rows()["lab-01"].host == "b"
    # A desktop whose VM is off (the row says so after a pass) does not move live.
    grid.fakes["b"].stop_vm(desktop_id, force=True)
    grid.reconciler().run_pass()
    with pytest.raises(Conflict, match="only a running desktop"):
        moves.migrate("lab-01", target="a", reason="test")


def test_an_admin_moves_a_desktop_through_the_api_and_others_cannot(grid: Grid) -> None:
    desktop_id = alice_on_a(grid)
    grid.world.user("root-admin", admin=True)
    admin, alice = grid.world.client("root-admin"), grid.world.client("alice")
    url = f"/api/v1/admin/desktops/{desktop_id}/migrate"
    assert alice.post(url, json={}).status_code == 403
    assert admin.post(url, json={"target": "Not A Host!"}).status_code == 422
    assert admin.post(f"/api/v1/admin/desktops/{uuid.uuid4()}/migrate",
                      json={}).status_code == 404
    assert grid.rows()["lab-01"].host == "a"  # nothing moved by a refused call
    answer = admin.post(url, json={"target": "b"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["desktop"], body["source"], body["target"]) == ("lab-01", "a", "b")
    assert body["memory_bytes"] > 0
    assert grid.rows()["lab-01"].host == "b"
    audited = admin.get("/api/v1/admin/audit").json()
    assert any(a["action"] == "desktop.migrate" for a in audited), audited


def test_a_desktop_another_broker_works_on_is_moved_later_not_warned(grid: Grid) -> None:
    desktop_id = alice_on_a(grid)
    with grid.ctx.uow() as uow:  # another broker's step holds it now
        assert uow.leases.take(Leased.DESKTOP, desktop_id, "other-broker",
                               grid.clock.now + timedelta(minutes=5), grid.clock.now)
        uow.commit()
    HostService(grid.ctx).drain("a", grace=timedelta(minutes=30))
    reconciler = grid.reconciler()
    assert reconciler.run_pass().counts[Outcome.MIGRATED] == 0
    row = grid.rows()["lab-01"]
    assert (row.host, row.notice) == ("a", None) and grid.events("drain-warning") == []
    grid.clock.now += timedelta(minutes=6)
    assert reconciler.run_pass().counts[Outcome.MIGRATED] == 1
    assert grid.rows()["lab-01"].host == "b"


def test_a_move_longer_than_its_lease_keeps_the_desktop_leased_to_the_end(grid: Grid) -> None:
    """The lease is renewed while the move runs: another broker cannot take the desktop
    half-way, however long the move takes; it is given back at the end."""
    alice_on_a(grid)
    seen: list[bool] = []

    def slow(done: int, total: int) -> None:
        time.sleep(1.0)  # over three lease times of 0.3 s
        try:
            MigrationService(grid.ctx).migrate("lab-01", target="b", reason="a rival")
        except LostRace:
            seen.append(True)

    moves = MigrationService(grid.ctx, lease=timedelta(seconds=0.3))
    assert moves.migrate("lab-01", target="b", reason="test", progress=slow).target == "b"
    assert seen == [True]
    with grid.ctx.uow() as uow:  # given back: anyone may take it now
        now = utcnow()
        assert uow.leases.take(Leased.DESKTOP, grid.rows()["lab-01"].id, "probe",
                               now + timedelta(minutes=1), now)
