"""The administrator's actions on users and groups, each audited: list, disable and enable
(a disabled user cannot sign in and their tokens stop working at once), delete, reset a
password (a new random one, shown once; only its Argon2id hash is kept), and local groups
(create, delete, add and remove members). Creating users is ``AccountService.create_user``.
"""

from __future__ import annotations

import builtins
import secrets
from dataclasses import dataclass
from datetime import datetime

from deskpool.broker.accounts import _hasher, normalize_name
from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.services.audit import Actor, record_audit
from deskpool.services.context import ServiceContext
from deskpool.store.access_models import User
from deskpool.store.db import UnitOfWork
from deskpool.store.models import utcnow

PASSWORD_BYTES = 12  # 16 URL-safe characters


@dataclass(frozen=True)
class UserView:
    name: str
    display_name: str
    source: str
    groups: list[str]
    is_admin: bool
    disabled: bool
    last_login_at: datetime | None


@dataclass(frozen=True)
class GroupView:
    name: str
    members: list[str]


def _user(uow: UnitOfWork, name: str) -> User:
    user = uow.users.find_by_name(normalize_name(name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


class UserAdmin:
    def __init__(self, ctx: ServiceContext, actor: Actor | None = None) -> None:
        self.ctx = ctx
        self.actor = actor

    def list(self) -> list[UserView]:
        with self.ctx.uow(read_only=True) as uow:
            groups = uow.users.group_names_by_user()
            return [UserView(name=u.name, display_name=u.display_name, source=u.source,
                             groups=sorted(groups.get(u.id, frozenset())),
                             is_admin=u.is_admin, disabled=u.disabled,
                             last_login_at=u.last_login_at)
                    for u in uow.users.list()]

    def get(self, name: str) -> UserView:
        found = [u for u in self.list() if u.name == normalize_name(name)]
        if not found:
            raise NotFound(f"no user named {name!r}")
        return found[0]

    def set_disabled(self, name: str, disabled: bool) -> UserView:
        """Disable (sign-in refused, every token revoked now) or enable a user."""
        with self.ctx.uow() as uow:
            user = _user(uow, name)
            if self.actor is not None and user.name == self.actor.name and disabled:
                raise Conflict("you cannot disable your own account")
            if user.disabled != disabled:
                revoked = uow.auth_tokens.revoke_all(user.id, utcnow()) if disabled else 0
                user.disabled = disabled
                verb = "disabled" if disabled else "enabled"
                record_audit(uow, self.actor, f"user.{verb[:-1]}", f"user/{user.name}",
                             f"{verb} user {user.name}"
                             + (f" ({revoked} token(s) revoked)" if revoked else ""),
                             old={"disabled": not disabled}, new={"disabled": disabled},
                             user=user.name)
            uow.commit()
        return self.get(name)

    def delete(self, name: str) -> None:
        """Delete a user with their tokens, memberships and entitlements. Refused while they
        hold a desktop: log them off first (their work is not taken away unasked)."""
        with self.ctx.uow() as uow:
            user = _user(uow, name)
            if self.actor is not None and user.name == self.actor.name:
                raise Conflict("you cannot delete your own account")
            held = uow.admin.desktops_assigned_to(user.name)
            if held:
                raise Conflict(f"user {user.name!r} holds desktop(s) {', '.join(held)}; log "
                               "them off first")
            before = {"display_name": user.display_name, "source": user.source,
                      "is_admin": user.is_admin, "disabled": user.disabled,
                      "groups": sorted(uow.users.group_names(user.id))}
            removed = uow.entitlements.remove_principal("user", user.name)
            uow.users.delete(user)
            record_audit(uow, self.actor, "user.delete", f"user/{user.name}",
                         f"deleted user {user.name}"
                         + (f" and their entitlements to {', '.join(removed)}" if removed
                            else ""), old=before, user=user.name)
            uow.commit()

    def reset_password(self, name: str) -> str:
        """A new random password for a local user, returned once (never stored, only its
        hash); their sessions and tokens are revoked."""
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        with self.ctx.uow() as uow:
            user = _user(uow, name)
            if user.source != "local":
                raise InvalidInput(f"user {user.name!r} signs in through the {user.source} "
                                   "directory; reset the password there")
            user.password_hash = _hasher.hash(password)
            revoked = uow.auth_tokens.revoke_all(user.id, utcnow())
            record_audit(uow, self.actor, "user.reset-password", f"user/{user.name}",
                         f"reset the password of {user.name} ({revoked} token(s) revoked)",
                         user=user.name)
            uow.commit()
        return password

    # --- groups ----------------------------------------------------------------------------

    def groups(self) -> builtins.list[GroupView]:
        with self.ctx.uow(read_only=True) as uow:
            return [GroupView(name=g, members=m) for g, m in uow.users.groups()]

    def create_group(self, name: str) -> GroupView:
        name = normalize_name(name, "group name")
        with self.ctx.uow() as uow:
            if uow.users.find_group(name) is not None:
                raise Conflict(f"a group named {name!r} already exists")
            uow.users.add_group(name)
            record_audit(uow, self.actor, "group.create", f"group/{name}",
                         f"created group {name}")
            uow.commit()
        return GroupView(name=name, members=[])

    def delete_group(self, name: str) -> None:
        """Delete a local group and its memberships; its entitlements stay (a directory
        group of the same name still gets them)."""
        name = normalize_name(name, "group name")
        with self.ctx.uow() as uow:
            group = uow.users.find_group(name)
            if group is None:
                raise NotFound(f"no group named {name!r}")
            members = dict(uow.users.groups()).get(name, [])
            uow.users.delete_group(group)
            record_audit(uow, self.actor, "group.delete", f"group/{name}",
                         f"deleted group {name}", old={"members": members})
            uow.commit()

    def remove_member(self, group: str, user: str) -> None:
        group = normalize_name(group, "group name")
        with self.ctx.uow() as uow:
            found = uow.users.find_group(group)
            row = _user(uow, user)
            if found is None or not uow.users.remove_from_group(row.id, found.id):
                raise NotFound(f"user {row.name!r} is not in group {group!r}")
            record_audit(uow, self.actor, "group.remove-member", f"group/{group}",
                         f"removed {row.name} from group {group}", old={"member": row.name},
                         user=row.name)
            uow.commit()
