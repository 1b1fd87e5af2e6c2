"""The admin view's hosts in real Chromium against a real uvicorn, on the fake driver with two
fake hosts: capacity and limits, adding a host (a bad URI's error shown), draining a host from
the page (its deadline and progress, the user's maintenance notice in the portal after a
reconcile pass, maintenance once no session is left), enabling it again, and logging a user's
desktop off from the desktops table."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from deskpool.api.app import create_app
from deskpool.domain.models import HostState
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.reconciler.loop import Reconciler
from deskpool.services.desktops import DesktopService
from deskpool.services.hosts import HostService
from tests.broker_world import PASSWORD, BrokerWorld, make_world
from tests.browser.conftest import WAIT_MS, LiveServer, sign_in

pytestmark = pytest.mark.timeout(120)

UNREACHABLE_URI = "qemu+tcp://127.0.0.1:1/system"  # nothing listens on port 1: refused at once


@dataclass
class Site:
    world: BrokerWorld
    url: str

    def desktop(self, name: str) -> tuple[str, str]:
        """A desktop's (state, host)."""
        view = DesktopService(self.world.ctx).get(name)
        return view.state, view.host

    def reconcile(self) -> None:
        # The notice path the portal shows, for a desktop that cannot move live (moves are
        # in tests/functional/test_live_migration.py).
        Reconciler(self.world.ctx, move_on_drain=False).run_pass()


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    world = make_world(tmp_path)  # host h1
    HostService(world.ctx).add("h2", "fake://second")
    world.pool("lab")  # two spare desktops, spread: one on each host
    world.user("alice", entitled_to=("lab",))
    world.user("root", admin=True)
    world.fill()
    try:
        with LiveServer(create_app(world.ctx, directories=[], console_ws_port=6080)) as server:
            yield Site(world=world, url=server.url)
    finally:
        world.ctx.close()
        forget_fake_hosts()


def open_admin(page: Page, site: Site) -> None:
    sign_in(page, site.url, "root", PASSWORD)
    expect(page.locator("#portal")).to_have_attribute("data-state", "home")
    page.goto(site.url + "/admin")
    expect(page.locator("#admin")).to_have_attribute("data-state", "loaded")


def host_row(page: Page, name: str) -> Locator:
    return page.locator(f'#hosts tbody tr[data-name="{name}"]')


def connect_alice(site: Site) -> tuple[str, str]:
    """Alice takes a desktop of lab (through the API): its name and host."""
    answer = site.world.client("alice").post("/api/v1/pools/lab/connect")
    assert answer.status_code == 200, answer.text
    name = answer.json()["desktop"]
    return name, site.desktop(name)[1]


def test_an_admin_sees_both_hosts_with_capacity_limits_and_desktops(
        page: Page, site: Site) -> None:
    open_admin(page, site)
    expect(page.locator("#hosts tbody tr")).to_have_count(2)
    expect(page.locator("#hosts-count")).to_have_text("(2)")
    for view in HostService(site.world.ctx).list():
        row = host_row(page, view.name)
        expect(row).to_have_attribute("data-state", "enabled")
        expect(row.locator("td.host .name")).to_have_text(view.name)
        expect(row.locator("td.host .uri")).to_have_text(view.uri)
        expect(row.locator("td.state .badge")).to_have_text("enabled")
        expect(row.locator("td.vcpus")).to_have_text(str(view.vcpus))
        expect(row.locator("td.memory")).to_have_text(f"{view.memory_mib / 1024:.0f} GiB")
        expect(row.locator("td.storage")).to_have_text(
            f"{view.storage_free_bytes / 2 ** 40:.1f} TiB")
        expect(row.locator("td.limits")).to_have_text(
            "CPU 4:1 · memory 1:1 · no desktop limit · 2 provisioning · 2 transfers")
        expect(row.locator("td.desktops")).to_have_text("1")
        expect(row.locator("td.host-set")).to_have_text("default")
        expect(row.locator("td.last-seen")).to_have_text(re.compile(r"^\d+ (s|min) ago$"))
        expect(row.locator("button.drain")).to_have_text("Drain")
        expect(row.locator("button.enable")).to_have_count(0)
    # each desktop says, on its host, why it was placed there
    first = page.locator("#desktops tbody tr").first.locator("td.host span")
    expect(first).to_have_attribute("title", re.compile(r"^host h[12]: "))


def test_the_hosts_show_their_set_and_its_balancing_and_the_pools_theirs(
        page: Page, site: Site) -> None:
    hosts = HostService(site.world.ctx)
    hosts.set_host_set("h2", "rack-a")
    hosts.set_balance("rack-a", True)
    open_admin(page, site)
    expect(host_row(page, "h1").locator("td.host-set")).to_have_text("default")
    expect(host_row(page, "h2").locator("td.host-set")).to_have_text("rack-a · balancing")
    expect(host_row(page, "h2")).to_have_attribute("data-balances", "yes")
    lab = page.locator('#pools tbody tr[data-name="lab"]')
    expect(lab.locator("td.balance")).to_have_text("")
    answer = site.world.client("root").patch("/api/v1/admin/pools/lab", json={"balance": True})
    assert answer.status_code == 200, answer.text
    expect(lab.locator("td.balance")).to_have_text("yes")  # on the next refresh


def test_adding_a_host_shows_the_apis_error_for_a_bad_uri_then_adds_a_good_one(
        page: Page, site: Site) -> None:
    open_admin(page, site)
    page.locator("#add-host summary").click()
    page.fill("#host-name", "h3")
    page.fill("#host-uri", UNREACHABLE_URI)
    page.click("#add-host-button")
    expected = site.world.client("root").post(
        "/api/v1/admin/hosts", json={"name": "h3", "uri": UNREACHABLE_URI,
                                     "cpu_overcommit": 4, "memory_overcommit": 1,
                                     "max_provisioning": 2, "transfer_slots": 2})
    assert expected.status_code == 503
    error = page.locator("#add-host-error")
    expect(error).to_have_text(expected.json()["detail"])
    assert "cannot reach a hypervisor at" in error.inner_text()
    expect(page.locator("#hosts tbody tr")).to_have_count(2)

    page.fill("#host-uri", "fake://third")
    page.fill("#host-max-desktops", "3")
    page.fill("#host-cpu-overcommit", "2.5")
    page.click("#add-host-button")
    expect(page.locator("#add-host-error")).to_be_hidden()
    expect(page.locator("#hosts-message")).to_have_text(re.compile(r"^added host h3: FAKE "))
    row = host_row(page, "h3")
    expect(row).to_have_attribute("data-state", "enabled")
    expect(row.locator("td.limits")).to_have_text(
        "CPU 2.5:1 · memory 1:1 · at most 3 desktops · 2 provisioning · 2 transfers")
    expect(row.locator("td.desktops")).to_have_text("0")
    expect(page.locator("#add-host")).not_to_have_attribute("open", "")
    assert HostService(site.world.ctx).get("h3").max_desktops == 3


def test_drain_from_the_page_warns_the_user_then_maintenance_then_enable(
        page: Page, browser: Browser, site: Site) -> None:
    desktop, host_a = connect_alice(site)
    host_b = "h2" if host_a == "h1" else "h1"
    open_admin(page, site)
    row = host_row(page, host_a)

    # a grace the API refuses: its sentence, verbatim, in the dialog, which stays open
    row.locator("button.drain").click()
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-title")).to_have_text(f"Drain {host_a}")
    expect(page.locator("#confirm-grace")).to_have_value("30")
    page.fill("#confirm-grace", "20000")
    page.click("#confirm-ok")
    refused = site.world.client("root").post(f"/api/v1/admin/hosts/{host_a}/drain",
                                             json={"grace_s": 20000 * 60})
    assert refused.status_code == 422
    expect(page.locator("#confirm-error")).to_have_text(refused.json()["detail"])
    assert "604800" in page.locator("#confirm-error").inner_text()
    expect(row).to_have_attribute("data-state", "enabled")

    asked_at = datetime.now(UTC)
    page.fill("#confirm-grace", "1")
    page.click("#confirm-ok")
    expect(dialog).to_be_hidden()
    expect(page.locator("#hosts-message")).to_contain_text(f"{host_a} is draining")
    expect(row).to_have_attribute("data-state", "draining")
    expect(row.locator("td.state .badge")).to_have_text("draining")
    deadline_text = row.locator(".drain-deadline")
    expect(deadline_text).to_contain_text("logs users off at")
    deadline = datetime.fromisoformat(deadline_text.get_attribute("data-deadline") or "")
    assert abs(deadline - (asked_at + timedelta(minutes=1))) < timedelta(seconds=20)
    expect(row.locator(".drain-progress")).to_have_text(
        "1 desktop still on it · 1 session still open")
    expect(row.locator("button.enable")).to_be_visible()
    expect(host_row(page, host_b)).to_have_attribute("data-state", "enabled")
    expect(page.locator("#hosts-count")).to_have_text("(2; 1 draining)")

    # the reconciler warns her; she sees the notice next to her desktop in the portal
    site.reconcile()
    notice = re.compile(r"^Host maintenance: please save your work; you will be logged off at ")
    portal = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        theirs = portal.new_page()
        theirs.set_default_timeout(WAIT_MS)
        sign_in(theirs, site.url, "alice", PASSWORD)
        expect(theirs.locator("#home")).to_have_attribute("data-loaded", "true")
        expect(theirs.locator(f'#desktops tr[data-name="{desktop}"] .notice')).to_have_text(
            notice)
        expect(theirs.locator(f'#desktops tr[data-name="{desktop}"] .notice')).to_be_visible()
    finally:
        portal.close()
    held = page.locator(f'#desktops tbody tr[data-name="{desktop}"]')
    expect(held.locator("td.notes .notice")).to_have_text(notice)

    # the admin logs her off from the desktops table; the next pass finds no session left
    held.locator("button.logoff").click()
    expect(page.locator("#confirm-title")).to_have_text(f"Log off alice from {desktop}")
    page.click("#confirm-ok")
    expect(dialog).to_be_hidden()
    expect(held).not_to_have_attribute("data-state", re.compile(r"^(reserved|in_use|idle)$"))
    expect(row.locator(".drain-progress")).to_contain_text("0 sessions still open")
    for _ in range(3):  # her desktop is recycled, then (ready on a draining host) retired
        site.reconcile()
        if HostService(site.world.ctx).get(host_a).state == "maintenance":
            break
    expect(row).to_have_attribute("data-state", "maintenance")
    expect(row.locator(".drain-progress")).to_have_text(
        "in maintenance: drained, no session left")
    expect(row.locator("button.drain")).to_have_count(0)

    row.locator("button.enable").click()
    expect(row).to_have_attribute("data-state", "enabled")
    expect(page.locator("#hosts-message")).to_have_text(f"{host_a} is enabled")
    expect(row.locator(".drain-deadline")).to_have_count(0)
    expect(row.locator(".drain-progress")).to_have_count(0)
    expect(row.locator("button.enable")).to_have_count(0)
    assert HostService(site.world.ctx).get(host_a).state == "enabled"


def test_enable_straight_after_drain_brings_the_host_back(page: Page, site: Site) -> None:
    open_admin(page, site)
    row = host_row(page, "h1")
    row.locator("button.drain").click()
    page.click("#confirm-ok")  # the default grace, 30 minutes
    expect(row).to_have_attribute("data-state", "draining")
    deadline = datetime.fromisoformat(
        row.locator(".drain-deadline").get_attribute("data-deadline") or "")
    assert deadline - datetime.now(UTC) > timedelta(minutes=29)
    row.locator("button.enable").click()
    expect(row).to_have_attribute("data-state", "enabled")
    assert HostService(site.world.ctx).get("h1").drain_deadline is None


def test_an_admin_logs_a_users_desktop_off_from_the_desktops_table(
        page: Page, site: Site) -> None:
    desktop, _ = connect_alice(site)
    open_admin(page, site)
    held = page.locator(f'#desktops tbody tr[data-name="{desktop}"]')
    expect(held).to_have_attribute("data-state", "reserved")
    expect(held.locator("td.user")).to_have_text("alice")
    expect(page.locator("#desktops tbody button.logoff")).to_have_count(1)  # only hers

    held.locator("button.logoff").click()
    page.click("#confirm-cancel")  # changing one's mind changes nothing
    expect(page.locator("#confirm")).to_be_hidden()
    assert site.desktop(desktop)[0] == "reserved"

    held.locator("button.logoff").click()
    page.click("#confirm-ok")
    message = page.locator("#desktops-message")
    expect(message).to_have_text(re.compile(rf"^logged off {desktop} \(alice\); it is now \w+$"))
    expect(held).not_to_have_attribute("data-state", "reserved")
    expect(held.locator("button.logoff")).to_have_count(0)
    state = site.desktop(desktop)[0]
    assert state not in ("reserved", "in_use", "idle")
    assert (message.inner_text() or "").endswith(f"it is now {state}")


def test_a_down_host_stands_out_with_its_error_and_can_be_enabled(
        page: Page, site: Site) -> None:
    error = "cannot reach a hypervisor at 'fake://second': connection reset by peer"
    with site.world.ctx.uow() as uow:  # what the reconciler records for a silent host
        host = uow.hosts.get_by_name("h2")
        host.state, host.last_error = HostState.DOWN, error
        uow.commit()
    open_admin(page, site)
    row = host_row(page, "h2")
    expect(row).to_have_attribute("data-state", "down")
    expect(row).to_have_class("host-down-row")
    expect(row.locator("td.state .badge")).to_have_text("down")
    expect(row.locator(".host-error")).to_have_text(error)
    expect(row.locator("button.drain")).to_have_count(0)
    expect(page.locator("#hosts-count")).to_have_text("(2; 1 down)")
    expect(host_row(page, "h1")).not_to_have_class("host-down-row")

    row.locator("button.enable").click()
    expect(row).to_have_attribute("data-state", "enabled")
    expect(row).not_to_have_class("host-down-row")
