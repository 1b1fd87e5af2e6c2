"""``deskpool desktop credential set|list|remove`` and ``deskpool desktop ssh-keys``: each
desktop's machine secrets (``deskpool.services.machine_secrets``), audited with the local
login as the actor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from deskpool.cli.common import out, services
from deskpool.domain.errors import InvalidInput
from deskpool.services.audit import Actor, audit
from deskpool.services.desktops import DesktopService
from deskpool.services.machine_secrets import MachineSecrets, public_host_key, ssh_fingerprint

credential_app = typer.Typer(
    help="Machine credentials: files a desktop gets back at every boot (a keytab...).",
    no_args_is_help=True)


@credential_app.command("set")
def credential_set(
    desktop: Annotated[str, typer.Argument(help="the desktop's name (it may not exist yet)")],
    path: Annotated[str, typer.Argument(help="where in the guest: /etc/krb5.keytab, or a "
                                        "file under /etc/deskpool/credentials/")],
    source: Annotated[Path, typer.Option("--from", help="the file to give it")],
) -> None:
    """Give a desktop a file it gets at every boot (replaces one at the same path)."""
    try:
        content = source.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {source}: {exc.strerror}") from None
    with services() as ctx:
        info = MachineSecrets(ctx).set_credential(desktop, path, content)
        audit(ctx, Actor.local(), "desktop.credential.set", f"desktop/{desktop}",
              f"machine credential {path} set for desktop {desktop} ({info.size} bytes)")
    out.print(f"desktop [bold]{desktop}[/] gets {path} ({info.size} bytes, sha256 "
              f"{info.sha256[:12]}) at its next boot and every one after")


@credential_app.command("list")
def credential_list(desktop: Annotated[str | None, typer.Argument()] = None) -> None:
    """Machine credentials (never their content)."""
    with services() as ctx:
        found = MachineSecrets(ctx).credentials(desktop)
    table = Table("desktop", "path", "bytes", "sha256")
    for c in found:
        table.add_row(c.desktop, c.path, str(c.size), c.sha256[:16])
    out.print(table)


@credential_app.command("remove")
def credential_remove(desktop: str, path: str) -> None:
    """Stop giving a desktop a file (a running desktop keeps it until its disk is reset)."""
    with services() as ctx:
        MachineSecrets(ctx).remove_credential(desktop, path)
        audit(ctx, Actor.local(), "desktop.credential.remove", f"desktop/{desktop}",
              f"machine credential {path} of desktop {desktop} removed")
    out.print(f"desktop [bold]{desktop}[/] no longer gets {path}")


def ssh_keys(
    fingerprints: Annotated[bool, typer.Option("--fingerprints",
                                               help="SHA256 fingerprints, not lines")] = False,
) -> None:
    """Every desktop's SSH host key, as ``known_hosts`` lines (hostname and desktop name)."""
    with services() as ctx:
        lines = []
        for d in DesktopService(ctx).list():
            public = public_host_key(ctx, d.name, d.hostname)
            kind, blob = public.decode().split()[:2]
            names = ",".join(sorted({d.hostname, d.name}))
            lines.append(f"{names} {ssh_fingerprint(public)}" if fingerprints
                         else f"{names} {kind} {blob}")
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)
