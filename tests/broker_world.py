"""A broker on the fake driver for functional tests and benchmarks: one host, one template,
pools, users, entitlements, and the HTTP app."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from deskpool.api.app import create_app
from deskpool.broker.accounts import AccountService
from deskpool.broker.entitlements import EntitlementService
from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.domain.users import Authenticator
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.registry import forget_fake_hosts, open_driver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService

PASSWORD = "correct-horse-1"


@dataclass
class BrokerWorld:
    ctx: ServiceContext
    fake: FakeDriver
    tokens: dict[str, str] = field(default_factory=dict)
    _app: FastAPI | None = None

    def pool(self, name: str = "lab", **kw: object) -> str:
        fields: dict[str, object] = {"name": name, "template": "golden", "spare": 2,
                                     "max_size": 4, "naming_pattern": f"{name}-{{n:02}}"}
        fields.update(kw)
        PoolService(self.ctx).create(PoolSpec(**fields))  # type: ignore[arg-type]
        return name

    def user(self, name: str, *, admin: bool = False, groups: tuple[str, ...] = (),
             entitled_to: tuple[str, ...] = ()) -> str:
        accounts = AccountService(self.ctx)
        accounts.create_user(name, PASSWORD, is_admin=admin)
        for group in groups:
            accounts.add_to_group(name, group)
        for pool in entitled_to:
            EntitlementService(self.ctx).grant(pool, "user", name)
        self.tokens[name] = accounts.issue_api_token(name, "tests").token
        return name

    def fill(self, passes: int = 3) -> None:
        reconciler = Reconciler(self.ctx, workers=4, ready_timeout_s=5)
        for _ in range(passes):
            reconciler.run_pass()

    def client(self, user: str | None = None,
               directories: Sequence[Authenticator] = ()) -> TestClient:
        """A client of this world's one app (as one broker process serves every user);
        an app of its own when directories are given."""
        if directories:
            app = create_app(self.ctx, directories=list(directories), console_ws_port=6080)
        else:
            if self._app is None:
                self._app = create_app(self.ctx, directories=[], console_ws_port=6080)
            app = self._app
        # As a browser on the portal's own page sends it: what the CSRF check wants of a
        # request made with the session cookie.
        client = TestClient(app, headers={"origin": "http://testserver"})
        if user is not None:
            client.headers["authorization"] = f"Bearer {self.tokens[user]}"
        return client


def make_world(tmp_path: Path, host_uri: str = "fake://broker",
               database_url: str | None = None) -> BrokerWorld:
    forget_fake_hosts()
    ctx = ServiceContext(Settings(data_dir=tmp_path / "data", database_url=database_url))
    HostService(ctx).add("h1", host_uri)
    disk = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(ctx).publish("golden", ImageFiles(disk=disk))
    fake = open_driver(host_uri)
    assert isinstance(fake, FakeDriver)
    return BrokerWorld(ctx=ctx, fake=fake)


@contextmanager
def lab_world(tmp_path: Path, database_url: str | None = None) -> Iterator[BrokerWorld]:
    """The usual API world: pool ``lab`` filled, ``alice`` entitled to it, admin ``root``."""
    world = make_world(tmp_path, database_url=database_url)
    world.pool("lab")
    world.user("alice", entitled_to=("lab",))
    world.user("root", admin=True)
    world.fill()
    try:
        yield world
    finally:
        world.ctx.close()
        forget_fake_hosts()


class ServerThread:
    """A real uvicorn server on a free loopback port, in a thread of this process (so the
    fake driver's in-memory VMs are the server's too)."""

    def __init__(self, app: object) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,  # type: ignore[arg-type]
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 10 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
