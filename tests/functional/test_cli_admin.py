"""The admin commands of the CLI, run in-process with Typer's CliRunner against the same
database (and fake host) as a broker world: each changes what it says and leaves an audit row
whose actor is the local login."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deskpool.cli.common import out
from deskpool.cli.main import app
from deskpool.domain.errors import Conflict
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.audit import audit_log
from deskpool.services.pools import PoolService
from tests.broker_world import PASSWORD, BrokerWorld, make_world


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path)
    monkeypatch.setenv("DESKPOOL_DATA_DIR", str(tmp_path / "data"))  # the CLI's database
    monkeypatch.setattr(out, "width", 300)  # whole table cells, not ellipses
    w.pool("lab")
    w.user("alice", entitled_to=("lab",))
    w.fill()
    yield w
    w.ctx.close()
    forget_fake_hosts()


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result.output


def test_pool_commands_change_the_pool_and_are_audited(world: BrokerWorld) -> None:
    invoke("pool", "update", "lab", "--power", "suspend", "--idle-timeout", "900",
           "--spare", "1")
    pool = PoolService(world.ctx).get("lab")
    assert pool.spare == 1
    assert "min 0 / spare 3 / max 5" in invoke("pool", "resize", "lab", "--spare", "3",
                                               "--max", "5")
    assert "disabled" in invoke("pool", "disable", "lab")
    assert "disabled" in invoke("pool", "list")
    invoke("pool", "enable", "lab")
    invoke("pool", "revoke", "lab", "--user", "alice")
    entries = audit_log(world.ctx, target="pool/lab")
    assert [e.action for e in entries] == ["entitlement.revoke", "pool.enable",
                                           "pool.disable", "pool.update", "pool.update"]
    assert all(e.actor.startswith("cli:") and e.address == "local" for e in entries)
    assert entries[-1].new == {"power_policy": "suspend", "idle_timeout_s": 900, "spare": 1}
    assert "deleting" in invoke("pool", "delete", "lab")


def test_a_refused_cli_action_says_why(world: BrokerWorld) -> None:
    result = CliRunner().invoke(app, ["host", "remove", "h1"])
    assert result.exit_code != 0
    assert isinstance(result.exception, Conflict)
    assert "still has 2 desktop(s)" in str(result.exception)
    version = CliRunner().invoke(app, ["template", "delete-version", "golden", "1"])
    assert isinstance(version.exception, Conflict) and "pool lab (current version)" in str(
        version.exception)


def test_user_and_group_commands(world: BrokerWorld) -> None:
    invoke("user", "disable", "alice")
    login = world.client().post("/api/v1/auth/login", json={"username": "alice",
                                                             "password": PASSWORD})
    assert login.status_code == 401
    assert "yes" in invoke("user", "list")
    invoke("user", "enable", "alice")
    output = invoke("user", "reset-password", "alice")
    password = output.strip().rsplit(" ", 1)[-1]
    assert world.client().post("/api/v1/auth/login", json={
        "username": "alice", "password": password}).status_code == 200
    invoke("group", "add", "staff")
    invoke("group", "add-member", "staff", "alice")
    assert "alice" in invoke("group", "list")
    invoke("group", "remove-member", "staff", "alice")
    invoke("group", "delete", "staff")
    log = invoke("audit", "--target", "user/alice")
    assert "user.reset-password" in log and "user.disable" in log
    assert "group.create" in invoke("audit", "--target", "group")
