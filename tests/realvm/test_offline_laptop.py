"""Offline desktops on real VMs (issue 15): a second, independent libvirt daemon on this machine
(``tests/libvirt_hosts.py``) stands for the laptop, ``deskpool offline`` (the CLI) for its
client, qemu:///system for the server's host.

carol's stateful desktop (pool home, VMs away-NN) holds a file she wrote online. She checks it
out (an online connect is then refused, saying where it is); the broker stops (the laptop is
offline); a wrong password, then an expired lease, refuse the start; with her password it
starts on the laptop from its encrypted layer, by the desktop's own kernel and identity, and
her file is there; she writes a marker file, which appears in no file of the laptop in plain
text. Back online she checks it in; the desktop starts on the server again with the marker file
in it."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest
from typer.testing import CliRunner

from deskpool.api.app import create_app
from deskpool.broker.handover import Broker
from deskpool.cli import client as client_module
from deskpool.cli import offline_user
from deskpool.cli.main import app
from deskpool.config import Settings
from deskpool.domain.errors import AgentUnavailable
from deskpool.domain.offline import CheckedOut
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.images.builder import GuestImage
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.broker_world import PASSWORD, BrokerWorld, ServerThread
from tests.libvirt_hosts import HOST_USER, SecondLibvirtHost
from tests.realvm.conftest import delete_every_desktop, remove_pool_of, settle

pytestmark = pytest.mark.realvm
API = "/api/v1"
LAPTOP = "carol-laptop"
OFFLINE_PASSWORD = "offline-pass-9"
BEFORE_FILE = "/root/written-online.txt"
MARKER_FILE = "/root/written-offline.txt"
CAROL = Identity("carol", "carol", "local")
POLICY = {"may_go_offline": True, "max_days_offline": 10, "sync_every_days": 3,
          "may_roll_back": True}


class LaptopAgent:
    """The laptop domain's guest agent, as ``GuestAgent`` asks a driver for it."""

    def __init__(self, domain: libvirt.virDomain) -> None:
        self.domain = domain

    def agent_command(self, vm_id: uuid.UUID, command: str,
                      arguments: dict[str, Any] | None = None, timeout_s: int = 5) -> Any:
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        try:
            answer = libvirt_qemu.qemuAgentCommand(self.domain, json.dumps(request),
                                                   timeout_s, 0)
        except libvirt.libvirtError as exc:
            raise AgentUnavailable(str(exc)) from exc
        return json.loads(answer)["return"]


@pytest.fixture()
def world(guest_image: GuestImage, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[BrokerWorld, SecondLibvirtHost]]:
    monkeypatch.setattr(client_module, "CONFIG", tmp_path / "config")
    with SecondLibvirtHost() as laptop:
        ctx = ServiceContext(Settings(data_dir=tmp_path / "data"))
        try:
            HostService(ctx).add("server", "qemu:///system", storage_dir=tmp_path / "pool")
            TemplateService(ctx).publish("golden", ImageFiles.from_guest_image(guest_image),
                                         recipe_hash=guest_image.recipe_hash, arch="x86_64")
            w = BrokerWorld(ctx=ctx, fake=None)  # type: ignore[arg-type]  # users, clients
            w.user("root", admin=True)
            made = w.client("root").post(f"{API}/admin/pools", json={
                "name": "home", "template": "golden", "kind": "stateful",
                "assignment": "dedicated", "on_logout": "recycle-as-is", "min_size": 1,
                "spare": 0, "max_size": 1, "naming_pattern": "away-{n:02}", "offline": POLICY})
            assert made.status_code == 200, made.text
            w.user("carol", entitled_to=("home",))
            yield w, laptop
        finally:
            delete_every_desktop(ctx)
            ctx.close()
            remove_pool_of(tmp_path / "pool")


def offline(laptop_dir: Path, *args: str, password: str | None = OFFLINE_PASSWORD,
            exit_code: int = 0) -> str:
    argv = ["offline", *args, "--dir", str(laptop_dir)]
    if password is not None:
        argv.append("--password-stdin")
    result = CliRunner().invoke(app, argv, input=f"{password}\n" if password else None)
    assert result.exit_code == exit_code, (argv, result.output, result.exception)
    return str(result.exception) if exit_code else result.output


def hand_to_laptop_user(folder: Path) -> None:
    """The client and the laptop's libvirt run as one user there: its files are theirs."""
    import pwd

    account = pwd.getpwnam(HOST_USER)
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)


def test_a_desktop_checked_out_runs_on_the_laptop_and_comes_back_with_its_work(
        world: tuple[BrokerWorld, SecondLibvirtHost], monkeypatch: pytest.MonkeyPatch) -> None:
    w, laptop = world
    ctx = w.ctx
    reconciler = Reconciler(ctx, workers=2, ready_timeout_s=420)
    broker = Broker(ctx, ready_timeout_s=240)
    settle(reconciler, lambda: any(d.state == "ready" for d in DesktopService(ctx).list()),
           "the pool's desktop to be ready")
    online = broker.connect(CAROL, "home")
    assert online.status == "ready" and online.desktop_id is not None
    desktop_id, name = online.desktop_id, online.desktop or ""
    server_agent = GuestAgent(ctx.driver_for_name("server"), desktop_id)
    before = f"written online before the check-out: {uuid.uuid4()}\n".encode()
    server_agent.write_file(BEFORE_FILE, before)
    assert server_agent.exec_capture(["sync"])[0] == 0
    w.client("carol").post(f"{API}/desktops/{desktop_id}/logoff")
    settle(reconciler, lambda: DesktopService(ctx).get(name).state == "ready",
           f"{name} ready again after the logoff")

    # 1. Check-out through the laptop client; an online connect is refused meanwhile.
    laptop_dir = laptop.base_dir / "laptop"
    laptop_uri = laptop.uri
    with ServerThread(create_app(ctx, directories=[])) as server:
        said = CliRunner().invoke(app, ["client", "login", server.url, "carol",
                                        "--password", PASSWORD])
        assert said.exit_code == 0, said.output
        out = offline(laptop_dir, "checkout", name, "--laptop", LAPTOP, "--quiet")
        assert "is ready on this laptop" in out
    with pytest.raises(CheckedOut, match=f"checked out to {LAPTOP} until"):
        broker.connect(CAROL, "home")
    hand_to_laptop_user(laptop_dir)

    # 2. The broker is stopped. A wrong password and an expired lease refuse the start.
    start = ["start", name, "--libvirt-uri", laptop_uri, "--domain-type", "qemu"]
    wrong = offline(laptop_dir, *start, password="not-her-password", exit_code=1)
    assert "wrong password" in wrong.lower()
    later, real_now = datetime.now(UTC) + timedelta(days=4), offline_user.now
    monkeypatch.setattr(offline_user, "now", lambda: later)
    expired = offline(laptop_dir, *start, exit_code=1)
    assert "offline lease expired on" in expired and "connect to the network" in expired
    monkeypatch.setattr(offline_user, "now", real_now)

    # 3. With her password it runs on the laptop, from her disk: her file is there.
    started_at = time.monotonic()
    assert f"is running as deskpool-offline-{name}" in offline(laptop_dir, *start)
    conn = libvirt.open(laptop_uri)
    try:
        domain = conn.lookupByName(f"deskpool-offline-{name}")
        agent = GuestAgent(LaptopAgent(domain), desktop_id)  # type: ignore[arg-type]
        agent.wait_until_ready(600, poll_s=2)
        print(f"booted on the laptop in {time.monotonic() - started_at:.0f} s", flush=True)
        assert agent.read_file(BEFORE_FILE) == before
        marker = f"offline-marker-{uuid.uuid4().hex}"
        agent.write_file(MARKER_FILE, f"{marker}\n".encode())
        assert agent.exec_capture(["sync"])[0] == 0
    finally:
        conn.close()
    assert "is shut down" in offline(laptop_dir, "stop", name, "--libvirt-uri",
                                     laptop_uri, "--force", password=None)
    for path in laptop_dir.rglob("*"):  # encrypted at rest: the marker is nowhere in clear
        if path.is_file():
            assert marker.encode() not in path.read_bytes(), path

    # 4. Online again: check-in; the desktop starts on the server with the laptop's work.
    with ServerThread(create_app(ctx, directories=[])) as server:
        said = CliRunner().invoke(app, ["client", "login", server.url, "carol",
                                        "--password", PASSWORD])
        assert said.exit_code == 0, said.output
        done = offline(laptop_dir, "checkin", name, "--libvirt-uri", laptop_uri,
                       "--quiet", password=None)
        assert f"checked {name} in; it is back online" in done
        # QEMU kept the layer's persistent dirty bitmap while the desktop ran on the
        # laptop: the check-in read only what changed, not the whole layer.
        assert ("only the blocks the layer's change bitmap names were read"
                in " ".join(done.split())), done  # the console may wrap the line
    assert DesktopService(ctx).get(name).state == "ready"
    answers: list[str] = []
    settle(reconciler, lambda: answers.append(broker.connect(CAROL, "home").status) or
           answers[-1] == "ready", f"{name} handed to carol again")
    assert DesktopService(ctx).get(name).id == desktop_id
    server_agent = GuestAgent(ctx.driver_for_name("server"), desktop_id)
    server_agent.wait_until_ready(300, poll_s=2)
    assert server_agent.read_file(MARKER_FILE) == f"{marker}\n".encode()
    assert server_agent.read_file(BEFORE_FILE) == before
