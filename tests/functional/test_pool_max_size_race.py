"""A pool never grows past its max_size when a desktop is made for a user while another actor
adds one. Found by bench/r1_kill.py on PostgreSQL: a pool of max 3 had 4 desktops being made,
the broker's "made for you" desktop and the reconciler's sizing having each counted the seats
before the other's insert was committed. On SQLite, writers are serialized and it held."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.handover import Broker, Handover
from deskpool.domain.errors import DeskpoolError, PoolExhausted
from deskpool.domain.users import Identity
from deskpool.drivers.registry import forget_fake_hosts
from deskpool.reconciler.loop import Reconciler
from deskpool.services.context import ServiceContext
from deskpool.services.factory import DesktopFactory
from deskpool.services.pools import insert_pool_desktop
from tests.broker_world import BrokerWorld, make_world

HOLD_S = 1.0  # how long the other actor keeps its insert open: the logon reaches the pool


@pytest.fixture()
def world(tmp_path: Path, database_url: str) -> Iterator[BrokerWorld]:
    w = make_world(tmp_path, database_url=database_url)
    yield w
    w.ctx.close()
    forget_fake_hosts()


def _pool_rows(ctx: ServiceContext, pool: str) -> list[str]:
    with ctx.uow(read_only=True) as uow:
        return [d.name for d in uow.pools.desktops(uow.pools.get_by_name(pool).id)]


def _while_another_adds_the_last_seat(world: BrokerWorld, pool: str, act: object) -> object:
    """Run ``act`` in a thread while another broker (its own context) holds an insert of the
    pool's last desktop open, then commits it; returns what ``act`` returned or raised."""
    other = ServiceContext(world.ctx.settings)
    result: list[object] = []

    def run() -> None:
        try:
            result.append(act())  # type: ignore[operator]
        except DeskpoolError as exc:
            result.append(exc)

    try:
        with other.uow() as uow:
            row = uow.pools.get_by_name(pool)
            insert_pool_desktop(uow, DesktopFactory(other), row, uow.desktops.macs(),
                                assigned_user="bob")
            uow.flush()
            thread = threading.Thread(target=run)
            thread.start()
            time.sleep(HOLD_S)  # the act reads the pool now, before the commit below
            uow.commit()
        thread.join(timeout=60)
        assert not thread.is_alive()
    finally:
        other.close()
    return result[0]


def test_a_desktop_made_for_a_user_never_passes_max_size(world: BrokerWorld) -> None:
    world.pool("tight", spare=0, max_size=1)
    EntitlementService(world.ctx).grant("tight", "user", "ann")
    ann = Identity(name="ann", display_name="ann", source="local")
    outcome = _while_another_adds_the_last_seat(
        world, "tight", lambda: Broker(world.ctx).connect(ann, "tight"))
    assert len(_pool_rows(world.ctx, "tight")) == 1, outcome
    assert isinstance(outcome, PoolExhausted), outcome  # bob's seat is the pool's only one
    assert not isinstance(outcome, Handover)


def test_sizing_never_passes_max_size_beside_a_desktop_made_for_a_user(
        world: BrokerWorld) -> None:
    world.pool("tight", spare=1, max_size=1, min_size=0)
    reconciler = Reconciler(world.ctx, workers=1, ready_timeout_s=5)
    _while_another_adds_the_last_seat(world, "tight", lambda: reconciler.run_pass())
    assert len(_pool_rows(world.ctx, "tight")) == 1
