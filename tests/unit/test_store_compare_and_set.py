"""deskpool.store: desktop state and power changed by compare-and-set, races, stale writes."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker

from deskpool.domain.errors import Conflict, InvalidInput, InvalidTransition
from deskpool.domain.models import PowerState
from deskpool.domain.states import DesktopTask
from deskpool.store import Desktop, UnitOfWork, make_engine, make_session_factory
from tests.unit.store_helpers import (
    Seed,
    add_desktop,
    engine_fixture,  # noqa: F401
    seed_fixture,  # noqa: F401
    sessions_fixture,  # noqa: F401
)

# --- desktops and compare-and-set -----------------------------------------------------------


def test_compare_and_set_state_wins_once(sessions: sessionmaker[Session], seed: Seed) -> None:
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        before = desktop.state_changed_at
        assert desktop.version == 1

        assert uow.desktops.compare_and_set_state(desktop_id, "ready", "recycling",
                                                  task=DesktopTask.REVERT)
        # The loaded object was expired and now shows the new row.
        assert (desktop.state, desktop.task, desktop.version) == ("recycling", "revert", 2)
        assert desktop.state_changed_at >= before
        assert desktop.state_changed_at.tzinfo is not None

        assert not uow.desktops.compare_and_set_state(desktop_id, "ready", "reserved")
        assert desktop.version == 2
        uow.commit()

    with UnitOfWork(sessions) as uow:  # a second broker with the old expectation loses
        assert not uow.desktops.compare_and_set_state(desktop_id, "ready", "reserved")
        assert uow.desktops.compare_and_set_state(
            desktop_id, "recycling", "error", last_error="agent silent"
        )
        uow.commit()

    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        assert (desktop.state, desktop.task, desktop.last_error) == ("error", None, "agent silent")
        assert desktop.version == 3
        assert not uow.desktops.compare_and_set_state(uuid.uuid4(), "error", "recycling")


def test_compare_and_set_state_is_rolled_back_with_its_unit_of_work(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        assert uow.desktops.compare_and_set_state(desktop_id, "ready", "reserved")
    with UnitOfWork(sessions) as uow:
        assert uow.desktops.get(desktop_id).state == "ready"


@pytest.mark.parametrize("engines", [1, 2], ids=["one-engine", "two-brokers"])
def test_racing_threads_have_exactly_one_winner(
    tmp_path: Path, engine: Engine, sessions: sessionmaker[Session], seed: Seed, engines: int
) -> None:
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    # engines=2: two engines (two "brokers") with their own connection pools.
    factories = [sessions]
    extra: list[Engine] = []
    if engines == 2:
        extra.append(make_engine(str(engine.url)))
        factories.append(make_session_factory(extra[0]))

    threads_count = 20
    barrier = threading.Barrier(threads_count)
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def claim(i: int) -> None:
        try:
            barrier.wait()
            with UnitOfWork(factories[i % len(factories)]) as uow:
                desktop = uow.desktops.get(desktop_id)
                expected = desktop.state  # every thread read "ready" or lost already
                won = expected == "ready" and uow.desktops.compare_and_set_state(
                    desktop_id, "ready", "reserved", last_error=f"claim-{i}"
                )
                uow.commit()
                results[i] = won
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for extra_engine in extra:
        extra_engine.dispose()

    assert errors == []
    assert len(results) == threads_count
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        assert (desktop.state, desktop.last_error, desktop.version) == (
            "reserved",
            f"claim-{winners[0]}",
            2,
        )


def test_racing_compare_and_set_without_reading_first(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    """Blind CAS from many threads: the WHERE clause alone picks one winner."""
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    barrier = threading.Barrier(20)
    outcomes: list[bool] = []
    lock = threading.Lock()

    def claim() -> None:
        barrier.wait()
        with UnitOfWork(sessions) as uow:
            won = uow.desktops.compare_and_set_state(desktop_id, "ready", "reserved")
            uow.commit()
        with lock:
            outcomes.append(won)

    threads = [threading.Thread(target=claim) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == [False] * 19 + [True]


def test_assigning_desktop_state_through_the_orm_is_refused(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        uow.desktops.get(desktop_id).state = "in_use"
        with pytest.raises(InvalidTransition, match="compare_and_set_state"):
            uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.desktops.get(desktop_id).state == "ready"


def test_compare_and_set_state_rejects_an_oversized_state(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow, pytest.raises(InvalidInput, match="not a desktop state"):
        uow.desktops.compare_and_set_state(desktop_id, "ready", "x" * 33)


def test_compare_and_set_state_refuses_a_move_the_table_forbids(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        with pytest.raises(InvalidTransition, match="cannot go from ready to provisioning"):
            uow.desktops.compare_and_set_state(desktop_id, "ready", "provisioning")
        assert uow.desktops.get(desktop_id).state == "ready"


def test_a_stale_orm_write_is_a_conflict(sessions: sessionmaker[Session], seed: Seed) -> None:
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        # Someone else writes the row behind this session's back (no expiry of `desktop`).
        uow.session.execute(
            update(Desktop)
            .where(Desktop.id == desktop_id)
            .values(version=Desktop.version + 1)
            .execution_options(synchronize_session=False)
        )
        desktop.notice = "retired"
        with pytest.raises(Conflict, match="changed by someone else"):
            uow.commit()


def test_compare_and_set_power(sessions: sessionmaker[Session], seed: Seed) -> None:
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        assert uow.desktops.compare_and_set_power(
            desktop_id, PowerState.UNKNOWN, PowerState.RUNNING
        )
        assert not uow.desktops.compare_and_set_power(
            desktop_id, PowerState.UNKNOWN, PowerState.SHUTOFF
        )
        uow.commit()
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        assert (desktop.power_state, desktop.state, desktop.version) == (
            PowerState.RUNNING,
            "ready",
            2,
        )
