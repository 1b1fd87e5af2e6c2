"""``deskpool fileshare ...``: deskpool's own Samba server for redirected folders."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.table import Table

from deskpool.cli.common import out, services
from deskpool.domain.errors import DeskpoolError
from deskpool.fileshare.samba import smbd_binary
from deskpool.services.fileshare import MIB, FileShares

fileshare_app = typer.Typer(help="deskpool's Samba server for redirected folders.",
                            no_args_is_help=True)


@fileshare_app.command("setup")
def fileshare_setup(
    start: Annotated[bool, typer.Option(
        help="also run smbd on it (as a daemon) when nothing answers on its port; where "
             "systemd runs, deploy/deskpool-smbd.service does that instead")] = False,
) -> None:
    """Write deskpool's smb.conf and the shares' directory (root only)."""
    with services() as ctx:
        server = FileShares(ctx).server  # writes the configuration
    lay = server.layout
    out.print(f"wrote {lay.config} (shares under {lay.share_root})")
    if not start:
        return
    if server.reachable():
        out.print(f"smbd already answers on {lay.listen}:{lay.port}")
        return
    server.start_daemon()
    out.print(f"smbd started on {lay.listen}:{lay.port} with {lay.config}")


@fileshare_app.command("serve")
def fileshare_serve() -> None:
    """Write the configuration, then become smbd on it in the foreground (what
    deploy/deskpool-smbd.service runs)."""
    with services() as ctx:
        server = FileShares(ctx).server
    smbd = smbd_binary()
    if smbd is None:
        raise DeskpoolError("smbd is not installed (Debian package samba)")
    os.execv(smbd, [smbd, "--foreground", "--no-process-group", "-s",
                    str(server.layout.config)])


@fileshare_app.command("status")
def fileshare_status() -> None:
    """Whether the server answers, and each user's share against its quota."""
    with services() as ctx:
        server = FileShares(ctx).server
        quota = ctx.settings.fileshare_quota_mib
    lay = server.layout
    answers = server.reachable()
    out.print(f"smbd on {lay.listen}:{lay.port}: "
              + ("[green]answers[/]" if answers else "[red]does not answer[/]")
              + f"; configuration {lay.config}")
    table = Table("share", "used MiB", "quota MiB")
    for name in server.shares():
        used = server.usage_bytes(name) / MIB
        table.add_row(name, f"{used:.1f}" + (" [red]full[/]" if used >= quota else ""),
                      str(quota))
    out.print(table)
    if not answers:
        raise typer.Exit(1)
