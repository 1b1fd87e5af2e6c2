"""RDP's way in, end to end on the fake driver: the portal's ``.rdp`` file, the broker's RDP
proxy (in a thread of this process) and a stand-in RDP server the desktop's forwarded RDP
port points at. The proxy admits a connection only with the file's ticket as the routing
token of its first packet, strips the token before the desktop sees the packet, spends the
ticket, and reports the console opening and closing to the session service. The one-time
password goes to the guest as a hash only.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import deskpool.broker.console as console
from deskpool.api.app import create_app
from deskpool.api.rdp_proxy import RdpProxyServer
from deskpool.broker.accounts import AccountService
from deskpool.broker.console import RdpAdmission
from deskpool.broker.entitlements import EntitlementService
from deskpool.config import Settings
from deskpool.domain.models import ConsoleAddress, ConsoleProtocol
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.agent import GuestAgent
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
CONFIRM = b"\x03\x00\x00\x13\x0e\xd0\x00\x00\x12\x34\x00\x02\x00\x08\x00\x01\x00\x00\x00"
NEG_REQ = b"\x01\x00\x08\x00\x03\x00\x00\x00"  # TLS | CredSSP, as xfreerdp asks


def request_with(token: bytes | None, rest: bytes = NEG_REQ) -> bytes:
    """An X.224 Connection Request as xfreerdp sends one for a ``loadbalanceinfo``."""
    variable = (token + b"\r\n" if token is not None else b"") + rest
    x224 = bytes([6 + len(variable), 0xE0, 0, 0, 0, 0, 0]) + variable
    return struct.pack(">BBH", 3, 0, 4 + len(x224)) + x224


class FakeRdp(LoopbackServer):
    """Keeps each connection's first packet, answers with a Connection Confirm, echoes."""

    def __init__(self) -> None:
        self.first_packets: list[bytes] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn, contextlib.suppress(OSError):
            head = conn.recv(4)
            length = struct.unpack(">H", head[2:4])[0]
            packet = head
            while len(packet) < length:
                packet += conn.recv(length - len(packet))
            self.first_packets.append(packet)
            conn.sendall(CONFIRM)
            conn.settimeout(None)
            while data := conn.recv(4096):
                conn.sendall(data)


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    forget_fake_hosts()
    context = ServiceContext(Settings(data_dir=tmp_path / "data"))
    HostService(context).add("h1", "fake://rdp")
    disk = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(context).publish("golden", ImageFiles(disk=disk))
    PoolService(context).create(PoolSpec(name="lab", template="golden", spare=2, max_size=2,
                                         naming_pattern="lab-{n:02}"))
    accounts = AccountService(context)
    for user in ("alice", "bob"):
        accounts.create_user(user, f"{user}-password-1")
        EntitlementService(context).grant("lab", "user", user)
        with context.uow() as uow:  # what a desktop-flavor hand-over allocates
            uow.linux_accounts.get_or_allocate(user, user)
            uow.commit()
    Reconciler(context, workers=1, ready_timeout_s=5).run_pass()
    yield context
    context.close()
    forget_fake_hosts()


@pytest.fixture()
def guest_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The guest's side of ``rdp-otp set`` (the fake guest runs no scripts): its argv."""
    calls: list[list[str]] = []

    def exec_capture(self: Any, argv: list[str], timeout_s: float = 30.0
                     ) -> tuple[int, str, str]:
        calls.append(argv)
        return 0, "", ""

    monkeypatch.setattr(GuestAgent, "exec_capture", exec_capture)
    return calls


@pytest.fixture()
def rdp(ctx: ServiceContext, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRdp]:
    """Every desktop's forwarded RDP port is the stand-in."""
    server = FakeRdp()
    fake = open_driver("fake://rdp")
    assert isinstance(fake, FakeDriver)
    real = fake.console_address

    def address(vm_id: uuid.UUID, protocol: ConsoleProtocol = ConsoleProtocol.VNC
                ) -> ConsoleAddress:
        if protocol is ConsoleProtocol.RDP:
            real(vm_id, protocol)  # the fake's own checks (a running VM)
            return ConsoleAddress("rdp", "127.0.0.1", server.port)
        return real(vm_id, protocol)

    monkeypatch.setattr(fake, "console_address", address)
    yield server
    server.close()


@pytest.fixture()
def proxy(ctx: ServiceContext) -> Iterator[int]:
    server = RdpProxyServer(RdpAdmission(ctx), "127.0.0.1", 0, recheck_s=0.2)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    yield server.port
    server.stop()
    serving.join(10)


def client_of(ctx: ServiceContext, proxy: int, user: str) -> TestClient:
    # The portal's own Origin, as a browser sends it with the session cookie.
    client = TestClient(create_app(ctx, directories=[], rdp_proxy_port=proxy),
                        headers={"origin": "http://testserver"})
    signed = client.post("/api/v1/auth/login", json={"username": user,
                                               "password": f"{user}-password-1"})
    assert signed.status_code == 200, signed.text
    return client


def connect(client: TestClient) -> str:
    answer = client.post("/api/v1/pools/lab/connect").json()
    assert answer["status"] == "ready", answer
    return str(answer["desktop_id"])


def rdp_file(client: TestClient, desktop_id: str) -> tuple[dict[str, str], str]:
    got = client.get(f"/api/v1/desktops/{desktop_id}/console.rdp")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("application/x-rdp")
    assert got.headers["cache-control"] == "no-store"
    fields = {}
    for line in got.text.split("\r\n"):
        if line:
            name, kind, value = line.split(":", 2)
            fields[name] = value
            assert kind in ("s", "i"), line
    return fields, got.headers["x-deskpool-rdp-password"]


class Session:
    """A TCP connection to the proxy that sends one first packet, as a client does."""

    def __init__(self, proxy: int, packet: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", proxy), timeout=5)
        self.sock.sendall(packet)

    def recv_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()


def state_of(ctx: ServiceContext, desktop_id: str) -> str:
    return DesktopService(ctx).get(desktop_id).state


def wait_for(done: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.05)


def test_the_rdp_file_opens_the_users_desktop_through_the_proxy_only(
    ctx: ServiceContext, rdp: FakeRdp, proxy: int, guest_calls: list[list[str]]
) -> None:
    alice = client_of(ctx, proxy, "alice")
    desktop_id = connect(alice)
    fields, password = rdp_file(alice, desktop_id)
    assert fields["full address"] == f"testserver:{proxy}"
    assert fields["username"] == "alice"
    token = fields["loadbalanceinfo"]
    assert len(token) >= 40 and len(password) >= 20
    # The guest got the password's hash only, for that account, for a few minutes.
    assert guest_calls == [["/bin/sh", "/usr/lib/deskpool/rdp-otp", "set", "alice",
                            hashlib.sha256(password.encode()).hexdigest(), "180"]]
    with ctx.uow(read_only=True) as uow:  # nor does the broker's database keep it
        assert password not in repr(uow.console_tickets.__dict__)

    with Session(proxy, request_with(token.encode())) as session:
        assert session.recv_exactly(len(CONFIRM)) == CONFIRM
        session.sock.sendall(b"tls hello")
        assert session.recv_exactly(9) == b"tls hello"
        # The desktop saw the request without the ticket, lengths rewritten, the rest kept.
        assert rdp.first_packets == [request_with(None)]
        assert token.encode() not in rdp.first_packets[0]
        wait_for(lambda: state_of(ctx, desktop_id) == "in_use", "the console counting as open")
    wait_for(lambda: state_of(ctx, desktop_id) == "idle", "the console counting as closed")


def test_the_proxy_refuses_without_a_valid_rdp_ticket(
    ctx: ServiceContext, rdp: FakeRdp, proxy: int, guest_calls: list[list[str]]
) -> None:
    alice = client_of(ctx, proxy, "alice")
    desktop_id = connect(alice)
    vnc_ticket = alice.post(f"/api/v1/desktops/{desktop_id}/console").json()["token"]
    fields, _ = rdp_file(alice, desktop_id)
    token = fields["loadbalanceinfo"].encode()
    lying = request_with(token)  # the real ticket in broken packets: refused, not spent
    refused = [
        request_with(None),  # no ticket
        request_with(b"Cookie: mstshash=alice"),  # a plain client's cookie, no ticket
        request_with(b"not-a-ticket"),
        request_with(vnc_ticket.encode()),  # another display's ticket
        b"GET / HTTP/1.1\r\n\r\n",  # not RDP
        b"\x03\x00\x04\x00" + b"\x00" * 1020,  # longer than any Connection Request
        lying[:4] + bytes([lying[4] + 1]) + lying[5:],  # an X.224 length that lies
        lying[:5] + b"\xf0" + lying[6:],  # a data packet, not a Connection Request
    ]
    for packet in refused:
        with Session(proxy, packet) as session:
            assert session.recv_exactly(1) == b"", packet  # closed, nothing said
    assert rdp.accepted == 0 and state_of(ctx, desktop_id) == "reserved"
    # The real ticket still works once, and only once.
    with Session(proxy, request_with(token)) as first:
        assert first.recv_exactly(len(CONFIRM)) == CONFIRM
        with Session(proxy, request_with(token)) as second:
            assert second.recv_exactly(1) == b""
    assert rdp.accepted == 1


def test_an_expired_ticket_and_another_users_are_refused(
    ctx: ServiceContext, rdp: FakeRdp, proxy: int, guest_calls: list[list[str]],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = client_of(ctx, proxy, "alice"), client_of(ctx, proxy, "bob")
    alices, bobs = connect(alice), connect(bob)
    # Bob cannot get a file for Alice's desktop, and his ticket opens only his own.
    assert bob.get(f"/api/v1/desktops/{alices}/console.rdp").status_code == 403
    fields, _ = rdp_file(bob, bobs)
    with Session(proxy, request_with(fields["loadbalanceinfo"].encode())) as session:
        assert session.recv_exactly(len(CONFIRM)) == CONFIRM
    assert rdp.accepted == 1
    assert state_of(ctx, alices) == "reserved"
    # A ticket past its minute opens nothing.
    fields, _ = rdp_file(alice, alices)
    later = datetime.now(UTC) + timedelta(minutes=2)
    monkeypatch.setattr(console, "utcnow", lambda: later)
    with Session(proxy, request_with(fields["loadbalanceinfo"].encode())) as session:
        assert session.recv_exactly(1) == b""
    assert rdp.accepted == 1


def test_a_desktop_given_back_refuses_its_ticket_and_cuts_its_connection(
    ctx: ServiceContext, rdp: FakeRdp, proxy: int, guest_calls: list[list[str]]
) -> None:
    alice = client_of(ctx, proxy, "alice")
    desktop_id = connect(alice)
    open_file, _ = rdp_file(alice, desktop_id)
    unused_file, _ = rdp_file(alice, desktop_id)
    with Session(proxy, request_with(open_file["loadbalanceinfo"].encode())) as session:
        assert session.recv_exactly(len(CONFIRM)) == CONFIRM
        assert alice.post(f"/api/v1/desktops/{desktop_id}/logoff").status_code == 200
        assert session.recv_exactly(1) == b""  # the proxy closed the open connection
    with Session(proxy, request_with(unused_file["loadbalanceinfo"].encode())) as late:
        assert late.recv_exactly(1) == b""
    assert rdp.accepted == 1


def test_no_rdp_file_without_a_proxy_or_an_account(
    ctx: ServiceContext, rdp: FakeRdp, guest_calls: list[list[str]]
) -> None:
    without_proxy = TestClient(create_app(ctx, directories=[]),
                               headers={"origin": "http://testserver"})
    assert without_proxy.post("/api/v1/auth/login", json={
        "username": "alice", "password": "alice-password-1"}).status_code == 200
    desktop_id = connect(without_proxy)
    got = without_proxy.get(f"/api/v1/desktops/{desktop_id}/console.rdp")
    assert got.status_code == 409 and "no RDP proxy" in got.json()["detail"]
    AccountService(ctx).create_user("carol", "carol-password-1")
    EntitlementService(ctx).grant("lab", "user", "carol")
    carol = client_of(ctx, 9, "carol")
    carols = connect(carol)
    got = carol.get(f"/api/v1/desktops/{carols}/console.rdp")
    assert got.status_code == 409 and "no account" in got.json()["detail"]
    assert guest_calls == []


def test_the_openapi_lists_the_rdp_file(ctx: ServiceContext) -> None:
    spec = TestClient(create_app(ctx, directories=[])).get("/openapi.json").json()
    route = spec["paths"]["/api/v1/desktops/{desktop_id}/console.rdp"]["get"]
    assert "application/x-rdp" in route["responses"]["200"]["content"]


def test_a_desktop_whose_rdp_server_is_starting_says_try_again(
    ctx: ServiceContext, rdp: FakeRdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(GuestAgent, "exec_capture",
                        lambda self, argv, timeout_s=30.0: (5, "", "xrdp is not running yet"))
    alice = client_of(ctx, 9, "alice")
    got = alice.get(f"/api/v1/desktops/{connect(alice)}/console.rdp")
    assert got.status_code == 503 and got.headers["retry-after"] == "30"
    assert "still starting" in got.json()["detail"]


def test_a_client_comes_back_on_its_ticket_within_the_reconnect_window(
    ctx: ServiceContext, rdp: FakeRdp, guest_calls: list[list[str]]
) -> None:
    """A live move ends the RDP connection; the client reconnects with the same routing
    token. The proxy takes it back once its connection closed a moment ago, with the same
    one-time password set in the guest again (the broker keeps only its hash); not while it
    is open, not after the window, not a ticket never used here."""
    server = RdpProxyServer(RdpAdmission(ctx), "127.0.0.1", 0, recheck_s=0.2)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        alice = client_of(ctx, server.port, "alice")
        desktop_id = connect(alice)
        fields, password = rdp_file(alice, desktop_id)
        unused, _ = rdp_file(alice, desktop_id)
        token = fields["loadbalanceinfo"].encode()
        digest = hashlib.sha256(password.encode()).hexdigest()
        with Session(server.port, request_with(token)) as first:
            assert first.recv_exactly(len(CONFIRM)) == CONFIRM
            with Session(server.port, request_with(token)) as twice:
                assert twice.recv_exactly(1) == b""  # open: no second connection
        wait_for(lambda: state_of(ctx, desktop_id) == "idle", "the connection closed")
        guest_calls.clear()
        with Session(server.port, request_with(token)) as back:
            assert back.recv_exactly(len(CONFIRM)) == CONFIRM
        assert rdp.accepted == 2
        assert guest_calls == [["/bin/sh", "/usr/lib/deskpool/rdp-otp", "set", "alice",
                                digest, "180"]]
        # Past the window, the spent ticket opens nothing.
        server.reconnect_window_s = 0.0
        time.sleep(0.05)
        with Session(server.port, request_with(token)) as late:
            assert late.recv_exactly(1) == b""
        # Nor does a ticket never connected here count as coming back (it is unused:
        # it opens once, as any).
        with Session(server.port, request_with(unused["loadbalanceinfo"].encode())) as new:
            assert new.recv_exactly(len(CONFIRM)) == CONFIRM
        assert rdp.accepted == 3
    finally:
        server.stop()
        serving.join(10)
