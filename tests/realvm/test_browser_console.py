"""The whole way in a real browser: Chromium signs in to the portal, connects to a pool on
qemu:///system, and noVNC shows the guest's own screen through deskpool's console proxy (run
as its own process, ``python -m deskpool.api.console_proxy``, on the same database). The
hostname the portal shows is the one the guest reports; signing out and in again brings the
same desktop back. Then the same desktop in a native client: remote-viewer, on a virtual X
screen, opens the portal's ``.vv`` file through the broker's SPICE proxy; a forged ticket
opens nothing."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

from deskpool.api.app import create_app
from deskpool.api.spice_proxy import SpiceProxyServer
from deskpool.broker.accounts import AccountService
from deskpool.broker.console import ConsoleTarget, SpiceAdmission
from deskpool.broker.entitlements import EntitlementService
from deskpool.domain.pools import PoolSpec
from deskpool.drivers.agent import GuestAgent
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.desktops import DesktopService
from deskpool.services.pools import PoolService
from deskpool.services.views import DesktopView
from tests.browser.conftest import (
    CANVAS_STATS,
    LiveServer,
    launch_chromium,
    sign_in,
    skip_or_fail_without_chromium,
    wait_until,
)
from tests.native_clients import need_programs, stop, virtual_screen, wait_for
from tests.realvm.conftest import TEMPLATE
from tests.realvm.screens import decode_png

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.realvm, pytest.mark.timeout(900)]
POOL, USER, PASSWORD = "web", "wendy", "browser-console-1"
CONNECT_MS = 90_000  # a ticket, a WebSocket, the proxy's own process reading the database
HEADER_PX = 56  # remote-viewer's own title and tool bar, above the guest's screen


def pool_desktops(ctx: ServiceContext) -> list[DesktopView]:
    return [d for d in DesktopService(ctx).list() if d.name.startswith(f"{POOL}-")]


@pytest.fixture(scope="module")
def web_pool(real_ctx: ServiceContext) -> Iterator[str]:
    """A pool of one desktop on qemu:///system, ready, and a user entitled to it."""
    PoolService(real_ctx).create(PoolSpec(POOL, TEMPLATE, spare=1, max_size=1,
                                          naming_pattern=f"{POOL}-{{n:02}}"))
    AccountService(real_ctx).create_user(USER, PASSWORD)
    EntitlementService(real_ctx).grant(POOL, "user", USER)
    try:
        reconciler = Reconciler(real_ctx, workers=2, ready_timeout_s=240)
        deadline = time.monotonic() + 420
        while not any(d.state == "ready" for d in pool_desktops(real_ctx)):
            assert time.monotonic() < deadline, "the pool's desktop did not become ready"
            report = reconciler.run_pass()
            assert not report.errors, report.errors
        yield POOL
    finally:
        PoolService(real_ctx).resize(POOL, min_size=0, spare=0)
        for desktop in pool_desktops(real_ctx):
            DesktopService(real_ctx).delete(str(desktop.id))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture()
def console_proxy(real_ctx: ServiceContext, tmp_path: Path) -> Iterator[int]:
    """``python -m deskpool.api.console_proxy`` on a free port, on the test's database."""
    port = free_port()
    env = {**os.environ, "DESKPOOL_DATA_DIR": str(real_ctx.settings.data_dir)}
    if real_ctx.settings.database_url:
        env["DESKPOOL_DATABASE_URL"] = real_ctx.settings.database_url
    log = (tmp_path / "console-proxy.log").open("wb")
    proxy = subprocess.Popen([sys.executable, "-m", "deskpool.api.console_proxy",
                              "--listen", f"127.0.0.1:{port}"],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            assert proxy.poll() is None, (tmp_path / "console-proxy.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(listening, timeout_s=60, what="the console proxy listening")
        yield port
    finally:
        stop(proxy)
        log.close()
        print(f"console proxy log: {tmp_path / 'console-proxy.log'}")


def canvas_stats(page: Page) -> dict[str, float]:
    """The console canvas's size, distinct colours and share of lit pixels."""
    stats: dict[str, float] = page.locator("#console-screen canvas").evaluate(CANVAS_STATS)
    return stats


def drawn(page: Page) -> bool:
    stats = canvas_stats(page)
    return stats["colours"] >= 2 and stats["lit"] > 0.0005


def test_the_portal_shows_the_guests_screen_and_gives_the_same_desktop_back(
    real_ctx: ServiceContext, web_pool: str, console_proxy: int, tmp_path: Path
) -> None:
    skip_or_fail_without_chromium()
    from playwright.sync_api import expect, sync_playwright

    app = create_app(real_ctx, directories=[], console_ws_port=console_proxy)
    with LiveServer(app) as server, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(30_000)
            expect.set_options(timeout=30_000)
            page_errors: list[str] = []
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))

            sign_in(page, server.url, USER, PASSWORD)
            pool = page.locator(f'#pools li[data-pool="{web_pool}"]')
            expect(pool).to_contain_text("1 ready")
            started = time.monotonic()
            pool.locator("button.connect").click()
            status = page.locator("#console-status")
            expect(status).to_have_attribute("data-state", "connected", timeout=CONNECT_MS)
            print(f"\nconsole connected {time.monotonic() - started:.1f} s after Connect")
            name = page.locator("#console-desktop").inner_text()
            expect(status).to_have_text(f"connected to {name}")
            shown_hostname = page.locator(f'#desktops tr[data-name="{name}"] .hostname')
            expect(shown_hostname).not_to_be_empty()
            hostname = shown_hostname.inner_text()
            desktop = DesktopService(real_ctx).get(name)
            assert desktop.hostname == hostname
            expect(page.locator("#console-hostname")).to_have_text(f"hostname {hostname}")
            wait_until(lambda: DesktopService(real_ctx).get(name).state == "in_use",
                       what="the console proxy marking the desktop in use")

            # The guest's text console (a getty on tty1) has drawn: not one flat colour.
            time.sleep(3)
            canvas = page.locator("#console-screen canvas")
            wait_until(lambda: drawn(page), timeout_s=60,
                       what="the guest's screen drawing in the canvas")
            stats = canvas_stats(page)
            shot = tmp_path / "console.png"
            canvas.screenshot(path=str(shot))
            print(f"console screenshot ({stats}): {shot}")
            assert stats["width"] >= 640 and stats["height"] >= 400, stats
            assert_png_not_blank(shot)

            agent = GuestAgent(real_ctx.driver_for_name("local"), desktop.id)
            assert agent.host_name() == hostname
            # Nobody has logged in at the guest's login prompt: the session watch, which
            # asks the real guest through its agent, sees no user and no idle session.
            assert agent.users() == []
            assert agent.idle_seconds() is None

            page.click("#signout")
            expect(page.locator("#signin")).to_be_visible()
            wait_until(lambda: DesktopService(real_ctx).get(name).state == "idle",
                       what="the desktop going idle once the console closed")

            sign_in(page, server.url, USER, PASSWORD)
            expect(pool).to_contain_text(f"yours: {name}")
            pool.locator("button.connect").click()
            expect(status).to_have_attribute("data-state", "connected", timeout=CONNECT_MS)
            assert page.locator("#console-desktop").inner_text() == name
            expect(page.locator("#message")).to_have_attribute("data-reconnect", "true")
            expect(page.locator("#desktops tbody tr")).to_have_count(1)
            assert not page_errors, page_errors
        finally:
            browser.close()


def assert_png_not_blank(path: Path) -> None:
    """With Pillow (not a dependency of the project), the saved PNG itself; without it, the
    canvas's own pixels checked above are the evidence."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 24) or []
    assert len(colours) >= 2, f"the screenshot {path} is one flat colour"


class CountingAdmission(SpiceAdmission):
    """The broker's admission, counting the SPICE channels it let through: a client whose
    display password was refused opens no channel after its first."""

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.admitted = 0

    def admit(self, secret: str, requested: tuple[str, int] | None = None,
              joined: bool = False) -> tuple[ConsoleTarget, bool]:
        found = super().admit(secret, requested, joined)
        self.admitted += 1
        return found


def test_remote_viewer_opens_the_vv_file_through_the_spice_proxy(
    real_ctx: ServiceContext, web_pool: str, tmp_path: Path
) -> None:
    need_programs("remote-viewer")
    admission = CountingAdmission(real_ctx)
    proxy = SpiceProxyServer(admission, "127.0.0.1", 0)
    serving = threading.Thread(target=proxy.serve_forever, daemon=True)
    serving.start()
    try:
        client = TestClient(create_app(real_ctx, directories=[], spice_proxy_port=proxy.port),
                            base_url="http://127.0.0.1",  # the proxy's name in the file
                            headers={"origin": "http://127.0.0.1"})  # as the portal's page
        assert client.post("/api/v1/auth/login", json={"username": USER,
                                                       "password": PASSWORD}).status_code == 200
        handover = client.post(f"/api/v1/pools/{web_pool}/connect").json()
        assert handover["status"] == "ready", handover
        vv = client.get(f"/api/v1/desktops/{handover['desktop_id']}/console.vv")
        assert vv.status_code == 200, vv.text
        name = handover["desktop"]
        with virtual_screen(tmp_path) as screen:
            # A file whose ticket is not the broker's opens nothing.
            forged = tmp_path / "forged.vv"
            forged.write_text(re.sub(r"(proxy=http://deskpool:)[^@]+@", r"\1forged@", vv.text))
            refused = screen.run("remote-viewer-forged", "remote-viewer", str(forged))
            time.sleep(10)
            stop(refused)
            assert admission.admitted == 0

            good = tmp_path / f"{name}.vv"
            good.write_text(vv.text)
            viewer = screen.run("remote-viewer", "remote-viewer", "--debug", str(good))
            try:
                # Past the main channel (whose link the display password opened) to the
                # display channel, and the viewer's window up with the desktop's name.
                wait_for(lambda: admission.admitted >= 2, 90, "remote-viewer's SPICE channels")
                wait_for(lambda: any(name in t for t in screen.window_titles()), 60,
                         f"a window titled {name}")
                shot = tmp_path / "remote-viewer.png"

                def drawn() -> bool:
                    """The guest's screen in the window, under the viewer's own header: the
                    text of its console lit on black."""
                    box = screen.window_box(name)
                    if box is None:
                        return False
                    width, _, rgb = decode_png(screen.screenshot(shot))
                    x, y, w, h = box
                    pixels = [rgb[(row * width + col) * 3:(row * width + col) * 3 + 3]
                              for row in range(y + HEADER_PX, y + h)
                              for col in range(x, x + w)]
                    lit = sum(1 for p in pixels if max(p) > 96) / max(1, len(pixels))
                    return len(set(pixels)) >= 2 and lit > 0.002

                wait_for(drawn, 60, "the desktop drawn in remote-viewer")
                print(f"\nremote-viewer screenshot: {shot}")
                assert viewer.poll() is None, "remote-viewer quit"
                wait_until(lambda: DesktopService(real_ctx).get(name).state == "in_use",
                           what="the SPICE console counting as open")
            finally:
                stop(viewer)
            wait_until(lambda: DesktopService(real_ctx).get(name).state == "idle",
                       timeout_s=30, what="the SPICE console counting as closed")
    finally:
        proxy.stop()
        serving.join(10)
