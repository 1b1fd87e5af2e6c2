"""What a failing reconciler step leaves behind depends on what it raised: a lost race leaves
the desktop to the winner, a deskpool error puts it in ``error`` with a backoff (a temporary
error's own delay when it gives one), and a bug is logged with its trace and counted while the
desktop keeps its state and only waits."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

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


def test_a_desktop_whose_guest_never_answers_holds_up_no_other_pool(grid: Grid) -> None:
    """Issue 16: one desktop waiting for its guest agent (here: until the test lets it go)
    must not stall the pass. A looping reconciler waits one interval for a pass's steps; the
    slow one goes on in the background and later passes leave its desktop alone."""
    grid.host("a")
    grid.pool("lab", spare=2, max_size=2)
    grid.pool("dev", spare=2, max_size=2)
    grid.pool("stuck", spare=1, max_size=1)
    reconciler = grid.reconciler()
    answer = threading.Event()
    waited: list[str] = []
    make_ready = reconciler.factory.make_ready

    def agent_never_answers_in_stuck(desktop_id: uuid.UUID, **kw: Any) -> None:
        with grid.ctx.uow(read_only=True) as uow:
            name = uow.desktops.get(desktop_id).name
        if name.startswith("stuck-"):
            waited.append(name)
            answer.wait(60)  # its own deadline, far longer than the test's passes
        make_ready(desktop_id, **kw)

    reconciler.factory.make_ready = agent_never_answers_in_stuck  # type: ignore[method-assign]
    try:
        interval, passes, reports = 0.5, 0, []
        others = {"lab-01", "lab-02", "dev-01", "dev-02"}
        while passes < 40:  # on a loaded machine the fast steps may take a few passes
            started = time.monotonic()
            reports.append(reconciler.run_pass(wait_s=interval))
            # Bounded by the interval (and the pass's own quick work), never by the slow step.
            assert time.monotonic() - started < interval + 10
            passes += 1
            states = {name: row.state for name, row in grid.rows().items()}
            if all(states.get(n) == "ready" for n in others):
                break
        assert all(states.get(n) == "ready" for n in others), states
        # ... while the stuck desktop's step still waits for its guest, started only once.
        assert states["stuck-01"] == "customizing" and waited == ["stuck-01"]
        assert reports[0].steps_running >= 1
        (stuck_id,) = [r.id for n, r in grid.rows().items() if n == "stuck-01"]
        assert reconciler.in_flight(stuck_id)
    finally:
        answer.set()
    deadline = time.monotonic() + 30
    while reconciler.in_flight(stuck_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not reconciler.in_flight(stuck_id)
    assert grid.rows()["stuck-01"].state == "ready"  # the slow step finished on its own
    reconciler.close()
