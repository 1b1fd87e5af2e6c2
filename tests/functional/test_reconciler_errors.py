"""What a failing reconciler step leaves behind depends on what it raised: a lost race leaves
the desktop to the winner, a deskpool error puts it in ``error`` with a backoff (a temporary
error's own delay when it gives one), and a bug is logged with its trace and counted while the
desktop keeps its state and only waits."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import pytest

from deskpool.domain.errors import TemporaryError
from deskpool.domain.states import DesktopState, transition
from deskpool.reconciler.loop import Reconciler
from deskpool.store.models import Desktop
from tests.functional.test_host_grid import Grid


def one_pool_desktop(grid: Grid) -> Reconciler:
    """A pool that wants one desktop (its first pass writes the row, then provisions it)."""
    grid.host("a")
    grid.pool("lab", spare=1, max_size=1)
    return grid.reconciler()


def the_desktop(grid: Grid) -> Desktop:
    with grid.ctx.uow(read_only=True) as uow:
        (desktop,) = uow.pools.desktops(uow.pools.get_by_name("lab").id)
        uow.session.expunge(desktop)
        return desktop


def test_a_bug_in_a_step_is_logged_and_counted_and_leaves_the_desktop_as_it_was(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    reconciler = one_pool_desktop(grid)
    calls: list[uuid.UUID] = []

    def buggy_provision(desktop_id: uuid.UUID) -> None:
        calls.append(desktop_id)
        raise TypeError("provision() got an unexpected keyword argument 'oops'")

    reconciler.factory.provision = buggy_provision  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="deskpool.reconciler.loop"):
        report = reconciler.run_pass()

    assert report.created == 1 and report.bugs == 1
    assert len(report.errors) == 1 and "TypeError" in report.errors[0]
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and record.exc_info[0] is TypeError  # with its trace
    assert "Traceback" in caplog.text and "buggy_provision" in caplog.text
    desktop = the_desktop(grid)
    # Not the desktop's failure: its state and reason stay; it only waits before a retry.
    assert desktop.state is DesktopState.PROVISIONING and desktop.last_error is None
    assert desktop.next_attempt_at is not None and desktop.next_attempt_at > grid.clock.now

    assert reconciler.run_pass().bugs == 0 and len(calls) == 1  # no hot loop: it waits
    grid.clock.now = desktop.next_attempt_at
    assert reconciler.run_pass().bugs == 1 and len(calls) == 2  # then it is tried again


def test_a_step_that_loses_a_race_leaves_the_desktop_to_the_winner(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    reconciler = one_pool_desktop(grid)
    provision = reconciler.factory.provision

    def deleted_meanwhile(desktop_id: uuid.UUID) -> None:
        # An administrator deletes the desktop while the step makes its VM: the step's own
        # state change (provisioning -> customizing) then finds it moved on.
        with grid.ctx.uow() as uow:
            transition(uow.desktops, desktop_id, DesktopState.PROVISIONING,
                       DesktopState.DELETING)
            uow.commit()
        provision(desktop_id)

    reconciler.factory.provision = deleted_meanwhile  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="deskpool.reconciler.loop"):
        report = reconciler.run_pass()

    assert report.errors == [] and report.bugs == 0
    assert any("lost a race" in r.getMessage() for r in caplog.records)
    desktop = the_desktop(grid)
    assert desktop.state is DesktopState.DELETING  # the winner's
    assert (desktop.last_error, desktop.retry_count, desktop.next_attempt_at) == (None, 0, None)


@pytest.mark.parametrize("delay", [None, 120.0])
def test_a_temporary_error_puts_the_desktop_in_error_for_its_delay_or_the_backoff(
        grid: Grid, delay: float | None) -> None:
    reconciler = one_pool_desktop(grid)

    def host_busy(desktop_id: uuid.UUID) -> None:
        raise TemporaryError("the host is busy copying images", delay=delay)

    reconciler.factory.provision = host_busy  # type: ignore[method-assign]
    report = reconciler.run_pass()

    assert report.errors == [f"desktop {the_desktop(grid).id}: the host is busy copying images"]
    assert report.bugs == 0
    desktop = the_desktop(grid)
    assert desktop.state is DesktopState.ERROR
    assert desktop.last_error == "the host is busy copying images"
    waited = timedelta(seconds=delay) if delay is not None else timedelta(seconds=5)
    assert desktop.retry_count == 1
    assert desktop.next_attempt_at == grid.clock.now + waited
