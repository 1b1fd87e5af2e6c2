"""The rule mapping deskpool user names to Linux account names."""

from __future__ import annotations

import pytest

from deskpool.domain.accounts import linux_account_name
from deskpool.domain.errors import InvalidInput


@pytest.mark.parametrize(("user", "account"), [
    ("alice", "alice"),
    ("Alice", "alice"),
    ("alice@corp.example", "alice"),
    ("CORP\\Alice", "alice"),
    ("Mary Ann", "mary_ann"),
    ("j.doe", "j_doe"),
    ("../etc", "___etc"),
    ("_svc-1", "_svc-1"),
    ("zoë", "zo_"),
    ("a" * 32, "a" * 32),
])
def test_names_map_by_the_rule(user: str, account: str) -> None:
    assert linux_account_name(user) == account


@pytest.mark.parametrize(("user", "why"), [
    ("root", "system account"),
    ("ROOT@corp.example", "system account"),
    ("systemd-network", "system account"),
    ("lightdm", "system account"),
    ("www-data", "system account"),
    ("1alice", "must start with a letter"),
    ("-x", "must start with a letter"),
    ("@corp.example", "empty"),
    ("", "empty"),
    ("a" * 33, "longer than 32"),
])
def test_unmappable_names_are_refused_naming_the_user(user: str, why: str) -> None:
    with pytest.raises(InvalidInput) as err:
        linux_account_name(user)
    assert repr(user) in str(err.value)
    assert why in str(err.value)


def test_names_that_collide_map_to_one_account() -> None:
    """Documented: the store gives the account to the first user and refuses the second."""
    assert linux_account_name("Alice") == linux_account_name("alice@corp.example")
