"""remote-viewer's way in, end to end on the fake driver: the portal's ``.vv`` file, the
broker's SPICE proxy (an HTTP CONNECT proxy, in a thread of this process) and a stand-in SPICE
server the desktop's SPICE display points at. The proxy admits a connection only with the
file's ticket as its credentials, sends it to the ticket's desktop whatever target the client
names, lets the client's other channels follow for a short while, and reports the console
opening and closing to the session service.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient

from deskpool.api.app import create_app
from deskpool.api.spice_proxy import SpiceProxyServer
from deskpool.broker.accounts import AccountService
from deskpool.broker.console import SpiceAdmission
from deskpool.broker.entitlements import EntitlementService
from deskpool.config import Settings
from deskpool.domain.models import ConsoleAddress, ConsoleProtocol
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.registry import forget_fake_hosts, open_driver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.loopback import LoopbackServer

pytestmark = pytest.mark.timeout(120)
SPICE_HELLO = b"REDQ"  # a SPICE link message starts with its magic


class FakeSpice(LoopbackServer):
    """Greets like a SPICE server, then echoes."""

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        with conn, contextlib.suppress(OSError):
            conn.sendall(SPICE_HELLO)
            while data := conn.recv(4096):
                conn.sendall(data)


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    forget_fake_hosts()
    context = ServiceContext(Settings(data_dir=tmp_path / "data"))
    HostService(context).add("h1", "fake://spice")
    disk = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(context).publish("golden", ImageFiles(disk=disk))
    PoolService(context).create(PoolSpec(name="lab", template="golden", spare=2, max_size=2,
                                         naming_pattern="lab-{n:02}"))
    accounts = AccountService(context)
    for user in ("alice", "bob"):
        accounts.create_user(user, f"{user}-password-1")
        EntitlementService(context).grant("lab", "user", user)
    Reconciler(context, workers=1, ready_timeout_s=5).run_pass()
    yield context
    context.close()
    forget_fake_hosts()


@pytest.fixture()
def spice(ctx: ServiceContext, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSpice]:
    """Every desktop's SPICE display is the stand-in (its VNC display stays the fake's)."""
    server = FakeSpice()
    fake = open_driver("fake://spice")
    assert isinstance(fake, FakeDriver)
    real = fake.console_address

    def address(vm_id: uuid.UUID, protocol: ConsoleProtocol = ConsoleProtocol.VNC
                ) -> ConsoleAddress:
        if protocol is ConsoleProtocol.SPICE:
            return ConsoleAddress("spice", "127.0.0.1", server.port)
        return real(vm_id, protocol)

    monkeypatch.setattr(fake, "console_address", address)
    yield server
    server.close()


@pytest.fixture()
def proxy(ctx: ServiceContext) -> Iterator[int]:
    server = SpiceProxyServer(SpiceAdmission(ctx), "127.0.0.1", 0, recheck_s=0.2)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    yield server.port
    server.stop()
    serving.join(10)


def client_of(ctx: ServiceContext, proxy: int, user: str) -> TestClient:
    # The portal's own Origin, as a browser sends it with the session cookie.
    client = TestClient(create_app(ctx, directories=[], spice_proxy_port=proxy),
                        headers={"origin": "http://testserver"})
    signed = client.post("/api/v1/auth/login", json={"username": user,
                                               "password": f"{user}-password-1"})
    assert signed.status_code == 200, signed.text
    return client


def connect(client: TestClient) -> str:
    answer = client.post("/api/v1/pools/lab/connect").json()
    assert answer["status"] == "ready", answer
    return str(answer["desktop_id"])


def viewer_file(client: TestClient, desktop_id: str) -> configparser.SectionProxy:
    got = client.get(f"/api/v1/desktops/{desktop_id}/console.vv")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("application/x-virt-viewer")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(got.text)
    return parser["virt-viewer"]


class Tunnel:
    """A CONNECT through the proxy, as remote-viewer sends it."""

    def __init__(self, proxy: int, credentials: str | None, target: str = "anything:5900"):
        self.sock = socket.create_connection(("127.0.0.1", proxy), timeout=5)
        head = f"CONNECT {target} HTTP/1.0\r\nHost: {target}\r\n"
        if credentials is not None:
            encoded = base64.b64encode(credentials.encode()).decode()
            head += f"Proxy-Authorization: Basic {encoded}\r\n"
        self.sock.sendall((head + "\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = self.sock.recv(1024)
            if not chunk:
                break
            answer += chunk
        head_bytes, _, self.pending = answer.partition(b"\r\n\r\n")
        self.status = head_bytes.split(b"\r\n", 1)[0]

    def recv(self, n: int) -> bytes:
        """``n`` bytes from the far end (fewer only when it closed)."""
        while len(self.pending) < n:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.pending += chunk
        data, self.pending = self.pending[:n], self.pending[n:]
        return data

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()


def credentials_of(vv: configparser.SectionProxy) -> str:
    proxy = urlparse(vv["proxy"])
    return f"{proxy.username}:{proxy.password}"


def state_of(ctx: ServiceContext, desktop_id: str) -> str:
    return DesktopService(ctx).get(desktop_id).state


def wait_for(done: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.05)


def test_the_vv_file_opens_the_users_desktop_through_the_proxy_only(
    ctx: ServiceContext, spice: FakeSpice, proxy: int
) -> None:
    alice = client_of(ctx, proxy, "alice")
    desktop_id = connect(alice)
    vv = viewer_file(alice, desktop_id)
    # The file names the proxy with a ticket, and a display password set on the VM for the
    # ticket's minute.
    assert vv["type"] == "spice" and vv["delete-this-file"] == "1"
    assert urlparse(vv["proxy"]).port == proxy
    fake = open_driver("fake://spice")
    assert isinstance(fake, FakeDriver)
    password, until = fake.console_password(uuid.UUID(desktop_id), ConsoleProtocol.SPICE) \
        or ("", datetime.min.replace(tzinfo=UTC))
    assert password == vv["password"] and len(password) >= 20
    assert timedelta(0) < until - datetime.now(UTC) <= timedelta(seconds=61)

    with Tunnel(proxy, credentials_of(vv), target="10.0.0.9:22") as main:  # target ignored
        assert main.status.startswith(b"HTTP/1.1 200")
        assert main.recv(4) == SPICE_HELLO
        main.sock.sendall(b"ping")
        assert main.recv(4) == b"ping"
        wait_for(lambda: state_of(ctx, desktop_id) == "in_use", "the console counting as open")
        # The client's other channels follow on the same ticket...
        with Tunnel(proxy, credentials_of(vv)) as display:
            assert display.status.startswith(b"HTTP/1.1 200")
            assert display.recv(4) == SPICE_HELLO
        assert state_of(ctx, desktop_id) == "in_use"
    # ...and closing the first closes the console for the session service.
    wait_for(lambda: state_of(ctx, desktop_id) == "idle", "the console counting as closed")


def test_the_proxy_refuses_anyone_without_a_valid_spice_ticket(
    ctx: ServiceContext, spice: FakeSpice, proxy: int
) -> None:
    alice = client_of(ctx, proxy, "alice")
    desktop_id = connect(alice)
    vnc_ticket = alice.post(f"/api/v1/desktops/{desktop_id}/console").json()["token"]
    for credentials in (None, "deskpool:not-a-ticket", f"deskpool:{vnc_ticket}",
                        f"someone:{vnc_ticket}"):
        with Tunnel(proxy, credentials) as refused:
            assert refused.status.startswith(b"HTTP/1.1 407"), (credentials, refused.status)
    # Not CONNECT: no tunnel, whatever the credentials.
    vv = viewer_file(alice, desktop_id)
    with socket.create_connection(("127.0.0.1", proxy), timeout=5) as plain:
        auth = base64.b64encode(credentials_of(vv).encode()).decode()
        plain.sendall(f"GET http://x/ HTTP/1.0\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
                      .encode())
        assert plain.recv(64).startswith(b"HTTP/1.1 407")
    assert state_of(ctx, desktop_id) == "reserved"  # nothing was opened


def test_an_expired_ticket_and_another_users_desktop_are_refused(
    ctx: ServiceContext, spice: FakeSpice, proxy: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = client_of(ctx, proxy, "alice"), client_of(ctx, proxy, "bob")
    alices = connect(alice)
    connect(bob)
    # Bob cannot get a file for Alice's desktop.
    assert bob.get(f"/api/v1/desktops/{alices}/console.vv").status_code == 403
    # A ticket past its minute opens nothing.
    vv = viewer_file(alice, alices)
    import deskpool.broker.console as console

    later = datetime.now(UTC) + timedelta(minutes=2)
    monkeypatch.setattr(console, "utcnow", lambda: later)
    with Tunnel(proxy, credentials_of(vv)) as refused:
        assert refused.status.startswith(b"HTTP/1.1 407")


def test_a_channel_long_after_the_first_and_a_desktop_given_back_are_cut(
    ctx: ServiceContext, spice: FakeSpice, proxy: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = client_of(ctx, proxy, "alice")
    desktop_id = connect(alice)
    vv = viewer_file(alice, desktop_id)
    with Tunnel(proxy, credentials_of(vv)) as main:
        assert main.status.startswith(b"HTTP/1.1 200")
        import deskpool.broker.console as console

        now = console.utcnow
        later = datetime.now(UTC) + timedelta(minutes=5)
        monkeypatch.setattr(console, "utcnow", lambda: later)
        with Tunnel(proxy, credentials_of(vv)) as late:
            assert late.status.startswith(b"HTTP/1.1 407")  # a stolen file is no use later
        monkeypatch.setattr(console, "utcnow", now)
        assert alice.post(f"/api/v1/desktops/{desktop_id}/logoff").status_code == 200
        assert main.recv(4) == SPICE_HELLO
        assert main.recv(1) == b""  # the proxy closed the open channel


def test_a_connected_client_follows_its_desktops_live_move_and_nothing_else(
    ctx: ServiceContext, spice: FakeSpice, proxy: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a live move takes the desktop to host h2, QEMU sends the connected client to
    the display there: the proxy admits the client's channels to that one address on the
    spent ticket, while a channel of the ticket is open; no other address, and not once the
    client has gone."""
    HostService(ctx).add("h2", "fake://spice2")
    there = FakeSpice()
    target = open_driver("fake://spice2")

    def address(vm_id: uuid.UUID, protocol: ConsoleProtocol = ConsoleProtocol.VNC
                ) -> ConsoleAddress:  # the VM's display on h2, as the move makes it there
        return ConsoleAddress("spice", "127.0.0.1", there.port)

    monkeypatch.setattr(target, "console_address", address)
    alice = client_of(ctx, proxy, "alice")
    desktop_id = connect(alice)
    vv = viewer_file(alice, desktop_id)
    moving_to = f"127.0.0.1:{there.port}"
    try:
        with Tunnel(proxy, credentials_of(vv)) as main:
            assert main.recv(4) == SPICE_HELLO
            import deskpool.broker.console as console

            later = datetime.now(UTC) + timedelta(minutes=5)
            monkeypatch.setattr(console, "utcnow", lambda: later)
            # Minutes later, no move: the client's address is no way in.
            with Tunnel(proxy, credentials_of(vv), target=moving_to) as early:
                assert early.status.startswith(b"HTTP/1.1 407")
            with ctx.uow() as uow:
                h2 = uow.hosts.get_by_name("h2")
                uow.desktops.set_moving_to(uuid.UUID(desktop_id), h2.id)
                uow.commit()
            with Tunnel(proxy, credentials_of(vv), target=moving_to) as followed:
                assert followed.status.startswith(b"HTTP/1.1 200")
                assert followed.recv(4) == SPICE_HELLO and there.accepted == 1
            # Anywhere else, even the display where it runs now, stays closed so late.
            for other in ("127.0.0.1:22", f"127.0.0.1:{spice.port}", "anything:5900"):
                with Tunnel(proxy, credentials_of(vv), target=other) as refused:
                    assert refused.status.startswith(b"HTTP/1.1 407"), other
        wait_for(lambda: state_of(ctx, desktop_id) == "idle", "the client gone")
        # The client gone, its ticket follows nothing.
        with Tunnel(proxy, credentials_of(vv), target=moving_to) as gone:
            assert gone.status.startswith(b"HTTP/1.1 407")
        assert there.accepted == 1
    finally:
        there.close()
