"""``deskpool user disable|enable|delete|reset-password``, ``deskpool group ...``,
``deskpool template delete-version`` and ``deskpool audit``: the admin actions beyond the
set-up, each recorded in the audit log with the local login as its actor."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from deskpool.broker.accounts import AccountService
from deskpool.broker.user_admin import UserAdmin
from deskpool.cli.common import out, services
from deskpool.services.audit import Actor, audit_log
from deskpool.services.templates import delete_version

group_app = typer.Typer(help="Local groups (LDAP groups live in the directory).",
                        no_args_is_help=True)


def user_disable(name: str) -> None:
    """Refuse the user's sign-in and revoke every token of theirs now."""
    with services() as ctx:
        UserAdmin(ctx, Actor.local()).set_disabled(name, True)
    out.print(f"user {name} disabled")


def user_enable(name: str) -> None:
    with services() as ctx:
        UserAdmin(ctx, Actor.local()).set_disabled(name, False)
    out.print(f"user {name} enabled")


def user_delete(name: str) -> None:
    """Delete a user (refused while they hold a desktop)."""
    with services() as ctx:
        UserAdmin(ctx, Actor.local()).delete(name)
    out.print(f"user {name} deleted")


def user_reset_password(name: str) -> None:
    """Give a local user a new random password, printed this once."""
    with services() as ctx:
        password = UserAdmin(ctx, Actor.local()).reset_password(name)
    out.print(f"new password for {name} (shown once): ", end="")
    out.print(password, markup=False, highlight=False)


@group_app.command("list")
def group_list() -> None:
    with services() as ctx:
        table = Table("group", "members")
        for g in UserAdmin(ctx).groups():
            table.add_row(g.name, ", ".join(g.members))
    out.print(table)


@group_app.command("add")
def group_add(name: str) -> None:
    with services() as ctx:
        UserAdmin(ctx, Actor.local()).create_group(name)
    out.print(f"group {name} added")


@group_app.command("delete")
def group_delete(name: str) -> None:
    """Delete a local group and its memberships (its entitlements stay, for a directory
    group of the same name)."""
    with services() as ctx:
        UserAdmin(ctx, Actor.local()).delete_group(name)
    out.print(f"group {name} deleted")


@group_app.command("add-member")
def group_add_member(name: str, user: str) -> None:
    with services() as ctx:
        AccountService(ctx).add_to_group(user, name, actor=Actor.local())
    out.print(f"{user} is in group {name}")


@group_app.command("remove-member")
def group_remove_member(name: str, user: str) -> None:
    with services() as ctx:
        UserAdmin(ctx, Actor.local()).remove_member(name, user)
    out.print(f"{user} is no longer in group {name}")


def template_delete_version(name: str, number: int) -> None:
    """Delete an unused template version and its files (refused while in use)."""
    with services() as ctx:
        delete_version(ctx, name, number, actor=Actor.local())
    out.print(f"version {number} of template {name} deleted")


def _values(value: Any) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True)


def audit_command(
    actor: Annotated[str | None, typer.Option(help="only this actor's actions")] = None,
    target: Annotated[str | None, typer.Option(
        help="only actions on this, e.g. pool/lab ('pool': every pool)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=5000)] = 50,
) -> None:
    """The audit log, newest first: who did what, when, from where; old and new values."""
    with services() as ctx:
        entries = audit_log(ctx, limit=limit, actor=actor, target=target)
    table = Table("when (UTC)", "actor", "from", "action", "target", "old", "new")
    for e in entries:
        table.add_row(f"{e.at:%Y-%m-%d %H:%M:%S}", e.actor or "", e.address or "", e.action,
                      e.target or "", _values(e.old), _values(e.new))
    out.print(table)
