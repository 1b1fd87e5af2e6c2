"""The browser console follows a desktop that moves live to another host, in real Chromium on
two fake hosts: each host's VMs show a stand-in VNC server of their own colour, the desktop
moves, the source's console connection drops (as its QEMU ends), and the canvas reconnects by
itself, through a fresh ticket, to the screen on the new host; the user never clicks. A
console the user closes stays closed, and one whose desktop went away is not retried forever.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect

from deskpool.api.app import create_app
from deskpool.broker.sessions import SessionService
from deskpool.domain.models import ConsoleAddress
from deskpool.services.desktops import DesktopService
from deskpool.services.migration import MigrationService
from tests.broker_world import PASSWORD
from tests.browser.conftest import (
    CANVAS_STATS,
    PIXEL_AT,
    ConsoleProxyThread,
    FakeRfb,
    LiveServer,
    drawn_canvas,
    sign_in,
    wait_until,
)
from tests.functional import test_host_grid as grid_world
from tests.functional.test_host_grid import Grid

pytestmark = pytest.mark.timeout(120)
grid = grid_world.grid

COLOURS = {"a": ((230, 60, 20), (20, 120, 230)), "b": ((40, 200, 90), (250, 220, 30))}


@dataclass
class TwoHosts:
    grid: Grid
    url: str
    screens: dict[str, FakeRfb]


@pytest.fixture()
def two_hosts(grid: Grid, monkeypatch: pytest.MonkeyPatch) -> Iterator[TwoHosts]:
    screens = {name: FakeRfb(name.encode(), colours=COLOURS[name]) for name in COLOURS}
    for name, screen in screens.items():
        fake = grid.host(name)
        # Every VM on a host shows that host's stand-in screen, so the colour says the host.
        monkeypatch.setattr(fake, "console_address",
                            lambda vm_id, *_, port=screen.port: ConsoleAddress(
                                "vnc", "127.0.0.1", port))
    grid.pool("lab", spare=1, max_size=2)  # its first desktop on a (a tie, by name)
    grid.world.user("alice", entitled_to=("lab",))
    for _ in range(3):
        grid.reconciler().run_pass()
    try:
        with ConsoleProxyThread(grid.ctx) as proxy, LiveServer(
                create_app(grid.ctx, directories=[], console_ws_port=proxy.port,
                           rdp_proxy_port=3390)) as server:
            yield TwoHosts(grid, server.url, screens)
    finally:
        for screen in screens.values():
            screen.close()


def connect(page: Page, site: TwoHosts, *, signed_in: bool = False) -> uuid.UUID:
    if not signed_in:
        sign_in(page, site.url, "alice", PASSWORD)
        expect(page.locator("#home")).to_have_attribute("data-loaded", "true")
    page.click('#pools li[data-pool="lab"] button.connect')
    expect(page.locator("#console-status")).to_have_attribute("data-state", "connected")
    return DesktopService(site.grid.ctx).get(page.locator("#console-desktop").inner_text()).id


def shows(page: Page, host: str) -> bool:
    canvas = drawn_canvas(page)
    try:
        if canvas is None or canvas.evaluate(CANVAS_STATS)["colours"] != 2:
            return False
        left, right = COLOURS[host]
        return (tuple(canvas.evaluate(PIXEL_AT, [40, 100])) == left
                and tuple(canvas.evaluate(PIXEL_AT, [300, 100])) == right)
    except PlaywrightError:  # the canvas went away between two calls
        return False


def test_the_console_reconnects_by_itself_to_the_desktop_on_its_new_host(
        page: Page, two_hosts: TwoHosts) -> None:
    desktop_id = connect(page, two_hosts)
    wait_until(lambda: shows(page, "a"), what="host a's screen")
    page.evaluate("""() => { const status = document.getElementById('console-status');
        window.states = [];
        new MutationObserver(() => window.states.push(status.dataset.state)).observe(
            status, { attributes: true }); }""")

    moved = MigrationService(two_hosts.grid.ctx).migrate(str(desktop_id), target="b",
                                                         reason="a test")
    assert moved.target == "b"
    two_hosts.screens["a"].drop_connections()  # the source's QEMU is gone

    wait_until(lambda: shows(page, "b"), timeout_s=30, what="host b's screen")
    expect(page.locator("#console-status")).to_have_attribute("data-state", "connected")
    states = page.evaluate("() => window.states")
    assert "reconnecting" in states and "disconnected" not in states, states
    assert two_hosts.screens["b"].sessions == 1
    assert page.evaluate("() => document.getElementById('console-status').textContent") == (
        f"connected to {DesktopService(two_hosts.grid.ctx).get(str(desktop_id)).name}")
    row = DesktopService(two_hosts.grid.ctx).get(str(desktop_id))
    assert (row.host, row.state) == ("b", "in_use")


def test_a_closed_console_stays_closed_and_a_gone_desktop_is_not_retried(
        page: Page, two_hosts: TwoHosts) -> None:
    connect(page, two_hosts)
    wait_until(lambda: shows(page, "a"), what="host a's screen")
    page.click("#console-disconnect")
    expect(page.locator("#console-status")).to_have_attribute("data-state", "disconnected")
    two_hosts.screens["a"].drop_connections()
    page.wait_for_timeout(1500)  # long enough for a wrongful retry to show
    assert two_hosts.screens["a"].sessions == 1
    expect(page.locator("#console-status")).to_have_attribute("data-state", "disconnected")

    # Connected again, then the desktop is logged off behind the console's back: the ticket
    # is refused as no longer hers, and the console says so instead of retrying.
    desktop_id = connect(page, two_hosts, signed_in=True)
    wait_until(lambda: two_hosts.screens["a"].sessions == 2, what="the second console")
    SessionService(two_hosts.grid.ctx).log_off(desktop_id, by=None, reason="a test")
    two_hosts.screens["a"].drop_connections()
    expect(page.locator("#console-status")).to_have_attribute("data-state", "disconnected")
    expect(page.locator("#console-status")).to_contain_text("no such desktop")
    page.wait_for_timeout(1500)
    assert two_hosts.screens["a"].sessions == 2
