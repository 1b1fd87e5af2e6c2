"""The CLI against a real broker over HTTP: sign in, list pools, connect, log off."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deskpool.api.app import create_app
from deskpool.cli import client as client_module
from deskpool.cli.main import app
from deskpool.drivers.agent import GuestAgent
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


def test_cli_rdp_saves_the_file_or_runs_the_client_with_its_password(
        world: BrokerWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    set_in_guest: list[list[str]] = []

    def exec_capture(self: GuestAgent, argv: list[str], timeout_s: float = 30.0
                     ) -> tuple[int, str, str]:
        set_in_guest.append(argv)  # rdp-otp set: the fake guest runs no scripts
        return 0, "", ""

    monkeypatch.setattr(GuestAgent, "exec_capture", exec_capture)
    with world.ctx.uow() as uow:  # what a desktop-flavor hand-over allocates
        uow.linux_accounts.get_or_allocate("alice", "alice")
        uow.commit()
    # A stand-in for xfreerdp: keeps its arguments and the file it was given.
    seen = tmp_path / "seen"
    stub = tmp_path / "fake-xfreerdp"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {seen}\ncat "$1" >> {seen}\n')
    stub.chmod(0o755)
    runner = CliRunner()
    with ServerThread(create_app(world.ctx, directories=[], rdp_proxy_port=3390)) as server:
        assert runner.invoke(app, ["client", "login", server.url, "alice",
                                   "--password", PASSWORD]).exit_code == 0
        assert runner.invoke(app, ["client", "connect", "lab"]).exit_code == 0
        name = next(d.name for d in DesktopService(world.ctx).list() if d.state == "reserved")
        saved = tmp_path / "mine.rdp"
        got = runner.invoke(app, ["client", "rdp", name, "--save", str(saved)],
                            terminal_width=300)
        assert got.exit_code == 0, got.output
        password = got.output.split("one-time password: ")[1].split()[0]
        assert set_in_guest[-1][4] == hashlib.sha256(password.encode()).hexdigest()
        assert saved.stat().st_mode & 0o077 == 0
        assert b"username:s:alice\r\n" in saved.read_bytes()
        ran = runner.invoke(app, ["client", "rdp", name, "--client", str(stub)])
        assert ran.exit_code == 0, ran.output
        args = seen.read_text()
        password = args.split("/p:")[1].split("\n")[0]
        assert set_in_guest[-1][4] == hashlib.sha256(password.encode()).hexdigest()
        assert "/cert:ignore" in args and "loadbalanceinfo:s:" in args
        missing = runner.invoke(app, ["client", "rdp", name, "--client", "no-such-rdp-client"])
        assert "no-such-rdp-client is not installed" in str(missing.exception)


def test_cli_spice_saves_the_vv_file_or_runs_the_viewer(
        world: BrokerWorld, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    stub = tmp_path / "fake-remote-viewer"  # keeps the file it was given
    stub.write_text(f'#!/bin/sh\ncat "$1" > {seen}\n')
    stub.chmod(0o755)
    runner = CliRunner()
    with ServerThread(create_app(world.ctx, directories=[], spice_proxy_port=6081)) as server:
        assert runner.invoke(app, ["client", "login", server.url, "alice",
                                   "--password", PASSWORD]).exit_code == 0
        assert runner.invoke(app, ["client", "connect", "lab"]).exit_code == 0
        name = next(d.name for d in DesktopService(world.ctx).list() if d.state == "reserved")
        saved = tmp_path / "mine.vv"
        got = runner.invoke(app, ["client", "spice", name, "--save", str(saved)],
                            terminal_width=300)
        assert got.exit_code == 0, got.output
        assert saved.stat().st_mode & 0o077 == 0
        text = saved.read_text()
        assert "[virt-viewer]" in text and "type=spice" in text and ":6081" in text
        ran = runner.invoke(app, ["client", "spice", name, "--viewer", str(stub)])
        assert ran.exit_code == 0, ran.output
        again = seen.read_text()
        assert "[virt-viewer]" in again and again != text  # a fresh ticket each time
        missing = runner.invoke(app, ["client", "spice", name, "--viewer", "no-such-viewer"])
        assert "no-such-viewer is not installed" in str(missing.exception)
