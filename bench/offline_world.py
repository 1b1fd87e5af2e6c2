"""A broker on the fake driver for the offline benches (P4, R5): alice's desktop ``home-01``
in pool ``home`` that may go offline, a real HTTP server in a thread of this process, and
the CLI signed in (its config in the bench's directory). No VM boots; the layers are real
LUKS qcow2 files and the transfers go through the real client and API."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.broker_world

from typer.testing import CliRunner

from deskpool.api.app import create_app
from deskpool.cli import client as client_module
from deskpool.cli.main import app
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.offline_secrets import secrets_dir
from tests.broker_world import PASSWORD, BrokerWorld, ServerThread, make_world

POLICY = {
    "may_go_offline": True,
    "max_days_offline": 10,
    "sync_every_days": 3,
    "may_roll_back": True,
}
OFFLINE_PASSWORD = "bench-offline-pass"
LAPTOP = "bench-laptop"


@dataclass
class OfflineBench:
    world: BrokerWorld
    server: ServerThread
    root: Path
    laptop_dir: Path

    def offline(self, *args: str, password: bool = False) -> str:
        argv = ["offline", *args, "--dir", str(self.laptop_dir)]
        if password:
            argv.append("--password-stdin")
        result = CliRunner().invoke(app, argv, input=f"{OFFLINE_PASSWORD}\n")
        if result.exit_code != 0:
            raise RuntimeError(f"deskpool {' '.join(argv)}: {result.exception or result.output}")
        return result.output

    def server_layer(self) -> Path:
        (folder,) = (secrets_dir(self.world.ctx.settings) / "layers").iterdir()
        return folder / "layer.qcow2"


def make_template(tmp: Path, disk_bytes: int) -> Path:
    disk = tmp / "golden.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(disk_bytes)], check=True
    )
    return disk


@contextmanager
def offline_bench(root: Path, disk_bytes: int = 64 * 2**20) -> Iterator[OfflineBench]:
    root.mkdir(parents=True, exist_ok=True)
    world = make_world(root)
    if disk_bytes != 64 * 2**20:  # the world's template is 64 MiB: publish a bigger one
        from deskpool.services.templates import ImageFiles, TemplateService

        TemplateService(world.ctx).publish("big", ImageFiles(disk=make_template(root, disk_bytes)))
    world.user("root", admin=True)
    made = world.client("root").post(
        "/api/v1/admin/pools",
        json={
            "name": "home",
            "template": "big" if disk_bytes != 64 * 2**20 else "golden",
            "kind": "stateful",
            "assignment": "dedicated",
            "on_logout": "recycle-as-is",
            "max_size": 1,
            "spare": 1,
            "naming_pattern": "home-{n:02}",
            "offline": POLICY,
        },
    )
    assert made.status_code == 200, made.text
    world.user("alice", entitled_to=("home",))
    world.fill()
    got = world.client("alice").post("/api/v1/pools/home/connect").json()
    world.client("alice").post(f"/api/v1/desktops/{got['desktop_id']}/logoff")
    world.fill()
    # The sign-in where a child process's CLI looks for it too.
    os.environ["XDG_CONFIG_HOME"] = str(root / "xdg-config")
    client_module.CONFIG = root / "xdg-config" / "deskpool"
    try:
        with ServerThread(create_app(world.ctx, directories=[])) as server:
            said = CliRunner().invoke(
                app, ["client", "login", server.url, "alice", "--password", PASSWORD]
            )
            assert said.exit_code == 0, said.output
            yield OfflineBench(world=world, server=server, root=root, laptop_dir=root / "laptop")
    finally:
        world.ctx.close()
        forget_fake_hosts()
