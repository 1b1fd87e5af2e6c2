"""Load balancing per host set, on fake hosts: an administrator puts hosts in sets (API and
CLI) and switches a set's balancing; the balancing pass then moves a desktop whose pool
does not balance when its host's set does, and only ever to a host of the same set."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from deskpool.cli import common
from deskpool.cli.main import app
from deskpool.domain.errors import InvalidInput, NotFound
from deskpool.reconciler.report import Outcome
from deskpool.services.audit import audit_log
from deskpool.services.hosts import HostService, check_set_name
from tests.functional import test_host_grid as grid_world
from tests.functional.test_balancing import SHAPE, balancing_pass, make_a_hot
from tests.functional.test_host_grid import Grid

grid = grid_world.grid


def three_hosts(g: Grid, *, pool_balances: bool = False) -> None:
    """Hosts a and b in set rack-a, c (the coolest) in the default set; lab-01 on a."""
    g.host("a", **SHAPE)
    g.pool("lab", spare=1, balance=pool_balances)
    g.reconciler().run_pass()
    g.host("b", **SHAPE)
    g.host("c", **SHAPE)
    hosts = HostService(g.ctx)
    hosts.set_host_set("a", "rack-a")
    hosts.set_host_set("b", "rack-a")
    g.fakes["b"].set_host_load(memory_mib=2000)  # cooler than the low mark, warmer than c
    assert [r.name for r in g.on("a")] == ["lab-01"]


def test_a_balanced_host_set_moves_a_desktop_of_a_pool_without_balancing(grid: Grid) -> None:
    three_hosts(grid)
    make_a_hot(grid)
    report = balancing_pass(grid)
    assert report.counts[Outcome.BALANCED] == 0 and grid.rows()["lab-01"].host == "a"

    switched = HostService(grid.ctx).set_balance("rack-a", True)
    assert (switched.balance, switched.hosts) == (True, ("a", "b"))
    grid.clock.now += grid_world.GRACE  # past the balance interval (60 s)
    report = balancing_pass(grid)
    # It goes to b, in its set, though c (the default set) is cooler.
    assert report.counts[Outcome.BALANCED] == 1 and report.errors == []
    assert grid.rows()["lab-01"].host == "b"


def test_a_move_never_leaves_the_host_set_even_when_the_pool_balances(grid: Grid) -> None:
    three_hosts(grid, pool_balances=True)
    HostService(grid.ctx).set_host_set("b", None)  # a alone in rack-a
    make_a_hot(grid)
    report = balancing_pass(grid)
    assert report.counts[Outcome.BALANCED] == 0 and grid.rows()["lab-01"].host == "a"
    (event,) = grid.events("balance-unresolved")
    assert "fits another host of its set" in event.message


def test_host_sets_by_api_with_bad_input_named(grid: Grid) -> None:
    grid.host("a", **SHAPE)
    grid.world.user("root", admin=True)
    admin = grid.world.client("root")
    changed = admin.patch("/api/v1/admin/hosts/a", json={"host_set": "rack-a"})
    assert changed.status_code == 200
    assert (changed.json()["host_set"], changed.json()["set_balances"]) == ("rack-a", False)
    on = admin.put("/api/v1/admin/host-sets/rack-a/balance", json={"balance": True})
    assert on.status_code == 200 and on.json() == {
        "name": "rack-a",
        "balance": True,
        "hosts": ["a"],
    }
    (listed,) = admin.get("/api/v1/admin/hosts").json()
    assert (listed["host_set"], listed["set_balances"]) == ("rack-a", True)
    assert admin.get("/api/v1/admin/host-sets").json() == [on.json()]
    # Bad input: an invalid set name, a set no host is in, a host that does not exist.
    bad = admin.patch("/api/v1/admin/hosts/a", json={"host_set": "Rack A"})
    assert bad.status_code == 422 and "host_set" in bad.text
    unknown = admin.put("/api/v1/admin/host-sets/rack-z/balance", json={"balance": True})
    assert unknown.status_code == 404
    assert "host set 'rack-z' has no hosts (host sets: rack-a)" in unknown.text
    missing = admin.patch("/api/v1/admin/hosts/nope", json={"host_set": "rack-a"})
    assert missing.status_code == 404
    # null puts it back in the default set.
    back = admin.patch("/api/v1/admin/hosts/a", json={"host_set": None})
    assert back.status_code == 200 and back.json()["host_set"] is None
    assert admin.get("/api/v1/admin/host-sets").json() == []
    with grid.ctx.uow(read_only=True) as uow:  # the empty set's switch went with it
        assert uow.host_sets.balanced() == set()
    (audit,) = [e for e in audit_log(grid.ctx, target="host-set/rack-a")]
    assert (audit.old, audit.new) == ({"balance": False}, {"balance": True})


def test_the_service_names_a_bad_set_name() -> None:
    with pytest.raises(InvalidInput, match=r"host set name 'Rack A' must be 1-63 characters"):
        check_set_name("Rack A")
    assert check_set_name("rack-a.1") == "rack-a.1"


def test_host_sets_by_cli(grid: Grid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid.host("a", **SHAPE)
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))  # the CLI's database
    monkeypatch.setattr(common.out, "width", 200)  # the host table in one line a host
    cli = CliRunner()
    result = cli.invoke(app, ["host", "update", "a", "--set", "rack-a"])
    assert result.exit_code == 0, result.output
    assert "host a is in host set rack-a" in result.output
    result = cli.invoke(app, ["host", "set-balance", "rack-a", "--on"])
    assert result.exit_code == 0 and "host set rack-a balancing is on (1 hosts)" in result.output
    result = cli.invoke(app, ["host", "list"])
    assert result.exit_code == 0 and "rack-a, balanced" in result.output
    result = cli.invoke(app, ["host", "sets"])
    assert result.exit_code == 0 and "rack-a" in result.output and "on" in result.output
    result = cli.invoke(app, ["host", "set-balance", "nowhere", "--on"])
    # (the CLI's entry point prints a DeskpoolError; invoked directly, it is raised)
    assert isinstance(result.exception, NotFound)
    assert "host set 'nowhere' has no hosts" in str(result.exception)
    result = cli.invoke(app, ["host", "update", "a"])
    assert isinstance(result.exception, InvalidInput)
    assert "give one of --set NAME or --default-set" in str(result.exception)
    result = cli.invoke(app, ["host", "update", "a", "--default-set"])
    assert result.exit_code == 0 and "host set (default)" in result.output
    with pytest.raises(NotFound):
        HostService(grid.ctx).set_balance("rack-a", False)  # no host left in it
    # Its switch went with its last host: named again, the set starts with balancing off.
    result = cli.invoke(app, ["host", "update", "a", "--set", "rack-a"])
    assert result.exit_code == 0 and "host set rack-a" in result.output
    assert "balanced" not in result.output
    assert HostService(grid.ctx).get("a").set_balances is False
    result = cli.invoke(app, ["host", "add", "b", "fake://b", "--set", "rack-b"])
    assert result.exit_code == 0, result.output
    assert HostService(grid.ctx).get("b").host_set == "rack-b"
