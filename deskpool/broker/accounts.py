"""Users, groups, sign-in and tokens.

Passwords are hashed with Argon2id (argon2-cffi's defaults). A browser session and an API
token are both a random secret whose SHA-256 alone is stored: a stolen database holds no
usable token. Sign-in tries the local users first, then each directory (LDAP) in turn; a
directory user gets a row at first sign-in, with no password.

Failed sign-ins are counted per user name and per client address, and lock either out for a
while (``deskpool.broker.signin_guard``). A local user name that does not exist still costs one
Argon2 verification, against a dummy hash, so the time taken does not tell which names exist.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from deskpool.broker.signin_guard import Clock, SignInGuard, user_key
from deskpool.domain.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidInput,
    NotFound,
    Unavailable,
)
from deskpool.domain.users import Authenticator, Identity
from deskpool.services.audit import Actor, record_audit
from deskpool.services.context import ServiceContext
from deskpool.store.access_models import User
from deskpool.store.db import UnitOfWork
from deskpool.store.models import utcnow

USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,254}$")
SESSION_TTL = timedelta(hours=12)
# An API token always expires: after 90 days unless asked otherwise, after a year at most.
API_TOKEN_TTL = timedelta(days=90)
API_TOKEN_MAX_TTL = timedelta(days=365)
_hasher = PasswordHasher()


@cache
def _dummy_hash() -> str:
    """A hash of a random secret nobody knows: what an unknown user's password is checked
    against, so that costs the same as checking a known user's."""
    return _hasher.hash(secrets.token_urlsafe(32))


def normalize_name(name: str, what: str = "user name") -> str:
    value = name.strip().lower()
    if not USER_NAME.match(value):
        raise InvalidInput(
            f"{what} {name!r} is not valid: use letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit")
    return value


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class SignedIn:
    token: str  # the secret, shown once
    identity: Identity
    expires_at: datetime | None
    token_id: uuid.UUID | None = None  # what names it in lists and revocations


def _groups_text(groups: frozenset[str]) -> str:
    return ",".join(sorted(groups))


def _groups_of_text(text: str) -> frozenset[str]:
    return frozenset(g for g in text.split(",") if g)


class LocalAuthenticator:
    """Users with a password in deskpool's own table."""

    source = "local"

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def authenticate(self, username: str, password: str) -> Identity | None:
        with self.ctx.uow(read_only=True) as uow:
            user = uow.users.find_by_name(username)
            stored = user.password_hash if user is not None else None
            try:
                _hasher.verify(stored or _dummy_hash(), password)
            except (VerificationError, InvalidHashError):
                return None
            if user is None or stored is None:  # the dummy hash never matches; belt and braces
                return None
            return Identity(name=user.name, display_name=user.display_name, source="local",
                            groups=local_groups(uow, user.id), is_admin=user.is_admin)


def local_groups(uow: UnitOfWork, user_id: uuid.UUID) -> frozenset[str]:
    return uow.users.group_names(user_id)


class AccountService:
    def __init__(self, ctx: ServiceContext,
                 directories: Sequence[Authenticator] = (), *,
                 clock: Clock | None = None) -> None:
        self.ctx = ctx
        self.guard = SignInGuard(ctx, clock) if clock else SignInGuard(ctx)
        self.authenticators: list[Authenticator] = [LocalAuthenticator(ctx), *directories]

    # --- administration ----------------------------------------------------------------

    def create_user(self, name: str, password: str, *, display_name: str = "",
                    is_admin: bool = False, groups: Sequence[str] = (),
                    actor: Actor | None = None) -> Identity:
        name = normalize_name(name)
        if len(password) < 8:
            raise InvalidInput(f"password for {name!r} is too short: use 8 characters or more")
        group_names = sorted({normalize_name(g, "group name") for g in groups})
        with self.ctx.uow() as uow:
            if uow.users.name_taken(name):
                raise Conflict(f"a user named {name!r} already exists")
            row = uow.users.add(User(name=name, display_name=display_name or name,
                                     source="local", password_hash=_hasher.hash(password),
                                     is_admin=is_admin))
            for group in group_names:
                uow.users.add_to_group(row.id, group)
            record_audit(uow, actor, "user.create", f"user/{name}", f"created user {name}",
                         new={"display_name": display_name or name, "is_admin": is_admin,
                              "groups": group_names}, user=name)
            uow.commit()
        return Identity(name=name, display_name=display_name or name, source="local",
                        is_admin=is_admin)

    def add_to_group(self, user: str, group: str, *, actor: Actor | None = None) -> None:
        user, group = normalize_name(user), normalize_name(group, "group name")
        with self.ctx.uow() as uow:
            row = self._user(uow, user)
            uow.users.add_to_group(row.id, group)
            if actor is not None:
                record_audit(uow, actor, "group.add-member", f"group/{group}",
                             f"added {user} to group {group}", new={"member": user}, user=user)
            uow.commit()

    def list_users(self) -> list[Identity]:
        with self.ctx.uow(read_only=True) as uow:
            groups = uow.users.group_names_by_user()
            return [Identity(name=u.name, display_name=u.display_name, source=u.source,
                             groups=groups.get(u.id, frozenset()), is_admin=u.is_admin)
                    for u in uow.users.list()]

    @staticmethod
    def _user(uow: UnitOfWork, name: str) -> User:
        user = uow.users.find_by_name(name)
        if user is None:
            raise NotFound(f"no user named {name!r}")
        return user

    # --- sign-in and tokens ------------------------------------------------------------

    def sign_in(self, username: str, password: str, *,
                address: str | None = None) -> SignedIn:
        """Check the password with each authenticator in turn; a session token on success.

        One message for every refusal, so it does not tell which user names exist. A directory
        that cannot be reached is reported as such when no other authenticator knew the user.
        A user name or client ``address`` locked after too many failures is refused with
        ``SignInLocked`` before the password is looked at.
        """
        key = user_key(username)
        self.guard.check(key, address)
        try:
            name = normalize_name(username)
        except InvalidInput:
            self.guard.failed(key, address)
            raise AuthenticationFailed("wrong user name or password") from None
        unreachable: Unavailable | None = None
        for authenticator in self.authenticators:
            try:
                identity = authenticator.authenticate(name, password) if password else None
            except Unavailable as exc:
                unreachable = exc
                continue
            if identity is not None:
                self.guard.succeeded(key)
                return self._open_session(identity)
        if unreachable is not None:
            raise unreachable  # not the user's failure: not counted
        self.guard.failed(key, address)
        raise AuthenticationFailed("wrong user name or password")

    def _open_session(self, identity: Identity) -> SignedIn:
        with self.ctx.uow() as uow:
            user = uow.users.find_by_name(identity.name)
            if user is None:  # a directory user's first visit
                user = uow.users.add(User(name=identity.name, display_name=identity.display_name,
                                          source=identity.source, is_admin=False))
            elif user.source != identity.source:
                raise AuthenticationFailed(
                    f"user {identity.name!r} belongs to the {user.source} directory")
            if user.disabled:  # told only to someone who knew the password
                raise AuthenticationFailed(
                    f"the account {user.name!r} is disabled; ask your administrator")
            user.last_login_at = utcnow()
            # The directory's numbers as of now, for the desktop account made at hand-over.
            user.uid_number, user.gid_number = identity.uid, identity.gid
            identity = Identity(name=user.name, display_name=user.display_name,
                                source=user.source, groups=identity.groups,
                                is_admin=user.is_admin, uid=identity.uid, gid=identity.gid)
            signed = self._new_token(uow, user, identity, "session", "", SESSION_TTL)
            uow.commit()
            return signed

    def issue_api_token(self, username: str, label: str,
                        ttl: timedelta = API_TOKEN_TTL) -> SignedIn:
        """A token for scripts and native clients, with the user's local groups; it expires
        after ``ttl`` (at most ``API_TOKEN_MAX_TTL``)."""
        if ttl > API_TOKEN_MAX_TTL:
            raise InvalidInput(f"an API token lasts {API_TOKEN_MAX_TTL.days} days at most, "
                               f"not {ttl.days}")
        with self.ctx.uow() as uow:
            user = self._user(uow, normalize_name(username))
            identity = Identity(name=user.name, display_name=user.display_name,
                                source=user.source, groups=local_groups(uow, user.id),
                                is_admin=user.is_admin)
            signed = self._new_token(uow, user, identity, "api", label, ttl)
            uow.commit()
            return signed

    @staticmethod
    def _new_token(uow: UnitOfWork, user: User, identity: Identity, kind: str, label: str,
                   ttl: timedelta | None) -> SignedIn:
        secret = secrets.token_urlsafe(32)
        expires = utcnow() + ttl if ttl else None
        token_id = uow.auth_tokens.add(token_hash=token_digest(secret), user_id=user.id,
                                       kind=kind, label=label,
                                       groups=_groups_text(identity.groups),
                                       expires_at=expires)
        return SignedIn(token=secret, identity=identity, expires_at=expires,
                        token_id=token_id)

    def resolve(self, secret: str) -> Identity:
        """The identity behind a session or API token; ``AuthenticationFailed`` otherwise."""
        now = utcnow()
        with self.ctx.uow(read_only=True) as uow:
            row = uow.auth_tokens.holder(token_digest(secret))
        if row is None or row.revoked_at is not None or row.disabled or (
                row.expires_at is not None and row.expires_at <= now):
            raise AuthenticationFailed("not signed in, or the session expired: sign in again")
        return Identity(name=row.name, display_name=row.display_name, source=row.source,
                        groups=_groups_of_text(row.groups), is_admin=row.is_admin,
                        uid=row.uid_number, gid=row.gid_number)

    def sign_out(self, secret: str) -> None:
        with self.ctx.uow() as uow:
            uow.auth_tokens.revoke(token_digest(secret), utcnow())
            uow.commit()
