"""The CLI against a real broker over HTTP: sign in, list pools, connect, log off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deskpool.api.app import create_app
from deskpool.cli import client as client_module
from deskpool.cli.main import app
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.desktops import DesktopService
from tests.broker_world import PASSWORD, BrokerWorld, ServerThread, make_world


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerWorld]:
    monkeypatch.setattr(client_module, "CONFIG", tmp_path / "config")
    w = make_world(tmp_path)
    w.pool("lab")
    w.user("alice", entitled_to=("lab",))
    w.fill()
    yield w
    w.ctx.close()
    forget_fake_hosts()


def test_cli_signs_in_connects_and_logs_off_through_the_api(world: BrokerWorld) -> None:
    runner = CliRunner()
    with ServerThread(create_app(world.ctx, directories=[])) as server:
        bad = runner.invoke(app, ["client", "login", server.url, "alice",
                                  "--password", "wrong-password"])
        assert bad.exit_code != 0
        ok = runner.invoke(app, ["client", "login", server.url, "alice",
                                 "--password", PASSWORD])
        assert ok.exit_code == 0, ok.output
        assert "signed in" in ok.output
        assert (world.ctx.settings.data_dir.parent / "config" / "client.json").stat(
        ).st_mode & 0o077 == 0
        pools = runner.invoke(app, ["client", "pools"])
        assert "lab" in pools.output
        connected = runner.invoke(app, ["client", "connect", "lab"])
        assert connected.exit_code == 0 and "is ready" in connected.output
        held = [d for d in DesktopService(world.ctx).list() if d.state == "reserved"]
        assert len(held) == 1
        listed = runner.invoke(app, ["client", "desktops"], terminal_width=200)
        assert held[0].name in listed.output
        off = runner.invoke(app, ["client", "logoff", held[0].name])  # by name, as listed
        assert off.exit_code == 0, off.output
        assert f"logged off {held[0].name}" in off.output and "recycling" in off.output
        refused = runner.invoke(app, ["client", "connect", "nope"])
        assert refused.exit_code != 0
        assert "no pool named 'nope'" in str(refused.exception)
        garbled = runner.invoke(app, ["client", "logoff", "not-mine"])
        assert "you hold no desktop named 'not-mine'" in str(garbled.exception)
