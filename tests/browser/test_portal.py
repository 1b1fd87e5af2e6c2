"""The portal, console page and admin view in real Chromium against a real uvicorn, on the
fake driver: sign-in, connect (the console really connects, through deskpool's console proxy
to a stand-in VNC server, and draws), reconnect, pending connects, log off, sign out, and the
admin view for admins only."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Page, expect

from deskpool.api.app import create_app
from deskpool.domain.models import ConsoleAddress
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.desktops import DesktopService
from tests.broker_world import PASSWORD, BrokerWorld, make_world
from tests.browser.conftest import (
    CANVAS_STATS,
    PIXEL_AT,
    ConsoleProxyThread,
    FakeRfb,
    LiveServer,
    sign_in,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


@dataclass
class Site:
    world: BrokerWorld
    url: str
    rfb: FakeRfb

    def state(self, name: str) -> str:
        return DesktopService(self.world.ctx).get(name).state


@pytest.fixture()
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    world = make_world(tmp_path)
    world.pool("lab")
    world.user("alice", entitled_to=("lab",))
    world.user("bob")
    world.user("root", admin=True)
    world.fill()
    rfb = FakeRfb()
    # The one stand-in: every fake desktop's console is the stand-in VNC server.
    monkeypatch.setattr(world.fake, "console_address",
                        lambda vm_id, *_: ConsoleAddress("vnc", "127.0.0.1", rfb.port))
    try:
        with ConsoleProxyThread(world.ctx) as proxy, LiveServer(
                create_app(world.ctx, directories=[], console_ws_port=proxy.port,
                           rdp_proxy_port=3390)) as server:
            yield Site(world=world, url=server.url, rfb=rfb)
    finally:
        rfb.close()
        world.ctx.close()
        forget_fake_hosts()


def signed_in(page: Page, site: Site, user: str) -> None:
    sign_in(page, site.url, user, PASSWORD)
    expect(page.locator("#portal")).to_have_attribute("data-state", "home")
    expect(page.locator("#home")).to_have_attribute("data-loaded", "true")


def connect(page: Page, pool: str = "lab") -> str:
    """Click Connect; wait for the console to connect; the desktop's name."""
    page.click(f'#pools li[data-pool="{pool}"] button.connect')
    expect(page.locator("#console-status")).to_have_attribute("data-state", "connected")
    name = page.locator("#console-desktop").inner_text()
    expect(page.locator("#console-status")).to_have_text(f"connected to {name}")
    return name


def test_a_wrong_password_is_shown_then_the_right_one_signs_in_and_out(
        page: Page, site: Site) -> None:
    sign_in(page, site.url, "alice", "not-the-password")
    expect(page.locator("#signin-error")).to_have_text("wrong user name or password")
    expect(page.locator("#home")).to_be_hidden()
    page.fill("#password", PASSWORD)
    page.click("#signin-button")
    expect(page.locator("#who")).to_have_text("alice")
    expect(page.locator('#pools li[data-pool="lab"]')).to_contain_text("2 ready")
    expect(page.locator("#no-desktops")).to_be_visible()
    expect(page.locator("#admin-link")).to_be_hidden()
    page.reload()  # the HttpOnly cookie keeps her signed in
    expect(page.locator("#who")).to_have_text("alice")
    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#signin-error")).to_have_text("You are signed out.")
    me = page.request.get(site.url + "/api/v1/me")
    assert me.status == 401


def test_connect_shows_the_desktop_and_its_console_and_reconnect_returns_it(
        page: Page, site: Site) -> None:
    signed_in(page, site, "alice")
    name = connect(page)
    desktop = DesktopService(site.world.ctx).get(name)
    expect(page.locator("#message")).to_have_text(f"desktop {name} is ready")
    expect(page.locator("#console-hostname")).to_have_text(f"hostname {desktop.hostname}")
    row = page.locator(f'#desktops tr[data-name="{name}"]')
    expect(row.locator(".hostname")).to_have_text(desktop.hostname)
    expect(row).to_have_attribute("data-state", "in_use")
    canvas = page.locator("#console-screen canvas")
    wait_until(lambda: canvas.evaluate(CANVAS_STATS)["colours"] == 2, what="the first frame")
    stats = canvas.evaluate(CANVAS_STATS)
    assert (stats["width"], stats["height"]) == (FakeRfb.WIDTH, FakeRfb.HEIGHT)
    assert tuple(canvas.evaluate(PIXEL_AT, [40, 100])) == FakeRfb.LEFT
    assert tuple(canvas.evaluate(PIXEL_AT, [300, 100])) == FakeRfb.RIGHT
    assert site.state(name) == "in_use"

    page.click("#console-disconnect")
    expect(page.locator("#console-status")).to_have_attribute("data-state", "disconnected")
    expect(page.locator("#console-screen canvas")).to_have_count(0)
    wait_until(lambda: site.state(name) == "idle", what="the desktop going idle")

    page.reload()
    expect(page.locator('#pools li[data-pool="lab"]')).to_contain_text(f"yours: {name}")
    assert connect(page) == name
    expect(page.locator("#message")).to_have_attribute("data-reconnect", "true")
    expect(page.locator("#desktops tbody tr")).to_have_count(1)
    assert site.state(name) == "in_use"


def test_open_console_and_disconnect_from_the_desktop_list(page: Page, site: Site) -> None:
    signed_in(page, site, "alice")
    name = connect(page)
    row = page.locator(f'#desktops tr[data-name="{name}"]')
    row.locator("button.disconnect").click()
    expect(page.locator("#console-status")).to_have_attribute("data-state", "disconnected")
    expect(row.locator("button.disconnect")).to_be_disabled()
    row.locator("button.open-console").click()
    expect(page.locator("#console-status")).to_have_attribute("data-state", "connected")
    assert site.rfb.sessions == 2


def test_log_off_hands_the_desktop_back(page: Page, site: Site) -> None:
    signed_in(page, site, "alice")
    name = connect(page)
    page.locator(f'#desktops tr[data-name="{name}"] button.logoff').click()
    expect(page.locator("#message")).to_have_text(re.compile(rf"^logged off {name}; it is now "))
    expect(page.locator("#no-desktops")).to_be_visible()
    expect(page.locator("#console")).to_be_hidden()
    assert site.state(name) not in ("reserved", "in_use", "idle")


def test_the_rdp_file_downloads_and_its_one_time_password_is_shown(
        page: Page, site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    set_in_guest: list[list[str]] = []

    def exec_capture(self: GuestAgent, argv: list[str], timeout_s: float = 30.0
                     ) -> tuple[int, str, str]:
        set_in_guest.append(argv)  # rdp-otp set: the fake guest runs no scripts
        return 0, "", ""

    monkeypatch.setattr(GuestAgent, "exec_capture", exec_capture)
    with site.world.ctx.uow() as uow:  # what a desktop-flavor hand-over allocates
        uow.linux_accounts.get_or_allocate("alice", "alice")
        uow.commit()
    signed_in(page, site, "alice")
    name = connect(page)
    with page.expect_download() as download:
        page.locator(f'#desktops tr[data-name="{name}"] button.rdp-file').click()
    assert download.value.suggested_filename == f"{name}.rdp"
    text = Path(download.value.path()).read_bytes()
    assert b"username:s:alice\r\n" in text and b"loadbalanceinfo:s:" in text
    expect(page.locator("#message")).to_contain_text(f"{name}.rdp saved")
    password = page.locator("#message code.rdp-password").inner_text()
    assert set_in_guest[-1][4] == hashlib.sha256(password.encode()).hexdigest()
    # Beside it, remote-viewer's file: a plain download (no secret but the file's ticket).
    spice = page.locator(f'#desktops tr[data-name="{name}"] a.spice-file')
    expect(spice).to_have_attribute("download", f"{name}.vv")
    assert (spice.get_attribute("href") or "").endswith("/console.vv")


def test_a_pending_connect_asks_again_until_a_desktop_is_ready(
        page: Page, site: Site) -> None:
    site.world.pool("lazy", spare=0, max_size=2)
    site.world.user("erin", entitled_to=("lazy",))
    signed_in(page, site, "erin")
    page.click('#pools li[data-pool="lazy"] button.connect')
    message = page.locator("#message")
    expect(message).to_have_attribute("data-kind", "pending")
    expect(message).to_contain_text("being made for you")
    site.world.fill()  # the reconciler makes the desktop; the page's next try gets it
    expect(page.locator("#console-status")).to_have_attribute("data-state", "connected")
    expect(page.locator("#console-desktop")).to_have_text("lazy-01")
    expect(message).to_have_attribute("data-kind", "ready")


def test_the_apis_refusals_are_shown_verbatim(page: Page, site: Site) -> None:
    site.world.pool("tiny", spare=1, max_size=1)
    site.world.user("carol", entitled_to=("tiny",))
    site.world.user("dave", entitled_to=("tiny",))
    site.world.fill()
    assert site.world.client("carol").post("/api/v1/pools/tiny/connect").status_code == 200
    signed_in(page, site, "dave")
    page.click('#pools li[data-pool="tiny"] button.connect')
    expect(page.locator("#message")).to_have_attribute("data-kind", "error")
    answer = site.world.client("dave").post("/api/v1/pools/tiny/connect")
    assert answer.status_code == 503
    expect(page.locator("#message")).to_have_text(answer.json()["detail"])


def test_the_console_page_connects_full_window_and_disconnects(page: Page, site: Site) -> None:
    signed_in(page, site, "alice")
    # From the page, as its scripts do: the browser sends the Origin the CSRF check wants.
    handed = page.evaluate("""async () => (await fetch("/api/v1/pools/lab/connect",
                                                     {method: "POST"})).json()""")
    page.goto(f"{site.url}/console/{handed['desktop_id']}")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "connected")
    expect(status).to_have_text(f"connected to {handed['desktop']}")
    expect(page.locator("#screen canvas")).to_have_count(1)
    page.click("#disconnect")
    expect(status).to_have_attribute("data-state", "disconnected")
    expect(status).to_have_text("disconnected")
    page.click("#reconnect")
    expect(status).to_have_attribute("data-state", "connected")


def test_the_console_of_a_desktop_not_yours_is_refused(page: Page, site: Site) -> None:
    alice = site.world.client("alice").post("/api/v1/pools/lab/connect").json()
    signed_in(page, site, "bob")
    page.goto(f"{site.url}/console/{alice['desktop_id']}")
    expect(page.locator("#status")).to_have_attribute("data-state", "error")
    expect(page.locator("#console-error")).to_have_text(
        "you hold no such desktop; connect to a pool first")
    page.goto(f"{site.url}/console/{uuid.uuid4()}")
    expect(page.locator("#status")).to_have_attribute("data-state", "error")
    assert site.rfb.sessions == 0


def test_signed_out_the_console_page_offers_to_sign_in(page: Page, site: Site) -> None:
    page.goto(f"{site.url}/console/{uuid.uuid4()}")
    expect(page.locator("#status")).to_have_attribute("data-state", "signed-out")
    page.locator("#console-error a").click()
    expect(page.locator("#signin")).to_be_visible()
    assert "next=%2Fconsole%2F" in page.url


def test_an_admin_sees_desktops_and_logon_timings(page: Page, site: Site) -> None:
    handed = site.world.client("alice").post("/api/v1/pools/lab/connect").json()
    signed_in(page, site, "root")
    expect(page.locator("#admin-link")).to_be_visible()
    page.click("#admin-link")
    expect(page.locator("#admin")).to_have_attribute("data-state", "loaded")
    row = page.locator(f'#desktops tr[data-id="{handed["desktop_id"]}"]')
    expect(row.locator(".user")).to_have_text("alice")
    expect(row.locator(".state")).to_have_text("reserved")
    expect(row.locator(".hostname")).to_have_text(handed["hostname"])
    logon = page.locator("#logons tbody tr").first
    expect(logon.locator(".user")).to_have_text("alice")
    expect(logon.locator(".outcome")).to_have_text("ready")
    for phase in ("queue", "claim", "power-on", "ready"):
        expect(logon.locator(f"td.{phase}")).to_have_text(re.compile(r"^\d+$"))
    expect(page.locator('#pools tr:has-text("lab") .counts')).to_contain_text("reserved 1")
    expect(page.locator("#sessions tbody tr")).to_have_count(1)
    expect(page.locator("#hosts tbody tr .name")).to_have_text("h1")
    expect(page.locator("#templates tbody tr .name")).to_have_text("golden")
    expect(page.locator("#events tbody tr").first).to_be_visible()

    # it stays live: a desktop that fails shows its reason without a reload
    stamp = page.locator("#refreshed")
    before = int(stamp.get_attribute("data-count") or "0")
    site.world.client("root").post(f"/api/v1/admin/desktops/{handed['desktop_id']}/logoff")
    expect(row.locator(".state")).not_to_have_text("reserved", timeout=10_000)
    assert int(stamp.get_attribute("data-count") or "0") > before
    page.fill("#desktop-filter", "nothing-matches-this")
    expect(page.locator("#desktops tbody tr.empty")).to_have_count(1)


def test_a_non_admin_is_refused_the_admin_data(page: Page, site: Site) -> None:
    signed_in(page, site, "alice")
    page.goto(site.url + "/admin")
    expect(page.locator("#admin")).to_have_attribute("data-state", "refused")
    expect(page.locator("#admin-refused")).to_contain_text("not an administrator")
    expect(page.locator("#admin-data")).to_be_hidden()
    expect(page.locator("#desktops tbody tr")).to_have_count(0)
    answer = page.evaluate("""async () => {
      const r = await fetch("/api/v1/admin/desktops");
      return [r.status, await r.json()];
    }""")
    assert answer == [403, {"detail": "this needs an administrator"}]


def test_signed_out_the_admin_view_sends_you_to_sign_in_and_back(
        page: Page, site: Site) -> None:
    page.goto(site.url + "/admin")
    expect(page.locator("#admin")).to_have_attribute("data-state", "refused")
    page.locator("#admin-refused a").click()
    page.fill("#username", "root")
    page.fill("#password", PASSWORD)
    page.click("#signin-button")
    page.wait_for_url(site.url + "/admin")
    expect(page.locator("#admin")).to_have_attribute("data-state", "loaded")


def test_pages_carry_a_content_security_policy_and_static_files_are_fixed(
        page: Page, site: Site) -> None:
    for path in ("/", "/admin", f"/console/{uuid.uuid4()}"):
        answer = page.request.get(site.url + path)
        assert answer.status == 200
        assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert page.request.get(site.url + "/static/portal.js").headers["content-type"].startswith(
        "text/javascript")
    for path in ("/static/..%2Fpages.py", "/static/nope.js", "/static/%2Fetc%2Fpasswd"):
        assert page.request.get(site.url + path).status == 404


# Return addresses a sign-in must never follow: other sites however spelled, and the
# portal's own URLs that are not pages (an API call, a static file).
FOREIGN_NEXT = ["https://evil.example/", "//evil.example/", "/\\evil.example/",
                "\\/evil.example/", "/\t/evil.example/", "/\n/evil.example/",
                " //evil.example/", "javascript:alert(1)", "/%2F%2Fevil.example/",
                "/admin/../..//evil.example/", "/api/v1/auth/logout", "/static/portal.js",
                "/console/x", "admin", ""]


def test_sign_in_returns_only_to_one_of_the_portals_own_pages(page: Page, site: Site) -> None:
    page.goto(site.url + "/")
    checked = page.evaluate("""async (values) => {
      const { safeNext } = await import("/static/api.js");
      return values.map((v) => safeNext(v));
    }""", [*FOREIGN_NEXT, "/", "/admin", f"/console/{uuid.uuid4()}", "/admin?x=1#y"])
    assert checked[:len(FOREIGN_NEXT)] == [None] * len(FOREIGN_NEXT)
    assert [c is not None for c in checked[len(FOREIGN_NEXT):]] == [True] * 4
    # Signed in with a foreign return address: the portal's home, on this site.
    for value in ("/\t/evil.example/", "//evil.example/", "/\\evil.example/"):
        page.goto(site.url + "/?" + urlencode({"next": value}))
        page.fill("#username", "alice")
        page.fill("#password", PASSWORD)
        page.click("#signin-button")
        expect(page.locator("#portal")).to_have_attribute("data-state", "home")
        assert page.url.startswith(site.url + "/"), page.url
        page.click("#signout")
        expect(page.locator("#signin")).to_be_visible()
