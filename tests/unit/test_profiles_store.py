"""The profile repository on SQLite and PostgreSQL: the generation compare-and-swap."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy.orm import Session, sessionmaker

from deskpool.domain.errors import Conflict, NotFound
from deskpool.domain.profiles import Layer, LayerState
from deskpool.store import UnitOfWork

from .store_helpers import engine_fixture, sessions_fixture  # noqa: F401


def _layer(user: str, generation: int, parent: uuid.UUID | None, state: LayerState,
           base: int | None = None) -> Layer:
    layer_id = uuid.uuid4()
    return Layer(id=layer_id, user=user, generation=generation, parent_id=parent,
                 path=f"{user}/{layer_id}.qcow2", state=state, base_generation=base)


def _seed(sessions: sessionmaker[Session], user: str = "ann") -> Layer:
    base = _layer(user, 1, None, LayerState.SESSION, base=0)
    with UnitOfWork(sessions) as uow:
        uow.profiles.create(user)
        uow.profiles.add_layer(base)
        assert uow.profiles.commit_generation(user, 0, base.id, 100)
        assert uow.profiles.set_layer_state(base.id, LayerState.SESSION, LayerState.COMMITTED)
        uow.commit()
    return base


def test_profile_starts_at_generation_zero_and_is_unique(sessions: sessionmaker[Session]
                                                        ) -> None:
    with UnitOfWork(sessions) as uow:
        profile = uow.profiles.create("ann")
        assert (profile.generation, profile.layer_id) == (0, None)
        with pytest.raises(Conflict):
            uow.profiles.create("ann")
    with UnitOfWork(sessions) as uow, pytest.raises(NotFound, match="no profile"):
        uow.profiles.get("bob")


def test_commit_is_a_compare_and_swap_on_the_generation(sessions: sessionmaker[Session]
                                                       ) -> None:
    base = _seed(sessions)
    a = _layer("ann", 2, base.id, LayerState.SESSION, base=1)
    b = _layer("ann", 2, base.id, LayerState.SESSION, base=1)
    with UnitOfWork(sessions) as uow:
        uow.profiles.add_layer(a)
        uow.profiles.add_layer(b)
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.profiles.commit_generation("ann", 1, a.id, 200)
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert not uow.profiles.commit_generation("ann", 1, b.id, 300)
        profile = uow.profiles.get("ann")
        assert (profile.generation, profile.layer_id, profile.size_bytes) == (2, a.id, 200)


def test_layer_state_moves_only_from_the_expected_state(sessions: sessionmaker[Session]
                                                       ) -> None:
    base = _seed(sessions)
    with UnitOfWork(sessions) as uow:
        assert not uow.profiles.set_layer_state(base.id, LayerState.SESSION,
                                                LayerState.UNCLEAN)
        assert uow.profiles.layer(base.id).state is LayerState.COMMITTED


def test_racing_commits_from_one_generation_have_one_winner(sessions: sessionmaker[Session]
                                                           ) -> None:
    base = _seed(sessions)
    contenders = [_layer("ann", 2, base.id, LayerState.SESSION, base=1) for _ in range(6)]
    with UnitOfWork(sessions) as uow:
        for layer in contenders:
            uow.profiles.add_layer(layer)
        uow.commit()
    wins: list[uuid.UUID] = []
    barrier = threading.Barrier(len(contenders))

    def commit(layer: Layer) -> None:
        barrier.wait()
        with UnitOfWork(sessions) as uow:
            if uow.profiles.commit_generation("ann", 1, layer.id, 1):
                uow.commit()
                wins.append(layer.id)

    threads = [threading.Thread(target=commit, args=(layer,)) for layer in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    with UnitOfWork(sessions) as uow:
        assert uow.profiles.get("ann").layer_id == wins[0]
