"""The whole way on a real desktop-flavor VM, in headless Chromium: a user signs in to the
portal, presses Connect and sees their own Xfce desktop in noVNC (not a text console: the
canvas's pixels and a screenshot); inside the guest ``session-hook status`` shows their
active x11 session on the display and a file they make is owned by their uid. Then they log
out from inside the session as the desktop's menu does (``xfce4-session-logout``): the
broker's session timers see the graphical session end, log them off and the pool recycles
the desktop (revert to its factory snapshot). A second user connects, gets that same
desktop (the pool has one) and finds nothing of the first: no account, no home, no file.

One desktop, booted twice (made, then recycled): TCG is slow, so the waits are generous and
nothing is timed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from deskpool.api.app import create_app
from deskpool.broker.accounts import AccountService
from deskpool.broker.desktop_session import SESSION_HOOK, GuestSession, parse_status
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.sessions import SessionService
from deskpool.config import Settings
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.images.builder import GuestImage
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from deskpool.services.templates import ImageFiles, TemplateService
from tests.browser.conftest import (
    CANVAS_STATS,
    LiveServer,
    launch_chromium,
    sign_in,
    skip_or_fail_without_chromium,
    wait_until,
)
from tests.native_clients import stop
from tests.realvm.conftest import remove_pool_of
from tests.realvm.screens import decode_png

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.realvm, pytest.mark.timeout(2400)]
TEMPLATE, POOL = "xfce-portal", "portal"
FIRST, SECOND, PASSWORD = "ada", "ben", "portal-desktop-1"
CONNECT_MS = 420_000  # the Connect answer comes once the user's session runs (TCG)
READY_S = 600.0  # a desktop-flavor VM made or recycled to ready under TCG, with room
PROOF = f"/home/{FIRST}/proof-of-{FIRST}.txt"


@dataclass
class Portal:
    ctx: ServiceContext
    agent: GuestAgent
    shots: Path


def _ready(ctx: ServiceContext, reconciler: Reconciler, what: str) -> str:
    deadline = time.monotonic() + READY_S
    while True:
        ready = [d for d in DesktopService(ctx).list() if d.state == "ready"]
        if ready:
            return ready[0].name
        assert time.monotonic() < deadline, f"{what}: no desktop ready in {READY_S:g} s"
        report = reconciler.run_pass()
        assert not report.errors, report.errors
        time.sleep(1)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def portal(desktop_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Portal]:
    root = tmp_path_factory.mktemp("desktop-portal")
    ctx = ServiceContext(Settings(data_dir=root / "data"))
    try:
        HostService(ctx).add("local", "qemu:///system", storage_dir=root / "pool")
        TemplateService(ctx).publish(
            TEMPLATE, ImageFiles.from_guest_image(desktop_image),
            recipe_hash=desktop_image.recipe_hash, memory_mib=desktop_image.memory_mib,
            arch="x86_64")
        # One desktop, recycled (reverted) when its user logs out: the second user gets it.
        PoolService(ctx).create(PoolSpec(POOL, TEMPLATE, spare=1, max_size=1,
                                         naming_pattern=f"{POOL}-{{n:02}}",
                                         session_start_timeout_s=300))
        accounts = AccountService(ctx)
        for user in (FIRST, SECOND):
            accounts.create_user(user, PASSWORD)
            EntitlementService(ctx).grant(POOL, "user", user)
        try:
            name = _ready(ctx, Reconciler(ctx, workers=1, ready_timeout_s=240), "made")
            desktop = DesktopService(ctx).get(name)
            yield Portal(ctx, GuestAgent(ctx.driver_for_name("local"), desktop.id,
                                         command_timeout_s=30),
                         tmp_path_factory.mktemp("portal-shots"))
        finally:
            PoolService(ctx).resize(POOL, min_size=0, spare=0)
            for d in DesktopService(ctx).list():
                DesktopService(ctx).delete(str(d.id))
    finally:
        ctx.close()
        remove_pool_of(root / "pool")


@pytest.fixture(scope="module")
def console_proxy(portal: Portal, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """``python -m deskpool.api.console_proxy`` on a free port, on the test's database."""
    port, logs = _free_port(), tmp_path_factory.mktemp("portal-proxy")
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(portal.ctx.settings.data_dir)}
    if portal.ctx.settings.database_url:
        env["DESKPOOL_DATABASE_URL"] = portal.ctx.settings.database_url
    with (logs / "console-proxy.log").open("wb") as log:
        proxy = subprocess.Popen([sys.executable, "-m", "deskpool.api.console_proxy",
                                  "--listen", f"127.0.0.1:{port}"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            def listening() -> bool:
                assert proxy.poll() is None, (logs / "console-proxy.log").read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
                return True

            wait_until(listening, timeout_s=60, what="the console proxy listening")
            yield port
        finally:
            stop(proxy)
            print(f"console proxy log: {logs / 'console-proxy.log'}")


def _run(agent: GuestAgent, argv: list[str]) -> str:
    code, out, err = agent.exec_capture(argv, timeout_s=60)
    assert code == 0, (argv, code, out, err)
    return out


def _status(agent: GuestAgent) -> list[GuestSession]:
    return parse_status(_run(agent, ["/bin/sh", SESSION_HOOK, "status"]))


def _uid(ctx: ServiceContext, user: str) -> int:
    with ctx.uow(read_only=True) as uow:
        found = uow.linux_accounts.find(user)
    assert found is not None and found[0] == user, found
    return found[1]


def _canvas(page: Page) -> dict[str, float]:
    stats: dict[str, float] = page.locator("#console-screen canvas").evaluate(CANVAS_STATS)
    return stats


def _xfce_drawn(page: Page) -> bool:
    """A desktop, not a text console: a graphical size, many colours (icons, anti-aliased
    text) and mostly lit (Xfce's backdrop; a console is mostly black)."""
    s = _canvas(page)
    return s["width"] >= 1024 and s["colours"] >= 64 and s["lit"] > 0.5


def _connect_and_see_the_desktop(page: Page, url: str, user: str, shot: Path) -> str:
    sign_in(page, url, user, PASSWORD)
    from playwright.sync_api import expect

    pool = page.locator(f'#pools li[data-pool="{POOL}"]')
    expect(pool).to_be_visible()
    started = time.monotonic()
    pool.locator("button.connect").click()
    expect(page.locator("#console-status")).to_have_attribute("data-state", "connected",
                                                              timeout=CONNECT_MS)
    print(f"\n{user}: console connected {time.monotonic() - started:.1f} s after Connect")
    wait_until(lambda: _xfce_drawn(page), timeout_s=240,
               what=f"{user}'s Xfce desktop drawn in the canvas")
    stats = _canvas(page)
    page.locator("#console-screen canvas").screenshot(path=str(shot))
    print(f"{user}'s desktop in noVNC ({stats}): {shot}")
    width, height, rgb = decode_png(shot.read_bytes())
    pixels = {rgb[i:i + 3] for i in range(0, len(rgb), 3 * 97)}  # a sample of the shot
    assert width >= 640 and height >= 400 and len(pixels) >= 16, (width, height, len(pixels))
    return page.locator("#console-desktop").inner_text()


def _log_out_from_inside(agent: GuestAgent, account: str, uid: int) -> None:
    """What "Log Out" in Xfce's menu runs: xfce4-session-logout, as the user, on their
    display and session bus (taken from their xfce4-session's own environment)."""
    script = (
        f"pid=$(pgrep -u {uid} -x xfce4-session | head -n 1); [ -n \"$pid\" ] || exit 9; "
        "vars=$(tr '\\0' '\\n' <\"/proc/$pid/environ\" | "
        "grep -E '^(DISPLAY|XAUTHORITY|DBUS_SESSION_BUS_ADDRESS)='); "
        f"exec runuser -u {account} -- env $vars xfce4-session-logout --logout")
    _run(agent, ["/bin/sh", "-c", script])


def test_sign_in_connect_log_out_inside_and_the_next_user_finds_nothing(
        portal: Portal, console_proxy: int) -> None:
    skip_or_fail_without_chromium()
    from playwright.sync_api import expect, sync_playwright

    ctx, agent = portal.ctx, portal.agent
    sessions = SessionService(ctx)
    app = create_app(ctx, directories=[], console_ws_port=console_proxy)
    with LiveServer(app) as server, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)

            # --- the first user: their own desktop, seen from outside and inside ---------
            name = _connect_and_see_the_desktop(page, server.url, FIRST,
                                                portal.shots / f"{FIRST}.png")
            uid = _uid(ctx, FIRST)
            mine = [s for s in _status(agent) if s.user == FIRST]
            print(f"session-hook status for {FIRST}: {mine}")
            assert any(s.type == "x11" and s.state == "active" and s.active
                       and s.display == ":0" and s.uid == uid for s in mine), mine
            assert all(s.x_idle_ms is not None for s in mine), "xprintidle gave no idle time"
            _run(agent, ["/usr/sbin/runuser", "-u", FIRST, "--", "/bin/sh", "-c",
                         f"echo {FIRST} was here >{PROOF}"])
            owner = _run(agent, ["/usr/bin/stat", "-c", "%u:%g", PROOF]).strip()
            assert owner == f"{uid}:{uid}", owner

            report = sessions.run_timers()
            assert name in report.guest_logins and not report.errors, report
            assert DesktopService(ctx).get(name).state == "in_use"

            # --- logout from inside the session ends the broker's session ---------------
            _log_out_from_inside(agent, FIRST, uid)
            logged_out = time.monotonic()
            deadline = logged_out + 240
            while True:  # the broker's tick, as its daemon runs it
                report = sessions.run_timers()
                if name in report.logged_off:
                    break
                assert time.monotonic() < deadline, f"{FIRST} was not logged off: {report}"
                time.sleep(3)
            print(f"logged off {time.monotonic() - logged_out:.1f} s after the logout")
            # LightDM's greeter is back on the display (its own system user): not a session
            # of anyone the broker watches, and nothing of the first user is live.
            greeter_back = time.monotonic() + 180
            while True:
                listed = _run(agent, ["/usr/bin/loginctl", "list-sessions", "--no-legend"])
                if "lightdm" in listed.split():
                    break
                assert time.monotonic() < greeter_back, f"no greeter session: {listed}"
                time.sleep(3)
            after = _status(agent)
            print(f"logind after the logout: {listed.strip()}; session-hook status: {after}")
            assert not any(s.user == "lightdm" for s in after), after
            assert not any(s.user == FIRST and s.live for s in after), after
            with ctx.uow(read_only=True) as uow:
                messages = [e.message for e in uow.events.recent(20)]
            assert any(f"{FIRST} logged out of their desktop" in m for m in messages), messages
            assert DesktopService(ctx).get(name).state in ("recycling", "ready")
            page.click("#signout")
            expect(page.locator("#signin")).to_be_visible()

            # --- recycled: the next user gets the same desktop and nothing of the first --
            recycling = time.monotonic()
            again = _ready(ctx, Reconciler(ctx, workers=1, ready_timeout_s=240), "recycled")
            print(f"recycled to ready in {time.monotonic() - recycling:.1f} s")
            assert again == name
            second = _connect_and_see_the_desktop(page, server.url, SECOND,
                                                  portal.shots / f"{SECOND}.png")
            assert second == name
            theirs = [s.user for s in _status(agent) if s.state != "closing"]
            assert theirs == [SECOND], theirs
            code, out, _ = agent.exec_capture(["/usr/bin/getent", "passwd", FIRST])
            assert code == 2 and not out, f"{FIRST}'s account is still there: {out}"
            for path in (f"/home/{FIRST}", PROOF):
                code, _, _ = agent.exec_capture(["/usr/bin/test", "-e", path])
                assert code == 1, f"{path} survived the recycle"
        finally:
            browser.close()
