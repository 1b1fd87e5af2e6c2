"""``deskpool profile list|show|reset|rollback|verify|copies|hosts``: users' roaming
profiles, from the broker's own machine (``copies``: layers on their way between hosts, with
their progress; ``hosts``: which hosts hold each generation). Resets and rollbacks are
recorded in the audit log with the local login."""

from __future__ import annotations

import typer
from rich.table import Table

from deskpool.cli.common import out, services
from deskpool.services.audit import Actor
from deskpool.services.profile_admin import ProfileAdmin
from deskpool.services.profiles import ProfileView

profile_app = typer.Typer(help="Roaming profiles: list, show, reset, roll back, verify.",
                          no_args_is_help=True)
MiB = 2**20


def _writeback(view: ProfileView) -> str:
    if view.committed_at is None:
        return "never"
    took = f" in {view.last_writeback_s:.1f} s" if view.last_writeback_s is not None else ""
    return (f"{view.committed_at:%Y-%m-%d %H:%M} UTC, "
            f"{view.last_writeback_bytes / MiB:.1f} MiB{took}")


@profile_app.command("list")
def profile_list() -> None:
    """Every user's profile: generation, size against quota, the last write-back."""
    with services() as ctx:
        views = ProfileAdmin(ctx).list()
    table = Table("user", "generation", "size / quota (MiB)", "last write-back", "open on",
                  "set aside")
    for v in views:
        table.add_row(v.user, str(v.generation),
                      f"{v.size_bytes / MiB:.0f} / {v.quota_bytes / MiB:.0f}", _writeback(v),
                      ", ".join(v.open_sessions), str(len(v.unclean)))
    out.print(table)


@profile_app.command("show")
def profile_show(user: str) -> None:
    """One profile, with its kept generations, sessions set aside and merge conflicts."""
    with services() as ctx:
        _print(ProfileAdmin(ctx).show(user))


@profile_app.command("reset")
def profile_reset(user: str) -> None:
    """Give USER a fresh home from their next logon; the current one stays a generation."""
    with services() as ctx:
        _print(ProfileAdmin(ctx, Actor.local()).reset(user))


@profile_app.command("rollback")
def profile_rollback(user: str, generation: int) -> None:
    """Make kept GENERATION of USER's profile the next one."""
    with services() as ctx:
        _print(ProfileAdmin(ctx, Actor.local()).rollback(user, generation))


@profile_app.command("verify")
def profile_verify(user: str) -> None:
    """Read USER's committed layers against their checksums; exit 1 if any differs."""
    with services() as ctx:
        problems = ProfileAdmin(ctx).verify(user)
    for problem in problems:
        out.print(f"[red]corrupt[/] {problem}", highlight=False)
    if problems:
        raise typer.Exit(1)
    out.print(f"every committed layer of {user}'s profile matches its checksum")


@profile_app.command("copies")
def profile_copies() -> None:
    """Profile layers being copied between hosts now, with their progress."""
    with services() as ctx:
        copies = ProfileAdmin(ctx).copies()
    if not copies:
        out.print("no profile layer is being copied between hosts")
        return
    table = Table("user", "generation", "to host", "copied (MiB)", "by", "last progress")
    for c in copies:
        share = f" ({c.bytes_done / c.bytes_total:.0%})" if c.bytes_total else ""
        table.add_row(c.user, str(c.generation), c.host,
                      f"{c.bytes_done / MiB:.1f} of {c.bytes_total / MiB:.1f}{share}",
                      c.copier or "?",
                      f"{c.updated_at:%H:%M:%S} UTC" if c.updated_at else "?")
    out.print(table)


@profile_app.command("hosts")
def profile_hosts(user: str) -> None:
    """Which hosts hold each committed generation of USER's profile."""
    with services() as ctx:
        held = ProfileAdmin(ctx).held_on(user)
    for generation, hosts in held.items():
        out.print(f"generation {generation}: "
                  f"{', '.join(hosts) or 'the profile store every host reaches'}",
                  highlight=False)


def _print(v: ProfileView) -> None:
    out.print(f"profile of [bold]{v.user}[/]: generation {v.generation} "
              f"({v.generations_kept} kept; a rollback may go to "
              f"{', '.join(map(str, v.rollback_to)) or 'none'}), "
              f"{v.size_bytes / MiB:.1f} of {v.quota_bytes / MiB:.0f} MiB")
    out.print(f"last write-back: {_writeback(v)}")
    if v.open_sessions:
        out.print(f"open on: {', '.join(v.open_sessions)}")
    for desktop, why in v.unclean:
        out.print(f"set aside from {desktop}: {why}", markup=False)
    for conflict in v.conflicts:
        out.print(f"conflicts: {conflict}", markup=False)
