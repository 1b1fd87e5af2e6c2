"""The admin view's pool, template and user actions in real Chromium against a real uvicorn
on the fake driver: resize, disable and enable, roll a new version out with a canary, roll it
back, delete the pool; remove an empty host; disable a user and give them a new password;
each step shown in the page's audit log with its old and new values."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect

from deskpool.api.app import create_app
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.hosts import HostService
from deskpool.services.pools import PoolService
from tests.broker_world import PASSWORD, BrokerWorld, make_world
from tests.browser.conftest import LiveServer, sign_in

pytestmark = pytest.mark.timeout(180)


@dataclass
class Site:
    world: BrokerWorld
    url: str


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    world = make_world(tmp_path)
    world.pool("lab")
    world.user("alice", entitled_to=("lab",))
    world.user("root", admin=True)
    world.fill()
    HostService(world.ctx).add("spare-host", "fake://spare")  # empty: its desktops are on h1
    disk = tmp_path / "v2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32M"], check=True)
    answer = world.client("root").post("/api/v1/admin/templates/golden/versions",
                                       json={"image": str(disk)})
    assert answer.status_code == 200, answer.text
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


def pool_row(page: Page) -> Locator:
    return page.locator('#pools tbody tr[data-name="lab"]')


def confirm(page: Page, fields: dict[str, str] | None = None) -> None:
    expect(page.locator("#confirm")).to_be_visible()
    for name, value in (fields or {}).items():
        page.fill(f'#confirm-fields input[name="{name}"]', value)
    page.click("#confirm-ok")
    expect(page.locator("#confirm")).to_be_hidden()


def audit_row(page: Page, action: str) -> Locator:
    return page.locator(f'#audit tbody tr[data-action="{action}"]').first


def test_a_pool_walk_from_the_page_is_in_the_audit_log(page: Page, site: Site) -> None:
    open_admin(page, site)
    row = pool_row(page)

    row.locator("button.resize").click()
    expect(page.locator('#confirm-fields input[name="spare"]')).to_have_value("2")
    confirm(page, {"spare": "1", "max_size": "3"})
    expect(page.locator("#pools-message")).to_contain_text("lab: min 0, spare 1, max 3")
    expect(audit_row(page, "pool.update")).to_contain_text('{"max_size":3,"spare":1}')

    row.locator("button.disable").click()
    confirm(page)
    expect(row).to_have_attribute("data-status", "disabled")
    refused = site.world.client("alice").post("/api/v1/pools/lab/connect")
    assert refused.status_code == 403
    row.locator("button.enable").click()
    expect(row).to_have_attribute("data-status", "enabled")

    row.locator("button.rollout").click()
    confirm(page, {"version": "2", "canary": "1"})
    expect(page.locator("#pools-message")).to_contain_text("lab now makes version 2")
    expect(audit_row(page, "pool.rollout")).to_contain_text('{"canary":1,"version":2}')
    assert PoolService(site.world.ctx).get("lab").version == 2

    row.locator("button.rollback").click()
    confirm(page)
    expect(page.locator("#pools-message")).to_contain_text("lab is back on version 1")
    expect(audit_row(page, "pool.rollback")).to_contain_text('{"canary":1,"version":1}')

    # A version in use cannot be deleted: the API's sentence stays in the dialog.
    page.locator('#templates tbody tr[data-name="golden/1"] button.delete').click()
    page.click("#confirm-ok")
    expect(page.locator("#confirm-error")).to_contain_text("is in use by pool lab")
    page.click("#confirm-cancel")

    row.locator("button.delete").click()
    confirm(page)
    expect(row).to_have_attribute("data-status", "deleting")
    expect(audit_row(page, "pool.delete")).to_contain_text('{"status":"deleting"}')
    for action in ("pool.update", "pool.disable", "pool.enable", "pool.rollout",
                   "pool.rollback", "pool.delete"):
        expect(audit_row(page, action)).to_contain_text("root")
    page.fill("#audit-target", "pool/lab")
    page.locator("#audit-target").dispatch_event("change")
    expect(page.locator("#audit tbody tr")).to_have_count(6)


def test_hosts_and_users_from_the_page(page: Page, site: Site) -> None:
    open_admin(page, site)
    expect(page.locator('#hosts tbody tr[data-name="h1"] button.remove')).to_have_count(0)
    page.locator('#hosts tbody tr[data-name="spare-host"] button.remove').click()
    confirm(page)
    expect(page.locator("#hosts-message")).to_contain_text("host spare-host removed")
    expect(page.locator('#hosts tbody tr[data-name="spare-host"]')).to_have_count(0)

    user = page.locator('#users tbody tr[data-name="alice"]')
    user.locator("button.disable").click()
    confirm(page)
    expect(user.locator("td.user-status")).to_have_text("disabled")
    assert site.world.client("alice").get("/api/v1/me").status_code == 401
    user.locator("button.enable").click()
    expect(user.locator("td.user-status")).to_have_text("enabled")
    user.locator("button.password").click()
    confirm(page)
    message = page.locator("#users-message")
    expect(message).to_contain_text("new password for alice (shown once): ")
    password = message.inner_text().rsplit(" ", 1)[-1]
    login = site.world.client().post("/api/v1/auth/login", json={"username": "alice",
                                                                 "password": password})
    assert login.status_code == 200
    expect(audit_row(page, "user.reset-password")).to_contain_text("127.0.0.1")

    page.click("#add-user summary")
    form = page.locator("#add-user-form")
    form.locator('input[name="name"]').fill("carol")
    form.locator('input[name="password"]').fill("short")
    form.locator('input[name="groups"]').fill("staff, lab-users")
    page.evaluate("document.getElementById('add-user-form').noValidate = true")
    page.click("#add-user-button")
    expect(page.locator("#add-user-error")).to_contain_text("password")
    form.locator('input[name="password"]').fill("long-enough-1")
    page.click("#add-user-button")
    expect(page.locator("#users-message")).to_contain_text("user carol added")
    expect(page.locator('#users tbody tr[data-name="carol"]')).to_contain_text(
        "lab-users, staff")

    page.locator('#entitlements tbody tr[data-name="lab/user/alice"] button.revoke').click()
    confirm(page)
    expect(page.locator('#entitlements tbody tr[data-name="lab/user/alice"]')).to_have_count(0)
    grants = site.world.client("root").get("/api/v1/admin/entitlements").json()
    assert [g for g in grants if g["principal"] == "alice"] == []
    expect(audit_row(page, "entitlement.revoke")).to_contain_text('"principal":"alice"')


def test_machine_credentials_and_known_hosts_on_the_page(page: Page, site: Site) -> None:
    """Shown by desktop, path, size and hash, never content; the desktops' SSH host keys
    download as known_hosts."""
    from deskpool.services.machine_secrets import MachineSecrets

    MachineSecrets(site.world.ctx).set_credential("lab-01", "/etc/krb5.keytab", b"SECRET-KT")
    open_admin(page, site)
    row = page.locator('#credentials tbody tr[data-name="lab-01:/etc/krb5.keytab"]')
    expect(row).to_contain_text("9")
    assert "SECRET-KT" not in page.content()
    # Profile layers crossing between hosts: a table of its own, empty here.
    expect(page.locator("#copies")).to_have_attribute("data-rows", "0")
    expect(page.locator("#copies thead")).to_contain_text("To host")
    known = page.evaluate("""async () => (await fetch(
        document.getElementById('known-hosts').href)).text()""")
    names = [line.split()[0] for line in known.splitlines()]
    assert names and all(line.split()[1] == "ssh-ed25519" for line in known.splitlines())
    assert any("lab-01" in n for n in names), known
