"""The ``deskpool`` command line: thin over the services, tables and progress bars by Rich.

Every deskpool error prints as one line on stderr with exit status 1; never a traceback
(``DESKPOOL_DEBUG=1`` shows one for unexpected errors).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from deskpool.cli.admin import (
    audit_command,
    group_app,
    template_delete_version,
    user_delete,
    user_disable,
    user_enable,
    user_reset_password,
)
from deskpool.cli.backup import backup_command, restore_command
from deskpool.cli.broker import grant_command, serve_command, user_app
from deskpool.cli.client import client_app
from deskpool.cli.common import err, out, services, spinner
from deskpool.cli.fileshare import fileshare_app
from deskpool.cli.hosts import host_app
from deskpool.cli.layers import layer_app
from deskpool.cli.machine_secrets import credential_app, ssh_keys
from deskpool.cli.offline import offline_app
from deskpool.cli.pools import pool_app, reconcile
from deskpool.cli.profiles import profile_app
from deskpool.cli.tokens import token_app
from deskpool.domain.errors import DeskpoolError
from deskpool.domain.models import CloneMode, Customization
from deskpool.images.builder import build_guest_image
from deskpool.images.recipe import Flavor, recipe_for
from deskpool.services.audit import Actor, audit
from deskpool.services.desktops import DEFAULT_PATTERN, DesktopService
from deskpool.services.templates import ImageFiles, TemplateService

app = typer.Typer(help="deskpool: virtual desktops from golden images, on libvirt.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
image_app = typer.Typer(help="Guest images built from Debian packages.", no_args_is_help=True)
template_app = typer.Typer(help="Templates (golden images) and their versions.",
                           no_args_is_help=True)
desktop_app = typer.Typer(help="Desktop VMs.", no_args_is_help=True)
app.add_typer(host_app, name="host")
app.add_typer(image_app, name="image")
app.add_typer(template_app, name="template")
app.add_typer(desktop_app, name="desktop")
desktop_app.add_typer(credential_app, name="credential")
desktop_app.command("ssh-keys")(ssh_keys)
app.add_typer(layer_app, name="layer")


app.add_typer(pool_app, name="pool")
app.command("reconcile")(reconcile)
app.add_typer(user_app, name="user")
app.command("serve")(serve_command)
app.add_typer(client_app, name="client")
pool_app.command("grant")(grant_command)
app.add_typer(group_app, name="group")
app.add_typer(token_app, name="token")
app.add_typer(profile_app, name="profile")
app.add_typer(fileshare_app, name="fileshare")
app.add_typer(offline_app, name="offline")
app.command("audit")(audit_command)
user_app.command("disable")(user_disable)
user_app.command("enable")(user_enable)
user_app.command("delete")(user_delete)
user_app.command("reset-password")(user_reset_password)
template_app.command("delete-version")(template_delete_version)
app.command("backup")(backup_command)
app.command("restore")(restore_command)



# --- hosts ---------------------------------------------------------------------------------


# --- images & templates --------------------------------------------------------------------


_FLAVOR_HELP = ("console: a text console, small and quick to boot; desktop: Xorg, LightDM "
                "and Xfce, booting to a graphical greeter (needs 1536 MiB per VM); cloudinit: "
                "the console image with cloud-init (NoCloud seed only) and nslcd, for "
                "templates customized by user data and a join hook")


@image_app.command("build")
def image_build(
    flavor: Annotated[Flavor, typer.Option(help=_FLAVOR_HELP)] = Flavor.CONSOLE,
    force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False,
) -> None:
    """Build (or reuse) the Debian guest image from its recipe."""
    from deskpool.cli.progress import build_with_progress

    with services() as ctx:
        image = build_with_progress(out, ctx.settings.image_cache_dir, flavor=flavor,
                                    force=force)
    out.print(f"{image.flavor} image [bold]{image.recipe_hash[:12]}[/] at {image.directory} "
              f"(VMs need {image.memory_mib} MiB)")


@template_app.command("publish")
def template_publish(
    name: str,
    image: Annotated[Path | None, typer.Option(help="disk image (qcow2 or raw)")] = None,
    kernel: Annotated[Path | None, typer.Option(help="kernel for direct boot")] = None,
    initrd: Annotated[Path | None, typer.Option(help="initrd for direct boot")] = None,
    cmdline: Annotated[str | None, typer.Option(help="kernel command line")] = None,
    built: Annotated[bool, typer.Option(help="publish the image 'image build' made")] = False,
    flavor: Annotated[Flavor, typer.Option(help="with --built: which image")] = Flavor.CONSOLE,
    customization: Annotated[Customization | None, typer.Option(
        help="how desktops get their identity (default: cloud-init for the cloudinit "
             "flavor, else fwcfg)")] = None,
    user_data: Annotated[Path | None, typer.Option(
        help="cloud-init user data merged into each desktop's seed (cloud-init only)")] = None,
    join_hook: Annotated[Path | None, typer.Option(
        help="script run once on each desktop, as root with its identity in DESKPOOL_* "
             "variables, before it is ready (e.g. realm join)")] = None,
    vcpus: int = 1,
    memory_mib: Annotated[int | None, typer.Option(
        help="default: what the built image's recipe needs (--built), else 768")] = None,
    notes: str = "",
    runs_on: Annotated[str, typer.Option(help="hypervisor types it runs on, e.g. QEMU "
                                              "(default: any)")] = "",
    arch: Annotated[str, typer.Option(help="guest architecture (default: x86_64 for --built, "
                                           "else any)")] = "",
) -> None:
    """Publish a new, immutable version of a template."""
    with services() as ctx:
        recipe_hash = None
        if built:
            if image is not None:
                raise DeskpoolError("give either --built or --image, not both")
            guest = build_guest_image(ctx.settings.image_cache_dir, recipe_for(flavor))
            files, recipe_hash = ImageFiles.from_guest_image(guest), guest.recipe_hash
            if memory_mib is None:
                memory_mib = guest.memory_mib
        elif flavor is not Flavor.CONSOLE:
            raise DeskpoolError("--flavor names a built image: give it with --built")
        elif image is None:
            raise DeskpoolError("give the disk image with --image PATH (or --built)")
        else:
            files = ImageFiles(disk=image, kernel=kernel, initrd=initrd, cmdline=cmdline)
        if customization is None:
            customization = (Customization.CLOUD_INIT if built and flavor is Flavor.CLOUDINIT
                             else Customization.FWCFG)
        with spinner(f"publishing {name}"):
            version = TemplateService(ctx).publish(
                name, files, customization=customization, vcpus=vcpus,
                user_data=_read_text(user_data, "user data"),
                join_hook=_read_text(join_hook, "join hook"),
                memory_mib=768 if memory_mib is None else memory_mib,
                recipe_hash=recipe_hash, notes=notes, runs_on=runs_on,
                arch=arch or ("x86_64" if built else ""),
            )
        audit(ctx, Actor.local(), "template.publish", f"template/{name}",
              f"published version {version.number} of template {name}",
              new={"number": version.number, "image": str(files.disk),
                   "sha256": version.image_sha256})
    out.print(f"published [bold]{version.template}[/] version {version.number} "
              f"(sha256 {version.image_sha256[:12]})")


def _read_text(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DeskpoolError(f"cannot read the {what} from {path}: {exc}") from exc


@template_app.command("capture-state")
def template_capture_state(
    name: str,
    host: Annotated[str, typer.Option(help="host whose instant clones will restore it")],
    version: Annotated[int | None, typer.Option(help="default: latest")] = None,
) -> None:
    """Boot the template once on a host and save its memory, for instant-clone pools."""
    from deskpool.services.instant import InstantCloneService

    with services() as ctx, spinner(f"booting {name} on {host} and saving its memory"):
        disk, memory = InstantCloneService(ctx).capture(name, host=host, version=version)
    out.print(f"memory state of [bold]{name}[/] saved on {host} ({memory}, disk {disk})")


@template_app.command("list")
def template_list() -> None:
    """List templates and their versions."""
    with services() as ctx:
        versions = TemplateService(ctx).list_versions()
    table = Table("template", "version", "customization", "size", "sha256", "published")
    for v in versions:
        extras = [label for label, has in (("user data", v.has_user_data),
                                            ("join hook", v.has_join_hook)) if has]
        table.add_row(v.template, str(v.number),
                      v.customization + (f" + {', '.join(extras)}" if extras else ""),
                      f"{v.image_size_bytes / 2**20:.0f} MiB", v.image_sha256[:12],
                      v.published_at.strftime("%Y-%m-%d %H:%M"))
    out.print(table)


# --- desktops ------------------------------------------------------------------------------


@desktop_app.command("create")
def desktop_create(
    template: str,
    name: Annotated[str | None, typer.Option(help="exact name (else from --pattern)")] = None,
    pattern: Annotated[str, typer.Option(help="naming pattern with {n}")] = DEFAULT_PATTERN,
    clone: CloneMode = CloneMode.LINKED,
    version: Annotated[int | None, typer.Option(help="template version (default latest)")]
    = None,
    host: Annotated[str | None, typer.Option(help="host name")] = None,
    wait: Annotated[bool, typer.Option(help="wait until the guest confirms its identity")]
    = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for readiness")] = 240.0,
) -> None:
    """Clone a template version into a new desktop, boot it and wait until it is ready."""
    with services() as ctx, spinner("creating desktop") as status:
        desktop = DesktopService(ctx).create(
            template, version=version, host=host, name=name, pattern=pattern,
            clone_mode=clone, wait_ready=wait, ready_timeout_s=timeout,
            progress=lambda step: status.update(step),  # type: ignore[attr-defined]
        )
    out.print(f"desktop [bold]{desktop.name}[/] is {desktop.state} "
              f"(hostname {desktop.hostname}, MAC {desktop.mac})")


@desktop_app.command("list")
def desktop_list() -> None:
    """List desktops."""
    with services() as ctx:
        desktops = DesktopService(ctx).list()
    table = Table("name", "state", "power", "host", "template", "clone", "MAC", "problem")
    for d in desktops:
        table.add_row(d.name, d.state, d.power_state, d.host, f"{d.template} v{d.version}",
                      d.clone_mode, d.mac, d.last_error or "")
    out.print(table)


@desktop_app.command("delete")
def desktop_delete(name: str) -> None:
    """Delete a desktop: its VM, its disks and its record."""
    with services() as ctx, spinner(f"deleting {name}"):
        DesktopService(ctx).delete(name)
        audit(ctx, Actor.local(), "desktop.delete", f"desktop/{name}",
              f"deleted desktop {name}")
    out.print(f"desktop [bold]{name}[/] deleted")


@desktop_app.command("rebase")
def desktop_rebase(name: str) -> None:
    """Rebase a ready layered desktop's user layer onto its pool's current version now
    (the reconciler boots it on that version at its next pass)."""
    from deskpool.services.layer_rebase_boot import request_rebase

    with services() as ctx:
        desktop_id, _name = request_rebase(ctx, name)
        audit(ctx, Actor.local(), "desktop.rebase", f"desktop/{desktop_id}",
              f"asked for a rebase of desktop {name}'s user layer")
    out.print(f"desktop [bold]{name}[/] is being rebased onto its pool's version; "
              "'deskpool layer show {name}' tells how it went")


@desktop_app.command("migrate")
def desktop_migrate(
    name: str,
    to: Annotated[str | None, typer.Option("--to", help="the host to move it to "
                                           "(default: the one placement picks)")] = None,
) -> None:
    """Move a running desktop live to another host; its user keeps their session."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from deskpool.services.migration import MigrationService

    with services() as ctx, Progress(TextColumn(f"moving {name}"), BarColumn(),
                                     DownloadColumn(), console=out, transient=True) as bar:
        task = bar.add_task("move", total=None)
        moved = MigrationService(ctx).migrate(
            name, target=to, reason="asked from the command line",
            progress=lambda done, total: bar.update(task, completed=done, total=total or None))
        audit(ctx, Actor.local(), "desktop.migrate", f"desktop/{name}",
              f"moved desktop {name} live from {moved.source} to {moved.target}")
    s = moved.stats
    out.print(f"desktop [bold]{name}[/] moved live from {moved.source} to {moved.target} in "
              f"{s.seconds:.1f} s: {s.memory_bytes / 2**20:.0f} MiB of memory, "
              f"{s.disk_bytes / 2**20:.1f} MiB of disk")


@app.command("demo")
def demo() -> None:
    """Run a broker with a demo pool on local libvirt (builds what is missing first)."""
    from deskpool.cli.demo import run_demo

    with services() as ctx:
        run_demo(ctx, out)


def run() -> None:
    """Console entry point: deskpool errors become one line, never a traceback."""
    try:
        app()
    except DeskpoolError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if isinstance(exc, ValidationError) and exc.title == "Settings":  # a DESKPOOL_* value
            err.print(f"[red]error:[/] {_bad_settings(exc)}", highlight=False, soft_wrap=True)
            sys.exit(1)
        if os.environ.get("DESKPOOL_DEBUG"):
            raise
        err.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} "
                  "(DESKPOOL_DEBUG=1 shows the trace)", highlight=False, soft_wrap=True)
        sys.exit(2)


def _bad_settings(exc: ValidationError) -> str:
    """One line naming each bad environment variable, what it holds and what was wrong."""
    problems = []
    for e in exc.errors():
        name = "DESKPOOL_" + "_".join(str(part) for part in e["loc"]).upper()
        problems.append(f"{name}={e.get('input')!r}: {e['msg'].lower()}")
    return "bad setting " + "; ".join(problems)
