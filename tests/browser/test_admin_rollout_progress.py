"""A rollout's progress in the admin view, in real Chromium on the fake driver: the pool's row
counts its desktops by template version, so an administrator sees the canary made on the new
version, then the old free desktops replaced, then the rollback's return."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from deskpool.reconciler.loop import Reconciler
from tests.browser.test_admin_manage import Site, confirm, open_admin, pool_row, site

__all__ = ["site"]  # the fixture, shared with the pool walk


def settle(site: Site, passes: int = 4) -> None:
    reconciler = Reconciler(site.world.ctx, workers=4, ready_timeout_s=5)
    for _ in range(passes):
        reconciler.run_pass()


def test_the_pool_row_shows_its_desktops_by_version_through_a_rollout(page: Page,
                                                                      site: Site) -> None:
    open_admin(page, site)
    versions = pool_row(page).locator("td.versions")
    expect(versions).to_have_text("v1 2")  # spare 2, all on the first version

    pool_row(page).locator("button.rollout").click()
    confirm(page, {"version": "2", "canary": "1"})
    expect(page.locator("#pools-message")).to_contain_text("lab now makes version 2")
    settle(site, passes=1)
    # The canary is made first while the old free desktops still serve.
    expect(versions).to_contain_text("v2 ")
    expect(versions).to_contain_text("v1 ")
    settle(site)
    expect(versions).to_have_text("v2 2")

    pool_row(page).locator("button.rollback").click()
    confirm(page)
    settle(site)
    expect(versions).to_have_text("v1 2")
