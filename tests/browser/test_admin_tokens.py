"""A user's tokens in the admin view, in real Chromium against a real uvicorn on the fake
driver: the administrator opens a user's tokens (API tokens and browser sessions, with their
label, creation and expiry, never a secret), revokes one, and the token opens nothing from
then on; the revoke is in the page's audit log with who, from where and what. A revoke
from another site's page, or one that says nowhere where it comes from, is refused by the
same Origin check as every other admin action."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.broker_world import BrokerWorld, lab_world
from tests.browser.conftest import LiveServer
from tests.browser.test_admin_manage import Site, audit_row, confirm, open_admin

pytestmark = pytest.mark.timeout(180)


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[Site]:
    with lab_world(tmp_path) as world, LiveServer(world.client().app) as server:
        yield Site(world=world, url=server.url)


def issue(world: BrokerWorld, user: str, label: str, days: int) -> dict[str, str]:
    answer = world.client(user).post("/api/v1/auth/tokens",
                                     json={"label": label, "expires_in_days": days})
    assert answer.status_code == 200, answer.text
    issued: dict[str, str] = answer.json()
    return issued


def test_an_admin_lists_and_revokes_a_users_token_and_it_is_audited(page: Page,
                                                                      site: Site) -> None:
    world = site.world
    script = issue(world, "alice", "nightly-report", 30)
    laptop = issue(world, "alice", "laptop", 7)
    open_admin(page, site)
    assert page.locator("#user-tokens").is_hidden()

    page.locator('#users tbody tr[data-name="alice"] button.tokens').click()
    panel = page.locator("#user-tokens")
    expect(panel).to_be_visible()
    expect(page.locator("#tokens-user")).to_have_text("alice")
    # Her two new tokens and the "tests" token the world made her, all API tokens.
    rows = page.locator("#tokens tbody tr")
    expect(rows).to_have_count(3)
    row = page.locator('#tokens tbody tr[data-label="nightly-report"]')
    expect(row.locator("td.kind")).to_have_text("API token")
    expires = datetime.fromisoformat(script["expires_at"])
    assert abs(expires - datetime.now(UTC) - timedelta(days=30)) < timedelta(minutes=5)
    # The page shows dates in the browser's locale: compare with its own rendering.
    shown = page.evaluate("(iso) => new Date(iso).toLocaleString()", script["expires_at"])
    expect(row.locator("td.expires")).to_have_text(shown)
    expect(row.locator("td.created")).not_to_be_empty()
    html = page.content()
    for secret in (script["token"], laptop["token"], world.tokens["alice"]):
        assert secret not in html

    row.locator("button.revoke").click()
    expect(page.locator("#confirm-title")).to_have_text(
        'Revoke alice\'s API token "nightly-report"')
    confirm(page)
    expect(page.locator("#tokens-message")).to_contain_text(
        'revoked alice\'s API token "nightly-report"')
    expect(row).to_have_count(0)
    expect(rows).to_have_count(2)
    me = world.client().get("/api/v1/me",
                            headers={"authorization": f"Bearer {script['token']}"})
    assert me.status_code == 401, me.text
    still = world.client().get("/api/v1/me",
                               headers={"authorization": f"Bearer {laptop['token']}"})
    assert still.status_code == 200, still.text

    entry = audit_row(page, "token.revoke")
    expect(entry).to_contain_text("root")
    expect(entry).to_contain_text("127.0.0.1")
    expect(entry).to_contain_text("user/alice")
    expect(entry).to_contain_text(f'"token":"{script["id"]}"')
    expect(entry).to_contain_text('"label":"nightly-report"')
    expect(entry).to_contain_text('{"revoked":true}')


def test_the_admins_own_session_is_marked_and_forged_revokes_are_refused(
        page: Page, site: Site) -> None:
    world = site.world
    laptop = issue(world, "alice", "laptop", 7)
    open_admin(page, site)
    page.locator('#users tbody tr[data-name="root"] button.tokens').click()
    mine = page.locator('#tokens tbody tr[data-kind="session"]')
    expect(mine).to_have_count(1)
    expect(mine).to_contain_text("this browser")
    expect(page.locator('#tokens tbody tr[data-kind="api"]')).not_to_contain_text(
        "this browser")
    mine.locator("button.revoke").click()
    expect(page.locator("#confirm-text")).to_contain_text("you are signed out at once")
    page.click("#confirm-cancel")

    # The same revoke with the page's session cookie, as another site's page would send it
    # (its Origin), or with no word of where it comes from: refused before the route runs.
    path = f"/api/v1/admin/users/alice/tokens/{laptop['id']}"
    forged = page.request.delete(site.url + path, headers={"origin": "https://evil.example"})
    assert forged.status == 403, forged.text()
    assert "another site's page" in forged.json()["detail"]
    bare = page.request.delete(site.url + path)
    assert bare.status == 403, bare.text()
    assert "Origin or Referer" in bare.json()["detail"]
    still = world.client().get("/api/v1/me",
                               headers={"authorization": f"Bearer {laptop['token']}"})
    assert still.status_code == 200, still.text
    # From the page's own origin the same call goes through.
    own = page.request.delete(site.url + path, headers={"origin": site.url})
    assert own.status == 204, own.text()

    # A user deleted while their tokens are shown: the panel closes, no error is left.
    page.locator('#users tbody tr[data-name="alice"] button.tokens').click()
    expect(page.locator("#tokens-user")).to_have_text("alice")
    assert world.client("root").delete("/api/v1/admin/users/alice").status_code == 204
    # The page refreshes every 3 s by default.
    expect(page.locator("#user-tokens")).to_be_hidden()
    expect(page.locator("#admin-error")).to_be_hidden()
