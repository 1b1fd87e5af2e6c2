"""A directory user's desktop account from their LDAP entry's uidNumber / gidNumber: carried
from sign-in through their token to the account deskpool records, and refused with a clear
message when the directory's numbers are a system account's or another user's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from deskpool.broker.accounts import AccountService
from deskpool.broker.desktop_session import SessionStarter
from deskpool.broker.ldap_auth import LdapAuthenticator, LdapSettings
from deskpool.config import Settings
from deskpool.domain.accounts import FIRST_UID, AccountRefused
from deskpool.services.context import ServiceContext
from tests.ldap_server import (
    GROUPS_DN,
    PEOPLE_DN,
    POSIX_USERS,
    READER_DN,
    READER_PASSWORD,
    SlapdServer,
)


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdServer]:
    with SlapdServer() as server:
        yield server


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    context = ServiceContext(Settings(data_dir=tmp_path / "data"))
    yield context
    context.close()


@pytest.fixture
def accounts(ctx: ServiceContext, slapd: SlapdServer) -> AccountService:
    return AccountService(ctx, [LdapAuthenticator(LdapSettings(
        url=slapd.url, bind_dn=READER_DN, bind_password=READER_PASSWORD,
        user_base=PEOPLE_DN, group_base=GROUPS_DN, timeout_s=2))])


def test_the_directorys_numbers_survive_the_token_and_make_the_account(
        ctx: ServiceContext, accounts: AccountService) -> None:
    signed = accounts.sign_in("erin", "erin-pw")
    # What hand-over sees: the identity behind the token, not the one from the bind.
    resolved = accounts.resolve(signed.token)
    assert (resolved.uid, resolved.gid) == POSIX_USERS["erin"]
    starter = SessionStarter(ctx)
    assert starter.account_for(resolved) == ("erin", 20001)
    with ctx.uow(read_only=True) as uow:
        assert uow.linux_accounts.gid_of("erin") == 5000
    # A directory user without numbers, and a local one, get deskpool's own uids.
    alice = accounts.resolve(accounts.sign_in("alice", "alice-pw").token)
    assert alice.uid is None and starter.account_for(alice) == ("alice", FIRST_UID)


def test_a_system_uid_from_the_directory_is_refused(ctx: ServiceContext,
                                                    accounts: AccountService) -> None:
    frank = accounts.resolve(accounts.sign_in("frank", "frank-pw").token)
    assert frank.uid == 500
    with pytest.raises(AccountRefused, match="uidNumber 500, below 1000"):
        SessionStarter(ctx).account_for(frank)


def test_two_directory_users_with_one_uid_are_not_merged(ctx: ServiceContext,
                                                         accounts: AccountService) -> None:
    starter = SessionStarter(ctx)
    erin = accounts.resolve(accounts.sign_in("erin", "erin-pw").token)
    gus = accounts.resolve(accounts.sign_in("gus", "gus-pw").token)
    assert starter.account_for(erin) == ("erin", 20001)
    with pytest.raises(AccountRefused, match="uidNumber 20001, which is already user 'erin'"):
        starter.account_for(gus)
