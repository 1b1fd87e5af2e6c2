"""Which hosts hold which profile layers, on SQLite and PostgreSQL: a copy's record goes
``copying -> held`` only for the process copying it, another live copy is never taken over,
a dead one is, and recovery removes only dead copies, never a held record."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from deskpool.domain.profile_hosts import HoldState
from deskpool.domain.profiles import Layer, LayerState
from deskpool.store import UnitOfWork
from deskpool.store.models import Host

from .store_helpers import engine_fixture, sessions_fixture  # noqa: F401


def _world(sessions: sessionmaker[Session]) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    layer_id = uuid.uuid4()
    with UnitOfWork(sessions) as uow:
        a = uow.hosts.add(Host(name="host-a", uri="test:///default")).id
        b = uow.hosts.add(Host(name="host-b", uri="test:///default")).id
        uow.profiles.create("ann")
        uow.profiles.add_layer(Layer(id=layer_id, user="ann", generation=1, parent_id=None,
                                     path=f"ann/{layer_id}.qcow2",
                                     state=LayerState.COMMITTED))
        uow.commit()
    return layer_id, a, b


def test_a_copy_is_held_only_once_its_copier_finishes_it(
        sessions: sessionmaker[Session]) -> None:
    layer, a, b = _world(sessions)
    long_ago = datetime.now(UTC) - timedelta(minutes=1)
    with UnitOfWork(sessions) as uow:
        uow.profile_holders.mark_held(layer, a, 1000)
        assert uow.profile_holders.begin_copy(layer, b, 1000, "broker-1", long_ago)
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.profile_holders.holders([layer]) == {layer: {a}}
        # Another live broker neither takes the copy over nor finishes it.
        assert not uow.profile_holders.begin_copy(layer, b, 1000, "broker-2", long_ago)
        assert not uow.profile_holders.finish_copy(layer, b, "broker-2")
        assert uow.profile_holders.progress(layer, b, "broker-1", 400)
        assert uow.profile_holders.finish_copy(layer, b, "broker-1")
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.profile_holders.holders([layer]) == {layer: {a, b}}
        held = uow.profile_holders.find(layer, b)
        assert held is not None and held.state is HoldState.HELD
        assert held.bytes_done == held.bytes_total == 1000
        # A held layer is never "copied again" nor removed by a recovery.
        assert not uow.profile_holders.begin_copy(layer, b, 1000, "broker-2",
                                                  datetime.now(UTC) + timedelta(hours=1))
        assert not uow.profile_holders.drop_copy(layer, b,
                                                 stale_before=datetime.now(UTC) + timedelta(1))


def test_a_dead_copy_is_taken_over_or_removed_never_a_live_one(
        sessions: sessionmaker[Session]) -> None:
    layer, _a, b = _world(sessions)
    with UnitOfWork(sessions) as uow:
        assert uow.profile_holders.begin_copy(layer, b, 1000, "dead-broker",
                                              datetime.now(UTC) - timedelta(minutes=1))
        uow.commit()
    now = datetime.now(UTC)
    with UnitOfWork(sessions) as uow:
        # Not yet stale: a recovery leaves it.
        assert not uow.profile_holders.drop_copy(layer, b,
                                                 stale_before=now - timedelta(minutes=1))
        # Stale: another broker takes it over (and the dead one can no longer finish it).
        assert uow.profile_holders.begin_copy(layer, b, 1000, "broker-2",
                                              now + timedelta(seconds=1))
        assert not uow.profile_holders.finish_copy(layer, b, "dead-broker")
        uow.commit()
    with UnitOfWork(sessions) as uow:
        record = uow.profile_holders.find(layer, b)
        assert record is not None and record.copier == "broker-2"
        assert record.state is HoldState.COPYING
        # A first copy in flight: the layer has a record, but nobody holds it yet.
        assert uow.profile_holders.holders([layer]) == {layer: set()}
        assert uow.profile_holders.drop_copy(layer, b,
                                             stale_before=datetime.now(UTC) + timedelta(1))
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.profile_holders.holders([layer]) == {}
