"""A real guest, seen as a user's native client and the session watch see it.

* ``deskpool client console`` bridges a local port over the broker's console proxy: a plain
  RFB client there speaks with the guest's QEMU, whose desktop name is the VM's.
* A user logging in at the guest's own console (an autologin getty on tty2, as a desktop
  session manager would log them in) is seen through the guest agent (``guest-get-users``,
  ``who -u``), and logging out there logs the broker's session off and applies the pool's
  recycle policy."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deskpool.api.app import create_app
from deskpool.api.console_proxy import ConsoleProxyServer
from deskpool.broker.accounts import AccountService
from deskpool.broker.sessions import SessionService
from deskpool.cli import client as client_module
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.events import recent_events
from deskpool.services.pools import PoolService
from tests.broker_world import ServerThread
from tests.console_viewer import start_console_tunnel, viewer_connection
from tests.pool_users import PoolUsers
from tests.realvm.conftest import TEMPLATE

pytestmark = pytest.mark.realvm
POOL = "sess"
GUEST_USER = "alice"
# A runtime drop-in (under /run: gone at the next boot) that logs GUEST_USER in on tty2.
AUTOLOGIN = (
    "set -e; id {user} >/dev/null 2>&1 || useradd -m -s /bin/sh {user}; "
    "mkdir -p /run/systemd/system/getty@tty2.service.d; "
    "printf '[Service]\\nExecStart=\\nExecStart=-/sbin/agetty --autologin {user} --noclear "
    "%%I linux\\n' > /run/systemd/system/getty@tty2.service.d/autologin.conf; "
    "systemctl daemon-reload; systemctl start getty@tty2.service"
)

# The image has no procps: the session's login(1) is found by its utmp entry (`who -u`), and
# a hang-up to it ends the shell and the session, as a closed terminal would.
LOGOUT = (
    "set -e; rm -f /run/systemd/system/getty@tty2.service.d/autologin.conf; "
    "systemctl daemon-reload; "
    "who -u | while read -r name line day clock idle pid rest; do "
    "[ \"$name\" = {user} ] && kill -HUP \"$pid\"; done; true"
)


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 120,
               diagnose: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}"
                                 + (f"; {diagnose()}" if diagnose else ""))
        time.sleep(1)


@pytest.fixture(scope="module")
def pool(real_ctx: ServiceContext) -> Iterator[str]:
    PoolService(real_ctx).create(PoolSpec(POOL, TEMPLATE, spare=1, max_size=1,
                                          naming_pattern="sess-{n:02}"))
    reconciler = Reconciler(real_ctx, workers=2, ready_timeout_s=240)

    def ready() -> bool:
        report = reconciler.run_pass()
        assert not report.errors, report.errors
        return any(d.state == "ready" for d in DesktopService(real_ctx).list()
                   if d.name.startswith("sess-"))

    wait_until(ready, "the pool's desktop to be ready", timeout_s=400)
    yield POOL
    PoolService(real_ctx).resize(POOL, min_size=0, spare=0)
    for desktop in DesktopService(real_ctx).list():
        if desktop.name.startswith("sess-"):
            DesktopService(real_ctx).delete(str(desktop.id))


def rfb_desktop_name(port: int) -> str:
    """A minimal RFB 3.8 client on ``port``: version, security "None", ClientInit; returns
    the desktop name in the server's ServerInit."""
    sock = viewer_connection(port)

    def take(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, f"the console closed after {data!r}"
            data += chunk
        return data

    with sock:
        assert take(12) == b"RFB 003.008\n"
        sock.sendall(b"RFB 003.008\n")
        types = take(take(1)[0])
        assert 1 in types, types  # "None": the proxy's ticket was the authentication
        sock.sendall(b"\x01")
        assert take(4) == b"\x00\x00\x00\x00"
        sock.sendall(b"\x01")  # ClientInit, shared
        width, height = struct.unpack(">HH", take(4))
        assert width > 0 and height > 0
        take(16)  # pixel format
        return take(struct.unpack(">I", take(4))[0]).decode()


def test_a_native_client_reaches_the_real_guest_through_the_broker(
    real_ctx: ServiceContext, pool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = PoolUsers(real_ctx, pool, ready_timeout_s=120)
    users.entitle("nina")
    AccountService(real_ctx).create_user("nina", "password-123")
    desktop_id = users.connect("nina")
    name = DesktopService(real_ctx).get(str(desktop_id)).name
    monkeypatch.setattr(client_module, "CONFIG", tmp_path / "config")
    proxy = ConsoleProxyServer(real_ctx, "127.0.0.1", 0)
    serving = threading.Thread(target=proxy.serve_forever, daemon=True)
    serving.start()
    try:
        app = create_app(real_ctx, console_ws_port=proxy.port, directories=[])
        with ServerThread(app) as server:
            client_module.login(server.url, "nina", password="password-123")
            tunnel, port = start_console_tunnel(name)
            assert name in rfb_desktop_name(port)  # QEMU names the VNC desktop after the VM
            tunnel.join(30)
            assert not tunnel.is_alive()
    finally:
        proxy.stop()
        serving.join(10)
    wait_until(lambda: DesktopService(real_ctx).get(str(desktop_id)).state == "idle",
               "the desktop going idle once the viewer left")
    assert users.log_off(desktop_id, "nina") in ("recycling", "ready")
    reconciler = Reconciler(real_ctx, workers=2, ready_timeout_s=240)
    wait_until(lambda: not reconciler.run_pass().errors and DesktopService(real_ctx).get(
        str(desktop_id)).state == "ready", "the desktop recycled for the next test", 300)


def test_a_login_and_logout_in_the_real_guest_drive_the_session(
    real_ctx: ServiceContext, pool: str
) -> None:
    users = PoolUsers(real_ctx, pool, ready_timeout_s=120)
    users.entitle(GUEST_USER)
    desktop_id = users.connect(GUEST_USER)
    users.open_console(desktop_id, GUEST_USER)
    name = DesktopService(real_ctx).get(str(desktop_id)).name
    agent = GuestAgent(real_ctx.driver_for_name("local"), desktop_id)
    sessions = SessionService(real_ctx, guest_poll_s=0)
    assert agent.users() == []
    assert sessions.run_timers().guest_logins == []

    code, _out, err = agent.exec_capture(["/bin/sh", "-c", AUTOLOGIN.format(user=GUEST_USER)])
    assert code == 0, err
    wait_until(lambda: agent.users() == [GUEST_USER], "the guest to list the logged-in user")
    idle = agent.idle_seconds()
    assert idle is not None and 0 <= idle < 60  # `who -u` in the guest: just logged in

    report = sessions.run_timers()
    assert report.guest_logins == [name]
    assert DesktopService(real_ctx).get(str(desktop_id)).state == "in_use"
    assert any(e.kind == "guest-login" and e.desktop == name for e in recent_events(real_ctx))

    # The user logs out: their shell ends (as a hang-up would end it), login(1) closes the
    # session, and with the drop-in gone the getty that comes back logs nobody in.
    code, _out, err = agent.exec_capture(["/bin/sh", "-c", LOGOUT.format(user=GUEST_USER)])
    assert code == 0, err
    wait_until(lambda: agent.users() == [], "the guest to list nobody once the user left",
               diagnose=lambda: agent.exec_capture(["who", "-a"])[1])
    report = sessions.run_timers()
    assert report.logged_off == [name]
    # The pool's default on-logout policy: recycle (revert to the factory snapshot).
    assert DesktopService(real_ctx).get(str(desktop_id)).state in ("recycling", "ready")
    assert any(e.kind == "logged-off" and "logged out in the guest" in e.message
               for e in recent_events(real_ctx))
