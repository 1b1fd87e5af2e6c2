"""Linux accounts: one uid per user, allocated once, the same ever after."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from deskpool.domain.accounts import FIRST_UID
from deskpool.domain.errors import InvalidInput
from deskpool.store import UnitOfWork
from tests.unit.store_helpers import (
    engine_fixture,  # noqa: F401
    sessions_fixture,  # noqa: F401
)


def test_a_uid_is_allocated_once_and_kept(sessions: sessionmaker[Session]) -> None:
    with UnitOfWork(sessions) as uow:
        assert uow.linux_accounts.get_or_allocate("Alice", "alice") == ("alice", FIRST_UID)
        assert uow.linux_accounts.get_or_allocate("bob@corp", "bob") == ("bob", FIRST_UID + 1)
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.linux_accounts.get_or_allocate("Alice", "alice") == ("alice", FIRST_UID)
        assert uow.linux_accounts.find("bob@corp") == ("bob", FIRST_UID + 1)
        assert uow.linux_accounts.find("carol") is None


def test_a_second_user_mapping_to_a_taken_account_is_refused(
        sessions: sessionmaker[Session]) -> None:
    with UnitOfWork(sessions) as uow:
        uow.linux_accounts.get_or_allocate("Alice", "alice")
        with pytest.raises(InvalidInput, match="already user 'Alice'"):
            uow.linux_accounts.get_or_allocate("alice@corp.example", "alice")


def test_a_uid_taken_meanwhile_by_another_broker_is_skipped(
        sessions: sessionmaker[Session]) -> None:
    with UnitOfWork(sessions) as first, UnitOfWork(sessions) as second:
        first.linux_accounts.get_or_allocate("alice", "alice")
        first.commit()
        # ``second`` began before the commit; its max(uid) may be stale: the unique uid
        # makes it retry rather than share a uid.
        assert second.linux_accounts.get_or_allocate("bob", "bob") == ("bob", FIRST_UID + 1)
        second.commit()
