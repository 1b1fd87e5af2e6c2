"""A pool broken by its template disk, in the admin page (real Chromium, real uvicorn, fake
driver): the pool's row says broken, why, and when the next try is; the admin's "Clear
fault" clears it (audited) and the pool refills."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from deskpool.api.app import create_app
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.services.pools import PoolService
from tests.broker_world import PASSWORD, BrokerWorld, make_world
from tests.browser.conftest import LiveServer, sign_in

pytestmark = pytest.mark.timeout(180)


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[tuple[BrokerWorld, str]]:
    world = make_world(tmp_path, host_uri="fake://tplfault-web")
    world.pool("lab", spare=1)
    world.user("root", admin=True)
    world.fill(passes=1)
    (volume,) = [v for v in world.fake.list_volumes() if v.startswith("tv-")]
    world.fake.tamper_volume(volume)  # bytes of the host's copy change
    PoolService(world.ctx).resize("lab", spare=2)
    world.fill(passes=1)
    world.fake.delete_volume(volume)  # then fixed by hand: a try would re-import it
    try:
        with LiveServer(create_app(world.ctx, directories=[], console_ws_port=6080)) as server:
            yield world, server.url
    finally:
        world.ctx.close()
        forget_fake_hosts()


def test_a_broken_pool_is_shown_and_cleared_from_the_page(
        page: Page, site: tuple[BrokerWorld, str]) -> None:
    world, url = site
    sign_in(page, url, "root", PASSWORD)
    expect(page.locator("#portal")).to_have_attribute("data-state", "home")
    page.goto(url + "/admin")
    expect(page.locator("#admin")).to_have_attribute("data-state", "loaded")
    row = page.locator('#pools tbody tr[data-name="lab"]')
    expect(row).to_have_attribute("data-broken", "yes")
    expect(row.locator(".badge.pool-broken")).to_have_text("broken")
    expect(row.locator(".pool-fault")).to_contain_text(
        "template 'golden' version 1 cannot be used on host 'h1'")
    expect(row.locator(".pool-fault")).to_contain_text("is corrupt")
    expect(row).to_contain_text("1 failed try")
    expect(row).to_contain_text("next try")

    row.locator("button.clear-fault").click()
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-ok")
    expect(page.locator("#confirm")).to_be_hidden()
    expect(page.locator("#pools-message")).to_contain_text("lab: fault cleared")
    expect(row).to_have_attribute("data-broken", "no")
    expect(row.locator("button.clear-fault")).to_have_count(0)
    expect(page.locator('#audit tbody tr[data-action="pool.clear-fault"]').first
           ).to_contain_text("root")
    world.fill(passes=1)
    assert PoolService(world.ctx).get("lab").counts == {"ready": 2}
