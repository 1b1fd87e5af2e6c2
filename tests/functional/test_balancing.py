"""Load balancing on fake hosts: the reconciler's balancing pass moves a running desktop of a
pool with ``balance`` live off a host whose measured memory is above the high watermark onto
a cool host, and leaves alone what it must: everything when balancing is off, pools without
``balance``, a desktop its user is logging on to; it keeps to the moves-per-hour cap across
passes, and a move or a host sample that fails changes nothing but says so."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.cli.main import app
from deskpool.config import Settings
from deskpool.domain.errors import InvalidInput
from deskpool.reconciler.balancing import policy_from
from deskpool.reconciler.report import Outcome, PassReport
from deskpool.scheduler.balancer import BalancePolicy
from deskpool.services.audit import audit_log
from deskpool.services.migration import past_moves
from deskpool.services.pools import PoolService
from tests.functional import test_host_grid as grid_world
from tests.functional.test_host_grid import Grid, person

grid = grid_world.grid
ON = BalancePolicy(enabled=True)
# Hosts of 8 GiB: a desktop holds 1 GiB (its template's memory) unless a test says otherwise.
SHAPE = {"vcpus": 16, "memory_mib": 8192}
INTERVAL = timedelta(seconds=Settings().balance_interval_s)


def two_hosts_one_desktop_each(g: Grid, *, balance: bool = True) -> None:
    """Hosts a and b, pool lab spread over them: lab-01 on a, lab-02 on b, both ready."""
    g.host("a", **SHAPE)
    g.host("b", **SHAPE)
    g.pool("lab", spare=2, balance=balance)
    g.reconciler().run_pass()
    assert [r.name for r in g.on("a")] == ["lab-01"] and [r.name for r in g.on("b")] == [
        "lab-02"]


def make_a_hot(g: Grid, own_mib: float = 6000) -> None:
    """Host a's own processes take ``own_mib``: with lab-01's GiB it is above 85 %."""
    g.fakes["a"].set_host_load(memory_mib=own_mib)


def balancing_pass(g: Grid, policy: BalancePolicy = ON) -> PassReport:
    return g.reconciler(balance=policy).run_pass()


def test_a_hot_host_sheds_a_desktop_of_a_balancing_pool_to_a_cool_host(grid: Grid) -> None:
    two_hosts_one_desktop_each(grid)
    make_a_hot(grid)  # (6000 + 1024) / 8192 = 86 %
    lab01 = grid.rows()["lab-01"].id
    report = balancing_pass(grid)
    assert report.counts[Outcome.BALANCED] == 1 and report.errors == []
    row = grid.rows()["lab-01"]
    assert (row.host, row.state) == ("b", "ready")
    assert lab01 in grid.vm_ids("b") and lab01 not in grid.vm_ids("a")
    (event,) = grid.events("desktop-migrated")
    assert event.message.startswith("lab-01 moved live from host a to b (load balancing: "
                                    "host a memory 86% > 85%: move lab-01 (1 GiB) to b "
                                    "(25% after); a 73% after)")
    # The move is on record with its hosts, for the caps and cooldowns of later passes.
    (moved,) = past_moves(grid.ctx, grid.clock.now - timedelta(hours=1))
    assert moved.desktop_id == lab01 and moved.at == grid.clock.now
    assert grid.events("balance-unresolved") == []


def test_nothing_moves_when_balancing_is_off(grid: Grid) -> None:
    two_hosts_one_desktop_each(grid)
    make_a_hot(grid)
    assert Settings().balance_enabled is False
    for reconciler in (grid.reconciler(), grid.reconciler(balance=BalancePolicy())):
        report = reconciler.run_pass()
        assert report.counts[Outcome.BALANCED] == 0
        assert not [n for n in report.notes if n.startswith("balancing")]
    assert grid.rows()["lab-01"].host == "a" and grid.events("desktop-migrated") == []


def test_nothing_moves_in_a_pool_without_balance_and_the_admin_is_told_once(
    grid: Grid
) -> None:
    two_hosts_one_desktop_each(grid, balance=False)
    make_a_hot(grid)
    reconciler = grid.reconciler(balance=ON)
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 0 and grid.rows()["lab-01"].host == "a"
    (event,) = grid.events("balance-unresolved")
    assert event.severity == "warning"
    assert event.message == ("load balancing leaves host a memory 86% > 85%: no desktop on "
                             "it may move (pool or host set balancing off, logon, cooldown or "
                             "already moving)")
    grid.clock.now += INTERVAL
    reconciler.run_pass()  # still hot, for the same reason: not told again
    assert len(grid.events("balance-unresolved")) == 1
    assert grid.events("desktop-migrated") == []


def test_a_desktop_its_user_is_logging_on_to_stays_until_the_logon_is_over(
    grid: Grid
) -> None:
    grid.host("a", **SHAPE)
    grid.pool("lab", spare=1, balance=True)
    grid.reconciler().run_pass()
    grid.host("b", **SHAPE)
    grid.world.user("alice", entitled_to=("lab",))
    handed = Broker(grid.ctx).connect(person("alice"), "lab")
    assert handed.desktop == "lab-01" and handed.desktop_id is not None
    assert grid.rows()["lab-01"].state == "reserved"
    make_a_hot(grid)
    reconciler = grid.reconciler(balance=ON)
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 0 and grid.rows()["lab-01"].host == "a"
    # Her console connects: the logon is over, and the next balancing pass moves it.
    SessionService(grid.ctx).console_connected(handed.desktop_id, "alice")
    grid.clock.now += INTERVAL
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 1
    row = grid.rows()["lab-01"]
    assert (row.host, row.state, row.user) == ("b", "in_use", "alice")


def test_the_moves_per_hour_cap_holds_across_passes(grid: Grid) -> None:
    grid.host("a", **SHAPE)
    grid.pool("lab", spare=5, balance=True)
    grid.reconciler().run_pass()
    grid.host("b", **SHAPE)
    on_a = grid.on("a")
    assert len(on_a) == 5
    for row in on_a:
        grid.fakes["a"].set_vm_load(row.id, memory_mib=500)
    # 5000 + 5 * 500 = 7500 MiB, 92 %: one move leaves it hot (85.4 %), three relieve it.
    make_a_hot(grid, own_mib=5000)
    reconciler = grid.reconciler(balance=BalancePolicy(enabled=True,
                                                       max_moves_per_host_per_hour=1))
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 1 and len(grid.on("b")) == 1
    (left_hot,) = grid.events("balance-unresolved")
    assert "1 moves in the last hour, the cap is 1" in left_hot.message
    grid.clock.now += INTERVAL  # still hot, but the hour is not over
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 0 and len(grid.on("b")) == 1
    grid.clock.now += timedelta(hours=1)
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 1 and len(grid.on("b")) == 2
    assert len(grid.events("desktop-migrated")) == 2


def test_a_failed_move_leaves_the_desktop_where_it_was_with_a_warning(grid: Grid) -> None:
    two_hosts_one_desktop_each(grid)
    make_a_hot(grid)
    lab01 = grid.rows()["lab-01"].id
    grid.fakes["a"].fail_next("migrate_vm.transfer")
    report = balancing_pass(grid)
    assert report.counts[Outcome.BALANCED] == 0 and report.errors == []
    assert any(n.startswith("balancing: lab-01 was not moved to b: injected failure")
               for n in report.notes)
    assert grid.rows()["lab-01"].host == "a" and lab01 in grid.vm_ids("a")
    assert lab01 not in grid.vm_ids("b")
    (warned,) = grid.events("balance-move-failed")
    assert warned.severity == "warning" and warned.desktop == "lab-01"
    assert warned.message.startswith("lab-01 could not move from host a to b to relieve it, "
                                     "and stays where it was: ")


def test_a_host_whose_load_cannot_be_read_is_neither_source_nor_target(grid: Grid) -> None:
    two_hosts_one_desktop_each(grid)
    make_a_hot(grid)
    reconciler = grid.reconciler(balance=ON)
    grid.fakes["a"].fail_next("load_sample")  # the hot host itself: not a source
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 0 and report.errors == []
    assert ("balancing: host a left out, its load could not be read: injected failure in "
            "load_sample") in report.notes
    grid.clock.now += INTERVAL
    grid.fakes["b"].fail_next("load_sample")  # the only cool host: not a target
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 0 and grid.rows()["lab-01"].host == "a"
    (left_hot,) = grid.events("balance-unresolved")
    assert "none of its 1 movable desktops fits another host of its set" in left_hot.message
    grid.clock.now += INTERVAL  # both answer again: the move happens
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 1 and grid.rows()["lab-01"].host == "b"


def test_cpu_load_comes_from_two_samples_and_moves_a_busy_desktop(grid: Grid) -> None:
    two_hosts_one_desktop_each(grid)
    lab01 = grid.rows()["lab-01"].id
    # 16 CPUs: the host's own 11 and lab-01's 3 keep 88 % busy, above the CPU's 80 %.
    grid.fakes["a"].set_host_load(cpus_busy=11)
    grid.fakes["a"].set_vm_load(lab01, cpus_busy=3)
    reconciler = grid.reconciler(balance=ON)
    report = reconciler.run_pass()  # one sample: memory only, nothing hot
    assert report.counts[Outcome.BALANCED] == 0
    grid.clock.now += INTERVAL
    report = reconciler.run_pass()
    assert report.counts[Outcome.BALANCED] == 1 and grid.rows()["lab-01"].host == "b"
    (event,) = grid.events("desktop-migrated")
    assert "host a CPU 88% > 80%: move lab-01 (3.0 CPUs busy) to b" in event.message


def test_the_settings_make_the_policy_and_bad_watermarks_are_named() -> None:
    policy = policy_from(Settings(balance_enabled=True, balance_memory_high=0.9,
                                  balance_memory_low=0.6, balance_cooldown_s=60))
    assert policy.enabled and policy.memory.high == 0.9 and policy.memory.low == 0.6
    assert policy.desktop_cooldown == timedelta(minutes=1)
    assert policy.max_moves_per_host_per_hour == 4 and policy.max_concurrent_moves == 10
    with pytest.raises(InvalidInput, match=r"balance_cpu_high/low: .*low 0.7 and high 0.5"):
        policy_from(Settings(balance_cpu_high=0.5, balance_cpu_low=0.7))



def test_an_admin_turns_a_pools_balancing_on_and_off_by_api_and_cli(
    grid: Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid.host("a", **SHAPE)
    grid.world.user("root", admin=True)
    admin = grid.world.client("root")
    made = admin.post("/api/v1/admin/pools", json={"name": "lab", "template": "golden",
                                                   "balance": True})
    assert made.status_code == 200 and made.json()["balance"] is True
    assert PoolService(grid.ctx).get("lab").balance is True
    changed = admin.patch("/api/v1/admin/pools/lab", json={"balance": False})
    assert changed.status_code == 200 and changed.json()["balance"] is False
    refused = admin.patch("/api/v1/admin/pools/lab", json={"balance": "sometimes"})
    assert refused.status_code == 422 and PoolService(grid.ctx).get("lab").balance is False
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))  # the CLI's database
    result = CliRunner().invoke(app, ["pool", "update", "lab", "--balance"])
    assert result.exit_code == 0 and "load-balanced" in result.output
    assert PoolService(grid.ctx).get("lab").balance is True
    result = CliRunner().invoke(app, ["pool", "create", "kiosk", "--template", "golden",
                                      "--balance"])
    assert result.exit_code == 0, result.output
    assert PoolService(grid.ctx).get("kiosk").balance is True
    (update,) = [e for e in audit_log(grid.ctx, target="pool/lab")
                 if e.action == "pool.update" and e.actor.startswith("cli:")]
    assert (update.old, update.new) == ({"balance": False}, {"balance": True})
