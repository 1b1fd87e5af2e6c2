"""Linux accounts: one uid per user, allocated once, the same ever after."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from deskpool.domain.accounts import FIRST_UID, AccountRefused
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


# --- numbers from the directory (LDAP uidNumber / gidNumber) ---------------------------------


def test_directory_numbers_are_recorded_and_kept(sessions: sessionmaker[Session]) -> None:
    with UnitOfWork(sessions) as uow:
        accounts = uow.linux_accounts
        assert accounts.get_or_allocate("erin", "erin", uid=20001, gid=5000) == ("erin", 20001)
        assert accounts.gid_of("erin") == 5000
        # Without a gidNumber the user's private group has the uid's number.
        assert accounts.get_or_allocate("ivy", "ivy", uid=3000) == ("ivy", 3000)
        assert accounts.gid_of("ivy") == 3000
        uow.commit()
    with UnitOfWork(sessions) as uow:
        # A later sign-in without numbers (a directory that dropped them) keeps the record.
        assert uow.linux_accounts.get_or_allocate("erin", "erin") == ("erin", 20001)
        assert uow.linux_accounts.gid_of("erin") == 5000


def test_a_directory_that_changes_a_number_is_followed(sessions: sessionmaker[Session]) -> None:
    with UnitOfWork(sessions) as uow:
        uow.linux_accounts.get_or_allocate("erin", "erin")  # before the directory had numbers
        assert uow.linux_accounts.get_or_allocate("erin", "erin", uid=20001, gid=5000) == (
            "erin", 20001)
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.linux_accounts.find("erin") == ("erin", 20001)
        assert uow.linux_accounts.gid_of("erin") == 5000


@pytest.mark.parametrize(("uid", "gid", "problem"), [
    (500, None, "uidNumber 500, below 1000"),
    (0, None, "uidNumber 0, below 1000"),
    (20001, 27, "gidNumber 27, one of the desktops' system groups"),
])
def test_system_numbers_from_the_directory_are_refused(
        sessions: sessionmaker[Session], uid: int, gid: int | None, problem: str) -> None:
    with UnitOfWork(sessions) as uow:
        with pytest.raises(AccountRefused, match=problem):
            uow.linux_accounts.get_or_allocate("frank", "frank", uid=uid, gid=gid)
        assert uow.linux_accounts.find("frank") is None


def test_a_directory_uid_another_user_has_is_refused(sessions: sessionmaker[Session]) -> None:
    with UnitOfWork(sessions) as uow:
        assert uow.linux_accounts.get_or_allocate("alice", "alice") == ("alice", FIRST_UID)
        uow.linux_accounts.get_or_allocate("erin", "erin", uid=20001)
        with pytest.raises(AccountRefused, match="already user 'erin'"):
            uow.linux_accounts.get_or_allocate("gus", "gus", uid=20001)
        with pytest.raises(AccountRefused, match="already user 'alice'"):
            uow.linux_accounts.get_or_allocate("hal", "hal", uid=FIRST_UID)
        # Users may share a group.
        assert uow.linux_accounts.get_or_allocate("ida", "ida", uid=20002, gid=20001) == (
            "ida", 20002)


def test_local_uids_skip_directory_numbers_and_stay_in_their_range(
        sessions: sessionmaker[Session]) -> None:
    with UnitOfWork(sessions) as uow:
        accounts = uow.linux_accounts
        accounts.get_or_allocate("erin", "erin", uid=FIRST_UID)  # a directory uid in our range
        accounts.get_or_allocate("zed", "zed", uid=2_000_000)  # far above it
        assert accounts.get_or_allocate("alice", "alice") == ("alice", FIRST_UID + 1)
        assert accounts.get_or_allocate("bob", "bob") == ("bob", FIRST_UID + 2)
        assert accounts.gid_of("bob") == FIRST_UID + 2
