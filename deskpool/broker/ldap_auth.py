"""Authenticates users against an LDAP directory (OpenLDAP, 389-ds, Active Directory).

The usual search-then-bind: a service account (or an anonymous bind) finds the user's entry,
a second connection binds as that entry with the typed password, and the service account then
reads the groups the user belongs to. Every call opens short-lived connections and closes them.
"""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ldap3 import NONE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from deskpool.domain.errors import InvalidInput, Unavailable
from deskpool.domain.users import Identity

# An attribute description: a name with options (``cn``, ``cn;lang-en``) or a numeric OID.
_ATTRIBUTE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)+)(?:;[A-Za-z0-9-]+)*$")
# Bind result codes that mean "the directory is in trouble", not "this user may not sign in":
# timeLimitExceeded, adminLimitExceeded, busy, unavailable, other.
_DIRECTORY_TROUBLE = frozenset({3, 11, 51, 52, 80})
_SEARCH_OK = frozenset({0, 4})  # success, sizeLimitExceeded (we ask for at most 2 users)


@dataclass(frozen=True, kw_only=True)
class LdapSettings:
    """Where the directory is and how users and their groups are found in it.

    Filters are templates: ``{username}`` and ``{user_dn}`` are replaced by the filter-escaped
    values. For Active Directory use ``user_filter="(sAMAccountName={username})"`` and, for
    nested groups, ``group_filter="(member:1.2.840.113556.1.4.1941:={user_dn})"``.
    """

    url: str
    bind_dn: str | None = None  # None: search anonymously
    bind_password: str | None = field(default=None, repr=False)
    user_base: str
    user_filter: str = "(&(objectClass=inetOrgPerson)(uid={username}))"
    group_base: str
    group_filter: str = "(|(member={user_dn})(uniqueMember={user_dn})(memberUid={username}))"
    group_name_attribute: str = "cn"
    display_name_attribute: str = "cn"
    # RFC 2307 numbers (OpenLDAP's nis schema, AD's Unix attributes); "" ignores them.
    uid_attribute: str = "uidNumber"
    gid_attribute: str = "gidNumber"
    start_tls: bool = False
    timeout_s: float = 5
    ca_file: str | None = None  # PEM bundle for ldaps/StartTLS; None: the system's CAs

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        try:
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            port_ok = False
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or not port_ok:
            _bad("url", f"{self.url!r} is not an ldap://host[:port] or ldaps://host[:port] URL")
        if self.start_tls and parts.scheme == "ldaps":
            _bad("start_tls", "cannot be combined with an ldaps:// url, which is TLS already")
        if (self.bind_dn is None) != (self.bind_password is None) or self.bind_password == "":
            # An empty password would silently turn the service bind into an anonymous one.
            _bad("bind_password", "bind_dn and a non-empty bind_password go together")
        for name in ("bind_dn", "user_base", "group_base"):
            dn = getattr(self, name)
            if dn is not None and not _is_dn(dn):
                _bad(name, f"{dn!r} is not a distinguished name")
        _check_filter("user_filter", self.user_filter, ("{username}",))
        _check_filter("group_filter", self.group_filter, ("{username}", "{user_dn}"))
        for name in ("group_name_attribute", "display_name_attribute"):
            if not _ATTRIBUTE.match(getattr(self, name)):
                _bad(name, f"{getattr(self, name)!r} is not an attribute name")
        for name in ("uid_attribute", "gid_attribute"):
            if getattr(self, name) and not _ATTRIBUTE.match(getattr(self, name)):
                _bad(name, f"{getattr(self, name)!r} is not an attribute name (or \"\")")
        if not (isinstance(self.timeout_s, int | float) and 0 < self.timeout_s < math.inf):
            _bad("timeout_s", f"must be a positive number of seconds, not {self.timeout_s!r}")


def _bad(field_name: str, problem: str) -> None:
    raise InvalidInput(f"LDAP setting {field_name}: {problem}.")


def _is_dn(text: str) -> bool:
    try:
        return bool(text.strip()) and bool(parse_dn(text))
    except LDAPException:
        return False


def _check_filter(field_name: str, template: str, placeholders: tuple[str, ...]) -> None:
    if not any(p in template for p in placeholders):
        _bad(field_name, f"{template!r} must contain {' or '.join(placeholders)}")
    sample = template
    for placeholder in placeholders:
        sample = sample.replace(placeholder, "x")
    try:
        parse_filter(sample, None, False, False, None, False)
    except LDAPException as exc:
        _bad(field_name, f"{template!r} is not a valid LDAP filter ({exc})")


class LdapAuthenticator:
    """The ``Authenticator`` for one LDAP directory. Holds no connection between calls."""

    source = "ldap"

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings

    def authenticate(self, username: str, password: str) -> Identity | None:
        name = username.strip().lower()
        # A simple bind with an empty password is an unauthenticated bind and "succeeds".
        if not name or not password:
            return None
        with self._service_connection() as conn:
            found = self._find_user(conn, name)
            if found is None:
                return None
            if not self._password_matches(found.dn, password):
                return None
            groups = self._groups(conn, name, found.dn)
        return Identity(name=name, display_name=found.display_name or name, source=self.source,
                        groups=groups, uid=found.uid, gid=found.gid)

    def groups_of(self, username: str) -> frozenset[str]:
        """The user's groups, looked up without their password; empty for an unknown user."""
        name = username.strip().lower()
        if not name:
            return frozenset()
        with self._service_connection() as conn:
            found = self._find_user(conn, name)
            return frozenset() if found is None else self._groups(conn, name, found.dn)

    # -- connections -------------------------------------------------------------------------

    @contextmanager
    def _connection(self, user: str | None, password: str | None) -> Iterator[Connection]:
        """An open (and TLS-protected if configured) but not yet bound connection."""
        settings = self.settings
        server = Server(settings.url, get_info=NONE, connect_timeout=settings.timeout_s,
                        tls=Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings.ca_file))
        # ldap3 packs the receive timeout into SO_RCVTIMEO as whole seconds: it must be an int.
        conn = Connection(server, user=user, password=password, auto_bind=False,
                          read_only=True, raise_exceptions=False, auto_referrals=False,
                          receive_timeout=max(1, math.ceil(settings.timeout_s)))
        try:
            try:
                conn.open(read_server_info=False)
                if settings.start_tls and not conn.start_tls(read_server_info=False):
                    raise Unavailable(f"StartTLS with the LDAP server at {settings.url} failed.")
            except LDAPException as exc:
                raise self._unreachable(exc) from exc
            yield conn
        finally:
            _close(conn)

    @contextmanager
    def _service_connection(self) -> Iterator[Connection]:
        with self._connection(self.settings.bind_dn, self.settings.bind_password) as conn:
            if self.settings.bind_dn is not None and not self._bind(conn):
                # The broker's configuration is wrong, not the user's password.
                raise Unavailable(f"the LDAP server at {self.settings.url} refused the service "
                                  f"account {self.settings.bind_dn}: "
                                  f"{conn.result['description']}.")
            yield conn

    def _bind(self, conn: Connection) -> bool:
        try:
            return bool(conn.bind(read_server_info=False))
        except LDAPException as exc:
            raise self._unreachable(exc) from exc

    def _password_matches(self, user_dn: str, password: str) -> bool:
        with self._connection(user_dn, password) as conn:
            if self._bind(conn):
                return True
            if conn.result["result"] in _DIRECTORY_TROUBLE:
                raise Unavailable(f"the LDAP server at {self.settings.url} could not check "
                                  f"a password: {conn.result['description']}.")
            return False  # invalidCredentials, or an AD account that is disabled / locked

    def _unreachable(self, exc: Exception) -> Unavailable:
        return Unavailable(f"cannot reach the LDAP server at {self.settings.url}: {exc}")

    # -- searches ----------------------------------------------------------------------------

    def _search(self, conn: Connection, base: str, search_filter: str,
                attributes: list[str], size_limit: int = 0) -> list[dict[str, Any]]:
        try:
            conn.search(base, search_filter, SUBTREE, attributes=attributes,
                        size_limit=size_limit, time_limit=math.ceil(self.settings.timeout_s))
        except LDAPException as exc:
            raise self._unreachable(exc) from exc
        if conn.result["result"] not in _SEARCH_OK:
            raise Unavailable(f"LDAP search under {base} at {self.settings.url} failed: "
                              f"{conn.result['description']} {conn.result['message']}".strip())
        # Active Directory adds referrals (searchResRef) to results; only entries count.
        return [e for e in conn.response or [] if e.get("type") == "searchResEntry"]

    def _find_user(self, conn: Connection, name: str) -> _Entry | None:
        """The user's entry, or None when unknown or not unique."""
        settings = self.settings
        search_filter = settings.user_filter.replace("{username}", escape_filter_chars(name))
        numbers = [a for a in (settings.uid_attribute, settings.gid_attribute) if a]
        entries = self._search(conn, settings.user_base, search_filter,
                               [settings.display_name_attribute, *numbers], size_limit=2)
        if len(entries) != 1:
            return None  # two matches means a filter too loose to trust with a password
        entry, attributes = entries[0], entries[0]["attributes"]
        return _Entry(
            dn=entry["dn"],
            display_name=_first(attributes.get(settings.display_name_attribute)),
            uid=_number(entry["dn"], settings.uid_attribute, attributes),
            gid=_number(entry["dn"], settings.gid_attribute, attributes))

    def _groups(self, conn: Connection, name: str, user_dn: str) -> frozenset[str]:
        # Substituted in one pass so a DN that contains "{username}" is not expanded again.
        values = {"{username}": escape_filter_chars(name),
                  "{user_dn}": escape_filter_chars(user_dn)}
        search_filter = re.sub(r"\{username\}|\{user_dn\}", lambda m: values[m.group(0)],
                               self.settings.group_filter)
        attribute = self.settings.group_name_attribute
        entries = self._search(conn, self.settings.group_base, search_filter, [attribute])
        names = (_first(entry["attributes"].get(attribute)) for entry in entries)
        return frozenset(n.lower() for n in names if n)


@dataclass(frozen=True)
class _Entry:
    dn: str
    display_name: str
    uid: int | None
    gid: int | None


def _number(dn: str, attribute: str, attributes: dict[str, Any]) -> int | None:
    """A uidNumber-like attribute as an int; None when absent; ``Unavailable`` (the directory
    holds bad data, not the user's fault) when it is not a number from 0 to 2^32-2."""
    if not attribute:
        return None
    text = _first(attributes.get(attribute)).strip()
    if not text:
        return None
    if not text.isdigit() or int(text) > 4_294_967_294:  # (uid_t)-1 means "no id"
        raise Unavailable(f"the LDAP entry {dn} has {attribute} {text!r}, which is not a "
                          f"user or group number; fix the entry in the directory.")
    return int(text)


def _first(value: Any) -> str:
    """One string from an ldap3 attribute value, which is a list for multi-valued ones."""
    if isinstance(value, list | tuple):
        value = value[0] if value else ""
    return "" if value is None else str(value)


def _close(conn: Connection) -> None:
    try:
        conn.unbind()  # sends an unbind request, which fails on a dead socket
    except LDAPException:
        conn.strategy.close()
