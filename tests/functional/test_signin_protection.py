"""Sign-in protection: failed sign-ins lock a user name and a client address for a while
(doubling, capped), a locked key is refused before its password is looked at, a success clears
the user's count, brokers sharing a database share the counts, and an unknown user costs one
password hash check like a known one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deskpool.api.app import create_app
from deskpool.broker import accounts as accounts_module
from deskpool.broker.accounts import AccountService
from deskpool.config import Settings
from deskpool.domain.errors import AuthenticationFailed, SignInLocked
from deskpool.domain.users import Identity
from deskpool.services.context import ServiceContext

PASSWORD = "correct-horse"
LOGIN = "/api/v1/auth/login"


class Clock:
    """A clock the test moves by hand: no sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class SpyHasher:
    """Argon2's hasher, noting each hash a password is verified against."""

    def __init__(self) -> None:
        self.real = accounts_module._hasher
        self.checked: list[str] = []

    def hash(self, password: str) -> str:
        return self.real.hash(password)

    def verify(self, stored: str, password: str) -> bool:
        self.checked.append(stored)
        return self.real.verify(stored, password)


def settings(tmp_path: Path, address_max_failures: int, url: str | None = None) -> Settings:
    return Settings(data_dir=tmp_path / "data",
                    database_url=url or f"sqlite:///{tmp_path / 'deskpool.db'}",
                    signin_address_max_failures=address_max_failures)


@pytest.fixture()
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    context = ServiceContext(settings(tmp_path, 1000))
    AccountService(context).create_user("alice", PASSWORD)
    yield context
    context.close()


@pytest.fixture()
def clock() -> Clock:
    return Clock()


def fail(accounts: AccountService, user: str = "alice", address: str | None = "10.0.0.1",
         times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(AuthenticationFailed, match="wrong user name or password"):
            accounts.sign_in(user, "wrong-password", address=address)


def test_five_failures_lock_the_user_even_against_the_right_password(
        ctx: ServiceContext, clock: Clock) -> None:
    accounts = AccountService(ctx, clock=clock)
    fail(accounts, times=4)
    with pytest.raises(SignInLocked, match="too many failed sign-ins for 'alice'; "
                                           "try again in 30 s") as tripped:
        accounts.sign_in("alice", "wrong-password", address="10.0.0.1")
    assert tripped.value.delay == 30
    clock.advance(29)
    with pytest.raises(SignInLocked, match="try again in 1 s"):
        accounts.sign_in("ALICE", PASSWORD, address="10.0.0.2")  # any case, any address
    clock.advance(1)
    assert accounts.sign_in("alice", PASSWORD).identity.name == "alice"


def test_a_locked_user_is_refused_before_the_password_is_checked(
        ctx: ServiceContext, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = AccountService(ctx, clock=clock)
    with pytest.raises(SignInLocked):
        fail(accounts, times=5)
    spy = SpyHasher()
    monkeypatch.setattr(accounts_module, "_hasher", spy)
    with pytest.raises(SignInLocked):
        accounts.sign_in("alice", PASSWORD)
    assert spy.checked == []  # no password oracle while locked


def test_success_clears_the_user_count(ctx: ServiceContext, clock: Clock) -> None:
    accounts = AccountService(ctx, clock=clock)
    fail(accounts, times=4)
    accounts.sign_in("alice", PASSWORD, address="10.0.0.1")
    fail(accounts, times=4)  # four more are allowed again: the count restarted
    with pytest.raises(SignInLocked):
        fail(accounts)


def test_failures_outside_the_window_do_not_add_up(ctx: ServiceContext, clock: Clock) -> None:
    accounts = AccountService(ctx, clock=clock)
    fail(accounts, times=4)
    clock.advance(15 * 60)
    fail(accounts, times=4)  # a new window: still not locked


def test_each_further_lock_lasts_twice_as_long_up_to_the_cap(
        ctx: ServiceContext, clock: Clock) -> None:
    accounts = AccountService(ctx, clock=clock)
    seen: list[float | None] = []
    for _ in range(7):
        fail(accounts, times=4)
        with pytest.raises(SignInLocked) as locked:
            fail(accounts)
        seen.append(locked.value.delay)
        clock.advance(locked.value.delay or 0)
    assert seen == [30, 60, 120, 240, 480, 900, 900]
    clock.advance(15 * 60)  # quiet for a whole window after the lock: forgiven
    fail(accounts, times=4)
    with pytest.raises(SignInLocked) as again:
        fail(accounts)
    assert again.value.delay == 30


def test_unknown_users_are_counted_and_locked_like_known_ones(
        ctx: ServiceContext, clock: Clock) -> None:
    accounts = AccountService(ctx, clock=clock)
    fail(accounts, user="Nobody", times=4)
    with pytest.raises(SignInLocked, match="for 'nobody'"):
        fail(accounts, user="nobody")


def test_an_address_is_locked_after_failures_across_many_user_names(tmp_path: Path) -> None:
    ctx = ServiceContext(settings(tmp_path, 8))
    try:
        AccountService(ctx).create_user("alice", PASSWORD)
        accounts = AccountService(ctx)
        for n in range(7):
            fail(accounts, user=f"guess{n}", address="192.0.2.7")
        with pytest.raises(SignInLocked, match=re.escape("from 192.0.2.7; try again in 30 s")):
            fail(accounts, user="guess7", address="192.0.2.7")
        with pytest.raises(SignInLocked, match=re.escape("from 192.0.2.7")):
            accounts.sign_in("alice", PASSWORD, address="192.0.2.7")
        # Another address is not affected, and alice's own name is not locked.
        assert accounts.sign_in("alice", PASSWORD, address="192.0.2.8").identity.name == "alice"
    finally:
        ctx.close()


def test_a_success_does_not_clear_the_address_count(tmp_path: Path) -> None:
    ctx = ServiceContext(settings(tmp_path, 3))
    try:
        accounts = AccountService(ctx)
        accounts.create_user("alice", PASSWORD)
        fail(accounts, user="x1", address="192.0.2.9", times=2)
        accounts.sign_in("alice", PASSWORD, address="192.0.2.9")
        with pytest.raises(SignInLocked, match=re.escape("from 192.0.2.9")):
            fail(accounts, user="x2", address="192.0.2.9")
    finally:
        ctx.close()


def test_two_brokers_on_one_database_share_the_counts(database_url: str, tmp_path: Path,
                                                      clock: Clock) -> None:
    one = ServiceContext(settings(tmp_path, 1000, database_url))
    other = ServiceContext(settings(tmp_path, 1000, database_url))
    try:
        first, second = AccountService(one, clock=clock), AccountService(other, clock=clock)
        first.create_user("alice", PASSWORD)
        fail(first, times=2)
        fail(second, times=2)
        with pytest.raises(SignInLocked):
            fail(first)
        with pytest.raises(SignInLocked):
            second.sign_in("alice", PASSWORD)
        clock.advance(30)
        assert second.sign_in("alice", PASSWORD).identity.name == "alice"
    finally:
        one.close()
        other.close()


def test_directory_users_are_protected_alike(ctx: ServiceContext, clock: Clock) -> None:
    class Directory:
        source = "ldap"

        def authenticate(self, username: str, password: str) -> Identity | None:
            if username == "dave" and password == "directory-pass":
                return Identity(name="dave", display_name="Dave", source="ldap")
            return None

    accounts = AccountService(ctx, [Directory()], clock=clock)
    fail(accounts, user="dave", times=4)
    with pytest.raises(SignInLocked, match="for 'dave'"):
        fail(accounts, user="dave")
    with pytest.raises(SignInLocked):
        accounts.sign_in("dave", "directory-pass")
    clock.advance(30)
    assert accounts.sign_in("dave", "directory-pass").identity.source == "ldap"


def test_an_unknown_user_costs_one_hash_check_and_gets_the_same_message(
        ctx: ServiceContext, monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = AccountService(ctx)
    spy = SpyHasher()
    monkeypatch.setattr(accounts_module, "_hasher", spy)
    checked = spy.checked
    messages = []
    for user in ("nobody", "alice"):
        with pytest.raises(AuthenticationFailed) as refused:
            accounts.sign_in(user, "wrong-password")
        messages.append(str(refused.value))
    assert len(checked) == 2  # one verification each, known or not
    assert checked[0].startswith("$argon2id$") and checked[0] != checked[1]
    assert messages[0] == messages[1] == "wrong user name or password"


def test_the_api_answers_a_lock_with_429_and_retry_after(ctx: ServiceContext) -> None:
    client = TestClient(create_app(ctx, directories=[]))
    for _ in range(4):
        answer = client.post(LOGIN, json={"username": "alice", "password": "wrong-password"})
        assert answer.status_code == 401
    locked = client.post(LOGIN, json={"username": "alice", "password": "wrong-password"})
    assert locked.status_code == 429
    assert locked.headers["retry-after"] == "30"
    assert locked.json()["detail"] == ("too many failed sign-ins for 'alice'; "
                                       "try again in 30 s")
    right = client.post(LOGIN, json={"username": "alice", "password": PASSWORD})
    assert right.status_code == 429 and "try again in" in right.json()["detail"]


def test_the_api_counts_failures_per_client_address(tmp_path: Path) -> None:
    ctx = ServiceContext(settings(tmp_path, 3))
    try:
        client = TestClient(create_app(ctx, directories=[]))
        codes = [client.post(LOGIN, json={"username": f"user{n}", "password": "x" * 8})
                 .status_code for n in range(4)]
        assert codes == [401, 401, 429, 429]
        detail = client.post(LOGIN, json={"username": "u9", "password": "y" * 8}).json()
        assert detail["detail"].startswith("too many failed sign-ins from testclient")
    finally:
        ctx.close()
