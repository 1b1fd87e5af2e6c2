"""The browser console proxy end to end: a real ticket, a real websockify server (in a thread
of this process, so it sees the fake hypervisor), a WebSocket client, and a stand-in VNC
server the desktop's console address points at. The command-line entry runs as a subprocess.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from deskpool.api.app import create_app
from deskpool.api.console_proxy import ConsoleProxyServer
from deskpool.broker.accounts import AccountService
from deskpool.broker.console import ConsoleTickets
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker
from deskpool.broker.sessions import SessionService
from deskpool.cli import client as client_module
from deskpool.config import Settings
from deskpool.domain.errors import NotFound
from deskpool.domain.models import ConsoleAddress
from deskpool.domain.pools import PoolSpec
from deskpool.domain.users import Identity
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.registry import forget_fake_hosts, open_driver
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.broker_world import ServerThread
from tests.console_viewer import start_console_tunnel, viewer_connection
from tests.loopback import LoopbackServer

pytestmark = pytest.mark.timeout(120)
RFB_HELLO = b"RFB 003.008\n"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ALICE = Identity(name="alice", display_name="Alice", source="local")


class FakeVnc(LoopbackServer):
    """Greets like a VNC server, then echoes; counts the connections it accepted."""

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        with conn, contextlib.suppress(OSError):
            conn.sendall(RFB_HELLO)
            while data := conn.recv(4096):
                conn.sendall(data)


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    forget_fake_hosts()
    context = ServiceContext(Settings(data_dir=tmp_path / "data",
                                      console_allowed_origins=["VDI.example.com"]))
    HostService(context).add("h1", "fake://console")
    disk = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    TemplateService(context).publish("golden", ImageFiles(disk=disk))
    PoolService(context).create(PoolSpec(name="lab", template="golden", spare=1, max_size=2,
                                         naming_pattern="lab-{n:02}"))
    EntitlementService(context).grant("lab", "user", "alice")
    Reconciler(context, workers=1, ready_timeout_s=5).run_pass()
    yield context
    context.close()
    forget_fake_hosts()


@pytest.fixture()
def vnc() -> Iterator[FakeVnc]:
    server = FakeVnc()
    yield server
    server.close()


@pytest.fixture()
def desktop_id(ctx: ServiceContext, vnc: FakeVnc, monkeypatch: pytest.MonkeyPatch) -> uuid.UUID:
    """Alice's reserved desktop, whose console is the stand-in VNC server.

    The one stand-in: the fake driver's ``console_address`` names a port nobody listens on
    (and real VMs on this machine may hold 5900+), so it is pointed at ``vnc``."""
    handover = Broker(ctx, ready_timeout_s=5).connect(ALICE, "lab")
    assert handover.status == "ready" and handover.desktop_id is not None
    fake = open_driver("fake://console")
    assert isinstance(fake, FakeDriver)
    monkeypatch.setattr(fake, "console_address",
                        lambda vm_id, *_: ConsoleAddress("vnc", "127.0.0.1", vnc.port))
    assert state_of(ctx, handover.desktop_id) == "reserved"
    return handover.desktop_id


@pytest.fixture()
def proxy(ctx: ServiceContext) -> Iterator[int]:
    # Rechecks (and pings) every 0.2 s: open consoles see a log-off quickly; pings are harmless.
    server = ConsoleProxyServer(ctx, "127.0.0.1", 0, recheck_s=0.2)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    yield server.port
    server.stop()
    serving.join(10)


def state_of(ctx: ServiceContext, desktop_id: uuid.UUID) -> str:
    return DesktopService(ctx).get(str(desktop_id)).state


def connections_of(ctx: ServiceContext, desktop_id: uuid.UUID) -> int:
    with ctx.uow(read_only=True) as uow:
        return uow.desktops.get(desktop_id).console_connections


def wait_for_state(ctx: ServiceContext, desktop_id: uuid.UUID, state: str) -> None:
    deadline = time.monotonic() + 10
    while state_of(ctx, desktop_id) != state:
        assert time.monotonic() < deadline, f"still {state_of(ctx, desktop_id)}, not {state}"
        time.sleep(0.05)


class Browser:
    """A minimal RFC 6455 client doing what noVNC does: a WebSocket to the proxy, the ticket in
    the query string. (websockify's own ``WebSocket.connect`` drops the query string and leaves
    a frame that arrives with the handshake undecoded, so it cannot stand in for a browser.)"""

    def __init__(self, port: int, query: str, origin: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        key = base64.b64encode(os.urandom(16)).decode()
        origin_line = f"Origin: {origin}\r\n" if origin is not None else ""
        self.sock.sendall((f"GET /?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{origin_line}"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._read()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status, *lines = head.decode().split("\r\n")
        assert status.startswith("HTTP/1.1 101"), head
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        digest = hashlib.sha1(f"{key}{WS_GUID}".encode()).digest()
        assert headers["sec-websocket-accept"] == base64.b64encode(digest).decode()
        self.close_code: int | None = None
        self.close_reason = ""

    def _read(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the proxy closed the TCP connection without a WebSocket close")
        return data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += self._read()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def receive(self) -> bytes | None:
        """The next data message, or None once the proxy closed the WebSocket."""
        while True:
            first, second = self._take(2)
            length = second & 0x7F
            if length >= 126:
                length = int.from_bytes(self._take(2 if length == 126 else 8), "big")
            payload, opcode = self._take(length), first & 0x0F
            if opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if payload else None
                self.close_reason = payload[2:].decode()
                return None
            if opcode in (0x1, 0x2):
                return payload  # websockify sends every message in one frame

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        mask = os.urandom(4)
        n = len(payload)
        size = (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
                if n < 65536 else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        self.sock.sendall(bytes([0x80 | opcode]) + size + mask
                          + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close as a browser closing its tab does: a close frame, then wait for the reply."""
        self.send(code.to_bytes(2, "big") + reason.encode(), opcode=0x8)
        while self.receive() is not None:
            pass
        self.sock.close()


def assert_refused(port: int, query: str, reason: str = "console ticket refused",
                   origin: str | None = None) -> None:
    browser = Browser(port, query, origin)
    assert browser.receive() is None
    assert (browser.close_code, browser.close_reason) == (1008, reason)
    browser.sock.close()


def test_a_ticket_opens_the_console_once_and_the_session_follows(
    ctx: ServiceContext, vnc: FakeVnc, desktop_id: uuid.UUID, proxy: int
) -> None:
    ticket = ConsoleTickets(ctx).issue(ALICE, desktop_id)
    # A client naming its own target is ignored: only the ticket decides.
    browser = Browser(proxy, f"token={ticket.token}&host=10.0.0.1&port=22")
    assert browser.receive() == RFB_HELLO
    browser.send(b"client init")
    assert browser.receive() == b"client init"
    assert vnc.accepted == 1
    wait_for_state(ctx, desktop_id, "in_use")
    assert connections_of(ctx, desktop_id) == 1

    browser.close()
    wait_for_state(ctx, desktop_id, "idle")
    assert connections_of(ctx, desktop_id) == 0

    assert_refused(proxy, f"token={ticket.token}")  # used once already
    assert vnc.accepted == 1
    assert state_of(ctx, desktop_id) == "idle"


def test_logging_off_closes_the_open_console(
    ctx: ServiceContext, vnc: FakeVnc, desktop_id: uuid.UUID, proxy: int
) -> None:
    browser = Browser(proxy, f"token={ConsoleTickets(ctx).issue(ALICE, desktop_id).token}")
    assert browser.receive() == RFB_HELLO
    wait_for_state(ctx, desktop_id, "in_use")
    SessionService(ctx).log_off(desktop_id, by=None, reason="idle for too long")
    assert browser.receive() is None
    assert (browser.close_code, browser.close_reason) == (1008, "the desktop is no longer yours")
    browser.sock.close()
    assert connections_of(ctx, desktop_id) == 0


def test_garbage_missing_and_expired_tickets_are_refused(
    ctx: ServiceContext, vnc: FakeVnc, desktop_id: uuid.UUID, proxy: int
) -> None:
    assert_refused(proxy, "token=not-a-ticket")
    assert_refused(proxy, "")
    expired = ConsoleTickets(ctx, ttl=timedelta(seconds=-1)).issue(ALICE, desktop_id)
    assert_refused(proxy, f"token={expired.token}")
    assert vnc.accepted == 0
    assert state_of(ctx, desktop_id) == "reserved"


def test_a_ticket_for_a_desktop_no_longer_held_is_refused(
    ctx: ServiceContext, vnc: FakeVnc, desktop_id: uuid.UUID, proxy: int
) -> None:
    ticket = ConsoleTickets(ctx).issue(ALICE, desktop_id)
    SessionService(ctx).log_off(desktop_id, by=None, reason="logged off before the console")
    assert_refused(proxy, f"token={ticket.token}")
    assert vnc.accepted == 0


def test_a_page_of_another_site_cannot_open_a_console_with_a_ticket(
    ctx: ServiceContext, vnc: FakeVnc, desktop_id: uuid.UUID, proxy: int
) -> None:
    ticket = ConsoleTickets(ctx).issue(ALICE, desktop_id)
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example:8000",
                   "file:///tmp/page.html"):
        assert_refused(proxy, f"token={ticket.token}",
                       "console refused: the page is from another site", origin=origin)
    assert vnc.accepted == 0
    # Refusing them did not spend the ticket: the portal's own page (same host name as the
    # proxy, another port) opens the console with it.
    browser = Browser(proxy, f"token={ticket.token}", origin="http://127.0.0.1:8000")
    assert browser.receive() == RFB_HELLO
    browser.close()
    assert vnc.accepted == 1


def test_a_page_of_an_allowed_origin_opens_a_console(
    ctx: ServiceContext, vnc: FakeVnc, desktop_id: uuid.UUID, proxy: int
) -> None:
    ticket = ConsoleTickets(ctx).issue(ALICE, desktop_id)
    browser = Browser(proxy, f"token={ticket.token}", origin="https://vdi.example.com")
    assert browser.receive() == RFB_HELLO
    browser.close()
    assert vnc.accepted == 1


def test_stopping_the_proxy_closes_open_consoles_and_records_it(
    ctx: ServiceContext, vnc: FakeVnc, desktop_id: uuid.UUID
) -> None:
    server = ConsoleProxyServer(ctx, "127.0.0.1", 0)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    browser = Browser(server.port,
                      f"token={ConsoleTickets(ctx).issue(ALICE, desktop_id).token}")
    assert browser.receive() == RFB_HELLO
    wait_for_state(ctx, desktop_id, "in_use")
    server.stop()
    serving.join(10)
    assert browser.receive() is None
    assert (browser.close_code, browser.close_reason) == (1001, "the console proxy is stopping")
    assert state_of(ctx, desktop_id) == "idle"


def test_the_command_runs_in_the_foreground_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(tmp_path / "data")}
    env.pop("DESKPOOL_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "deskpool.api.console_proxy",
                             "--listen", "127.0.0.1:0"], env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        while not any("console proxy listening on" in line for line in lines):
            line = proc.stderr.readline()
            assert line, f"the proxy exited: {''.join(lines)}"
            lines.append(line)
        port = int(lines[-1].rsplit(":", 1)[1])
        assert_refused(port, "token=forged")  # it answers, from its own database
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        rest = proc.stderr.read()
        assert "console refused for 127.0.0.1" in "".join(lines) + rest
        assert "forged" not in "".join(lines) + rest  # tickets stay out of the log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_native_viewer_reaches_the_console_through_the_client_tunnel(
    ctx: ServiceContext, vnc: FakeVnc, desktop_id: uuid.UUID, proxy: int, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """``deskpool client console``: a local port a VNC viewer connects to, bridged over the
    broker's proxy with a ticket of its own; the session follows as for the browser."""
    monkeypatch.setattr(client_module, "CONFIG", tmp_path / "config")
    AccountService(ctx).create_user("alice", "password-123")
    name = DesktopService(ctx).get(str(desktop_id)).name
    with ServerThread(create_app(ctx, console_ws_port=proxy, directories=[])) as server:
        client_module.login(server.url, "alice", password="password-123")
        tunnel, port = start_console_tunnel(name)
        viewer = viewer_connection(port)
        with viewer:
            assert viewer.recv(64) == RFB_HELLO
            viewer.sendall(b"client init")
            assert viewer.recv(64) == b"client init"
            wait_for_state(ctx, desktop_id, "in_use")
        tunnel.join(10)
        assert not tunnel.is_alive()
        with pytest.raises(NotFound, match="no desktop named 'nope'"):
            client_module.console("nope", port=0, once=True)
    wait_for_state(ctx, desktop_id, "idle")
    assert vnc.accepted == 1
    printed = capsys.readouterr().out
    assert f"console of {name}: point a VNC viewer at 127.0.0.1:{port}" in printed
    assert f"console of {name} ended" in printed
