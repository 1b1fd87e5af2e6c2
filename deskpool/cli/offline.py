"""``deskpool offline admin list|revoke|force-checkin|rollback``: offline check-outs (issue 15),
from the broker's own machine, audited with the local login; and the ``--offline`` setting of
``deskpool pool create|update``. The laptop's user commands (``deskpool offline checkout``...)
are ``cli/offline_user.py``; the admin ones sit in their own group because both sides have
a ``rollback`` with different powers (an admin's ignores the pool's policy)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from deskpool.cli.common import out, services
from deskpool.cli.offline_user import offline_app as offline_app
from deskpool.domain.errors import InvalidInput
from deskpool.domain.offline import OfflinePolicy
from deskpool.services.audit import Actor
from deskpool.services.offline import OfflineService
from deskpool.services.offline_views import CheckoutView

admin_app = typer.Typer(help="Offline check-outs, on the broker's machine: who has what; "
                        "revoke, force back in, roll back.", no_args_is_help=True)
offline_app.add_typer(admin_app, name="admin")
MiB = 2**20
_YES, _NO = ("yes", "true", "on", "1"), ("no", "false", "off", "0")
POLICY_HELP = ("the pool's offline policy, as FIELD=VALUE,... of may_go_offline, "
               "max_days_offline, sync_every_days, may_roll_back, usb_passthrough, printing, "
               "offline_sso (e.g. 'may_go_offline=yes,max_days_offline=10'); update changes "
               "only the fields given")


def policy_fields(text: str) -> dict[str, bool | int]:
    """``--offline``'s FIELD=VALUE list, checked against the policy's fields."""
    known = {name: type(value) for name, value in OfflinePolicy().to_dict().items()}
    found: dict[str, bool | int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        name, value = name.strip().replace("-", "_"), value.strip().lower()
        if not sep or name not in known:
            raise InvalidInput(f"--offline: {item!r} is not FIELD=VALUE with FIELD one of "
                               f"{', '.join(known)}")
        if known[name] is bool:
            if value not in _YES + _NO:
                raise InvalidInput(f"--offline: {name} is yes or no, not {value!r}")
            found[name] = value in _YES
        elif value.isdigit():
            found[name] = int(value)
        else:
            raise InvalidInput(f"--offline: {name} is a number of days, not {value!r}")
    return found


def policy_of(text: str) -> OfflinePolicy:
    return OfflinePolicy.from_dict({**OfflinePolicy().to_dict(), **policy_fields(text)})


def _when(view: CheckoutView) -> str:
    return view.lease_expires_at.strftime("%Y-%m-%d %H:%M UTC")


@admin_app.command("list")
def offline_list() -> None:
    """Every desktop checked out now: to whom, since when, lease end, last sync, pending."""
    with services() as ctx:
        views = OfflineService(ctx).checkouts()
    table = Table("desktop", "user", "laptop", "since", "lease until", "last sync",
                  "pending (MiB)", "revoked")
    for v in views:
        table.add_row(v.desktop, v.user, v.laptop, f"{v.since:%Y-%m-%d %H:%M}", _when(v),
                      f"{v.last_sync_at:%Y-%m-%d %H:%M}" if v.last_sync_at else "never",
                      f"{v.bytes_pending / MiB:.1f}", "yes" if v.revoked else "")
    out.print(table)


@admin_app.command("revoke")
def offline_revoke(desktop: str) -> None:
    """The laptop may no longer start DESKTOP; it stays locked until checked in or forced."""
    with services() as ctx:
        v = OfflineService(ctx, Actor.local()).revoke(desktop)
    out.print(f"revoked the check-out of {v.desktop} to {v.laptop} ({v.user}); the laptop "
              f"refuses it at its next contact, or when its lease ends at {_when(v)}")


@admin_app.command("force-checkin")
def offline_force_checkin(desktop: str) -> None:
    """Bring DESKTOP back online as of its last sync (a lost laptop); its copy is revoked."""
    with services() as ctx:
        v = OfflineService(ctx, Actor.local()).force_check_in(desktop)
    out.print(f"{v.desktop} is back online as of its last sync; {v.laptop}'s copy is revoked")


@admin_app.command("rollback")
def offline_rollback(desktop: str) -> None:
    """Discard the laptop's changes to DESKTOP since its last sync and bring it back."""
    with services() as ctx:
        v = OfflineService(ctx, Actor.local()).admin_roll_back(desktop)
    out.print(f"{v.desktop} rolled back to its last sync and back online")


OfflineOption = Annotated[str | None, typer.Option("--offline", help=POLICY_HELP)]
