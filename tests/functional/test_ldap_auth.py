"""The LDAP authenticator against a real OpenLDAP slapd started for this module."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from deskpool.broker.ldap_auth import LdapAuthenticator, LdapSettings
from deskpool.domain.errors import InvalidInput, Unavailable
from tests.ldap_server import (
    BASE_DN,
    GROUPS_DN,
    PEOPLE_DN,
    READER_DN,
    READER_PASSWORD,
    SlapdServer,
    free_port,
)


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdServer]:
    with SlapdServer() as server:
        yield server


@pytest.fixture
def settings(slapd: SlapdServer) -> LdapSettings:
    return LdapSettings(url=slapd.url, bind_dn=READER_DN, bind_password=READER_PASSWORD,
                        user_base=PEOPLE_DN, group_base=GROUPS_DN, timeout_s=2)


@pytest.fixture
def auth(settings: LdapSettings) -> LdapAuthenticator:
    return LdapAuthenticator(settings)


def test_alice_signs_in_with_her_groups(auth: LdapAuthenticator) -> None:
    identity = auth.authenticate("alice", "alice-pw")
    assert identity is not None
    assert (identity.name, identity.display_name, identity.source) == (
        "alice", "Alice Liddell", "ldap")
    # groupOfNames by member DN, and the posixGroup "Devs" by memberUid, lower-cased.
    assert identity.groups == {"vdi-users", "devs"}
    assert not identity.is_admin


def test_bob_is_not_in_vdi_users(auth: LdapAuthenticator) -> None:
    identity = auth.authenticate("bob", "bob-pw")
    assert identity is not None and identity.name == "bob"
    assert identity.groups == {"staff"}


def test_name_is_the_typed_uid_lower_cased(auth: LdapAuthenticator) -> None:
    identity = auth.authenticate("ALICE", "alice-pw")
    assert identity is not None and identity.name == "alice"


def test_user_dn_with_parentheses_is_escaped_in_the_group_filter(
    auth: LdapAuthenticator,
) -> None:
    # dave's DN is "cn=Dave (IT),...": unescaped, the member filter would be malformed.
    identity = auth.authenticate("dave", "dave-pw")
    assert identity is not None and identity.groups == {"vdi-users"}


@pytest.mark.parametrize(("username", "password"), [
    ("alice", "bob-pw"),
    ("alice", "Alice-pw"),
    ("nobody", "alice-pw"),
    ("alice", ""),  # an empty password would be an anonymous bind, which "succeeds"
    ("", "alice-pw"),
    ("   ", "alice-pw"),
])
def test_wrong_password_unknown_user_or_empty_input_is_refused(
    auth: LdapAuthenticator, username: str, password: str
) -> None:
    assert auth.authenticate(username, password) is None


@pytest.mark.parametrize("username", ["*", "ali*", "alice)(uid=*", "*)(|(uid=*", "alice\\"])
def test_filter_characters_in_the_username_match_nothing(
    auth: LdapAuthenticator, username: str
) -> None:
    # Unescaped, "ali*" and "alice)(uid=*" would select alice alone and her password would work.
    assert auth.authenticate(username, "alice-pw") is None
    assert auth.groups_of(username) == frozenset()


def test_filter_matching_several_users_is_refused(settings: LdapSettings) -> None:
    # A too-loose filter must not let the first entry found take the password.
    loose = dataclasses.replace(settings, user_filter="(|(uid={username})(uid=bob))")
    assert LdapAuthenticator(loose).authenticate("alice", "alice-pw") is None
    assert LdapAuthenticator(loose).groups_of("alice") == frozenset()


def test_groups_of_needs_no_password(auth: LdapAuthenticator) -> None:
    assert auth.groups_of("alice") == {"vdi-users", "devs"}
    assert auth.groups_of("Bob") == {"staff"}
    assert auth.groups_of("nobody") == frozenset()


def test_closed_port_is_unavailable_quickly(settings: LdapSettings) -> None:
    url = f"ldap://127.0.0.1:{free_port()}"
    auth = LdapAuthenticator(dataclasses.replace(settings, url=url, timeout_s=5))
    started = time.monotonic()
    with pytest.raises(Unavailable, match=url):
        auth.authenticate("alice", "alice-pw")
    assert time.monotonic() - started < 2
    with pytest.raises(Unavailable, match=url):
        auth.groups_of("alice")


def test_server_that_never_answers_times_out_as_unavailable(settings: LdapSettings) -> None:
    with socket.socket() as silent:
        # Listening without ever accepting: the kernel completes the TCP handshake, no LDAP.
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"ldap://127.0.0.1:{silent.getsockname()[1]}"
        auth = LdapAuthenticator(dataclasses.replace(settings, url=url, timeout_s=1))
        started = time.monotonic()
        with pytest.raises(Unavailable, match=url):
            auth.authenticate("alice", "alice-pw")
        assert time.monotonic() - started < 4


def test_start_tls_refused_by_the_server_is_unavailable_not_cleartext(
    settings: LdapSettings,
) -> None:
    # This slapd has no certificate: StartTLS fails and no password is sent in clear.
    auth = LdapAuthenticator(dataclasses.replace(settings, start_tls=True))
    with pytest.raises(Unavailable, match=settings.url):
        auth.authenticate("alice", "alice-pw")


def test_refused_service_account_is_unavailable_not_a_wrong_password(
    settings: LdapSettings,
) -> None:
    auth = LdapAuthenticator(dataclasses.replace(settings, bind_password="wrong"))
    with pytest.raises(Unavailable, match="service account") as raised:
        auth.authenticate("alice", "alice-pw")
    assert settings.url in str(raised.value)


def test_missing_user_base_is_unavailable(settings: LdapSettings) -> None:
    auth = LdapAuthenticator(dataclasses.replace(settings, user_base=f"ou=nowhere,{BASE_DN}"))
    with pytest.raises(Unavailable, match="ou=nowhere"):
        auth.authenticate("alice", "alice-pw")


def test_active_directory_style_filter(settings: LdapSettings) -> None:
    # No sAMAccountName in OpenLDAP: the same shape of filter on another attribute.
    ad_like = dataclasses.replace(settings, user_filter="(cn={username})",
                                  group_filter="(member={user_dn})")
    identity = LdapAuthenticator(ad_like).authenticate("Bob Builder", "bob-pw")
    assert identity is not None
    assert identity.name == "bob builder" and identity.groups == {"staff"}


@pytest.mark.parametrize(("change", "field_name"), [
    ({"url": "http://127.0.0.1:389"}, "url"),
    ({"url": "ldap://"}, "url"),
    ({"url": "ldaps://dc1.example.test", "start_tls": True}, "start_tls"),
    ({"bind_password": None}, "bind_password"),
    ({"bind_password": ""}, "bind_password"),
    ({"user_base": "not a dn"}, "user_base"),
    ({"group_base": ""}, "group_base"),
    ({"user_filter": "(uid=alice)"}, "user_filter"),
    ({"user_filter": "(uid={username}"}, "user_filter"),
    ({"group_filter": "(cn=vdi-users)"}, "group_filter"),
    ({"group_name_attribute": "c n"}, "group_name_attribute"),
    ({"uid_attribute": "uid number"}, "uid_attribute"),
    ({"timeout_s": 0}, "timeout_s"),
])
def test_bad_settings_name_the_field(
    settings: LdapSettings, change: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(InvalidInput, match=f"LDAP setting {field_name}:"):
        dataclasses.replace(settings, **change)


def test_service_password_stays_out_of_repr(settings: LdapSettings) -> None:
    assert READER_PASSWORD not in repr(settings)
    assert READER_DN in repr(settings)


def test_rfc2307_numbers_come_with_the_identity(auth: LdapAuthenticator,
                                                settings: LdapSettings) -> None:
    erin = auth.authenticate("erin", "erin-pw")
    assert erin is not None and (erin.uid, erin.gid) == (20001, 5000)
    alice = auth.authenticate("alice", "alice-pw")  # inetOrgPerson only: no numbers
    assert alice is not None and (alice.uid, alice.gid) == (None, None)
    # "" ignores the attribute; another name reads that one.
    ignoring = LdapAuthenticator(dataclasses.replace(settings, uid_attribute="",
                                                     gid_attribute="uidNumber"))
    erin = ignoring.authenticate("erin", "erin-pw")
    assert erin is not None and (erin.uid, erin.gid) == (None, 20001)


def test_a_malformed_number_in_the_directory_is_its_fault_not_the_users() -> None:
    from deskpool.broker.ldap_auth import _number

    dn = f"uid=erin,{PEOPLE_DN}"
    assert _number(dn, "uidNumber", {"uidNumber": ["20001"]}) == 20001
    assert _number(dn, "uidNumber", {"uidNumber": []}) is None
    assert _number(dn, "", {"uidNumber": ["20001"]}) is None
    for bad in ("-5", "abc", "4294967295"):
        with pytest.raises(Unavailable, match=f"has uidNumber '{bad}'.*fix the entry"):
            _number(dn, "uidNumber", {"uidNumber": [bad]})
