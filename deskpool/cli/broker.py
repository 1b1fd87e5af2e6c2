"""CLI for the broker: run it, manage users and entitlements, read logon timings."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from deskpool.broker.accounts import AccountService
from deskpool.broker.entitlements import EntitlementService
from deskpool.broker.user_admin import UserAdmin
from deskpool.cli.common import ConfigOption, out, services, use_config
from deskpool.daemon import serve
from deskpool.services.audit import Actor
from deskpool.services.context import ServiceContext

user_app = typer.Typer(help="Users and groups (local; LDAP users sign in directly).",
                       no_args_is_help=True)


def serve_command(
    host: Annotated[str | None, typer.Option(help="Address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (portal, API)")] = None,
    console_port: Annotated[int | None, typer.Option(help="websockify console port")] = None,
    spice_port: Annotated[int | None, typer.Option(
        help="SPICE proxy port for remote-viewer (0: any free port)")] = None,
    rdp_port: Annotated[int | None, typer.Option(
        help="RDP proxy port for .rdp files (0: no RDP proxy)")] = None,
    config: ConfigOption = None,
) -> None:
    """Run the broker: web portal, REST API, console proxy, reconciler and session timers."""
    use_config(config)
    ctx = ServiceContext()
    s = ctx.settings
    try:
        serve(ctx, host=host or s.listen_host, port=port or s.listen_port,
              console_port=console_port or s.console_port,
              spice_port=s.spice_proxy_port if spice_port is None else spice_port,
              rdp_port=s.rdp_proxy_port if rdp_port is None else rdp_port)
    finally:
        ctx.close()


@user_app.command("add")
def user_add(
    name: str,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True,
                                          confirmation_prompt=True)],
    admin: Annotated[bool, typer.Option(help="May use the admin pages and routes")] = False,
    group: Annotated[list[str] | None, typer.Option(help="Local group (repeatable)")] = None,
) -> None:
    with services() as ctx:
        AccountService(ctx).create_user(name, password, is_admin=admin, groups=group or [],
                                        actor=Actor.local())
    out.print(f"user {name} added")


@user_app.command("list")
def user_list() -> None:
    with services() as ctx:
        table = Table("name", "source", "admin", "disabled", "groups", "last sign-in")
        for u in UserAdmin(ctx).list():
            table.add_row(u.name, u.source, "yes" if u.is_admin else "",
                          "yes" if u.disabled else "", ", ".join(u.groups),
                          f"{u.last_login_at:%Y-%m-%d %H:%M}" if u.last_login_at else "")
        out.print(table)


def grant_command(
    pool: str,
    user: Annotated[str | None, typer.Option(help="Entitle this user")] = None,
    group: Annotated[str | None, typer.Option(help="Entitle this group (local or LDAP)")] = None,
) -> None:
    """Entitle a user or a group to a pool."""
    if (user is None) == (group is None):
        raise typer.BadParameter("give exactly one of --user or --group")
    with services() as ctx:
        kind, name = ("user", user) if user else ("group", group)
        assert name is not None
        grant = EntitlementService(ctx).grant(pool, kind, name, actor=Actor.local())
    out.print(f"{grant.kind} {grant.principal} may use pool {grant.pool}")
