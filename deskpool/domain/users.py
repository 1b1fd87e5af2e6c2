"""Users as the broker sees them once authenticated, and what authenticates them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Identity:
    """Who signed in: the name is the key entitlements and reservations use.

    ``groups`` are group names (an LDAP group's ``cn``, a local group's name), compared
    case-insensitively by entitlement checks, so they are stored lower-case.

    ``uid`` / ``gid``: the directory's ``uidNumber`` / ``gidNumber`` for the user when it has
    them (None otherwise, and always for local users): their account on a desktop gets these
    numbers, so files match what the directory's other machines see.
    """

    name: str
    display_name: str
    source: str  # "local" or "ldap"
    groups: frozenset[str] = field(default_factory=frozenset)
    is_admin: bool = False
    uid: int | None = None
    gid: int | None = None


class Authenticator(Protocol):
    """Checks a user name and password against one directory (local table, LDAP...).

    Returns the identity on success and ``None`` when the user is unknown to this directory
    or the password is wrong (so the next authenticator may be tried). Raises
    ``deskpool.domain.errors.Unavailable`` when the directory cannot be reached: that is not
    the user's fault and must not look like a wrong password.
    """

    source: str

    def authenticate(self, username: str, password: str) -> Identity | None: ...
