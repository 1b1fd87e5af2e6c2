"""``deskpool pool ...`` and ``deskpool reconcile``."""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from deskpool.broker.entitlements import EntitlementService
from deskpool.cli.common import err, out, services
from deskpool.cli.offline import OfflineOption, policy_fields, policy_of
from deskpool.domain.models import CloneMode
from deskpool.domain.pools import (
    Assignment,
    OnLogout,
    PoolKind,
    PoolSpec,
    PowerPolicy,
    RevertBy,
)
from deskpool.domain.profile_merge import SecondSession
from deskpool.domain.redirection import redirect_folders as redirect_folders_of
from deskpool.reconciler.loop import PassReport, Reconciler
from deskpool.services.audit import Actor
from deskpool.services.pool_admin import PoolAdmin
from deskpool.services.pools import PoolService, PoolView

pool_app = typer.Typer(help="Pools of desktops made from one template.", no_args_is_help=True)


def _describe(pool: PoolView) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(pool.counts.items())) or "empty"
    status = "" if pool.status == "enabled" else f" [yellow]{pool.status}[/]"
    return (f"pool [bold]{pool.name}[/]{status}: {pool.template} v{pool.version}, "
            f"min {pool.min_size} / spare {pool.spare} / max {pool.max_size}; {counts}; "
            f"sessions start within {pool.session_start_timeout_s} s"
            + (f"; roaming profiles, a second session: {pool.second_session}"
               + (f", kept out: {', '.join(pool.profile_exclusions)}"
                  if pool.profile_exclusions else "")
               if pool.roaming_profiles else "")
            + (f"; folders on the file share: {', '.join(pool.redirect_folders)}"
               if pool.redirect_folders else "")
            + ("; load-balanced" if pool.balance else "")
            + ("; reverts by a fresh boot" if pool.revert_by == "boot" else "")
            + (f"; user layer {pool.user_layer_mib} MiB" if pool.user_layer_mib else "")
            + (f"; offline up to {pool.offline.max_days_offline} days, syncing every "
               f"{pool.offline.sync_every_days}" if pool.offline.may_go_offline else "")
            + _fault(pool))


def _fault(pool: PoolView) -> str:
    """The pool's template fault, if any, as a line of its own."""
    if pool.fault is None:
        return ""
    since = f"{pool.fault_since:%Y-%m-%d %H:%M:%S}" if pool.fault_since else "?"
    retry = f"{pool.fault_retry_at:%H:%M:%S}" if pool.fault_retry_at else "the next pass"
    return (f"\n[red]broken[/] since {since} UTC ({pool.fault_failures} failed tries, next "
            f"try at {retry}): {escape(pool.fault)}\n  (fix the template disk, publish and "
            f"roll out a new version, or 'deskpool pool clear-fault {pool.name}' once it is "
            "fixed by hand)")


@pool_app.command("show")
def pool_show(name: str) -> None:
    """One pool: its settings, desktops by state and template fault, if any."""
    with services() as ctx:
        out.print(_describe(PoolService(ctx).get(name)))


@pool_app.command("clear-fault")
def pool_clear_fault(name: str) -> None:
    """Clear a pool's template fault once its disk is fixed by hand: the next pass tries at
    once (and marks it again if the disk is still missing or corrupt)."""
    with services() as ctx:
        out.print(_describe(PoolAdmin(ctx, Actor.local()).clear_fault(name)))


@pool_app.command("create")
def pool_create(
    name: str,
    template: Annotated[str, typer.Option(help="template the pool's desktops come from")],
    kind: PoolKind = PoolKind.STATELESS,
    assignment: Assignment = Assignment.FLOATING,
    min_size: Annotated[int, typer.Option("--min")] = 0,
    max_size: Annotated[int, typer.Option("--max")] = 10,
    spare: int = 1,
    pattern: Annotated[str, typer.Option(help="naming pattern with {n}")] = "desktop-{n:03}",
    clone: Annotated[str, typer.Option(help="linked, full or instant")] = "linked",
    on_logout: OnLogout = OnLogout.RECYCLE_REVERT,
    revert_by: Annotated[RevertBy, typer.Option(
        help="how a revert is done: its factory snapshot (back in seconds, a few hundred MiB "
             "of its own) or a fresh boot on the master (a boot's time, nearly no disk of "
             "its own)")] = RevertBy.SNAPSHOT,
    one_time: bool = False,
    max_age: Annotated[int | None, typer.Option(help="seconds before a free desktop is "
                                                     "replaced")] = None,
    power: PowerPolicy = PowerPolicy.RUNNING,
    canary: int = 0,
    host: Annotated[str | None, typer.Option(help="pin the pool to one host")] = None,
    session_start_timeout: Annotated[int, typer.Option(
        help="seconds a user's graphical session may take to start at hand-over before the "
             "desktop is failed and another tried")] = 150,
    roaming_profiles: Annotated[bool, typer.Option(
        help="users' homes follow them: a profile disk mounted at logon, committed at "
             "logoff (desktop-flavor templates)")] = False,
    second_session: Annotated[SecondSession, typer.Option(
        help="a user's second concurrent session: refuse it, give it a read-only profile, "
             "or merge its changes at logoff")] = SecondSession.MERGE,
    profile_exclude: Annotated[list[str] | None, typer.Option(
        help="a path inside the home kept out of profiles (repeat it); ~/.cache always "
             "is")] = None,
    redirect_folders: Annotated[str, typer.Option(
        help="folders of the home put on the user's file share at logon, comma-separated "
             "(e.g. Documents,Desktop,Downloads; desktop-flavor templates)")] = "",
    balance: Annotated[bool, typer.Option(
        help="the load balancer may move its running desktops live off a host under "
             "memory or CPU pressure (balance_enabled must be on too)")] = False,
    offline: OfflineOption = None,
    user_layer_mib: Annotated[int, typer.Option(
        help="a stateful pool's user layer: MiB of each desktop's own disk that keeps the "
             "user's changes to the system as files, over the template (0: none)")] = 0,
) -> None:
    """Create a pool; the reconciler fills it."""
    spec = PoolSpec(name=name, template=template, kind=kind, assignment=assignment,
                    min_size=min_size, max_size=max_size, spare=spare, naming_pattern=pattern,
                    clone_mode=clone, on_logout=on_logout, revert_by=revert_by,
                    one_time=one_time, max_age_s=max_age, user_layer_mib=user_layer_mib,
                    power_policy=power, canary=canary,
                    session_start_timeout_s=session_start_timeout,
                    roaming_profiles=roaming_profiles, second_session=second_session,
                    profile_exclusions=tuple(profile_exclude or ()),
                    redirect_folders=redirect_folders_of(redirect_folders), balance=balance,
                    offline=policy_of(offline or ""))
    with services() as ctx:
        out.print(_describe(PoolAdmin(ctx, Actor.local()).create(spec, host=host)))


@pool_app.command("list")
def pool_list() -> None:
    """List pools with their desktops by state."""
    with services() as ctx:
        pools = PoolService(ctx).list()
    table = Table("pool", "status", "template", "version", "kind", "clone", "min/spare/max",
                  "desktops")
    for p in pools:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(p.counts.items()))
        status = p.status if p.fault is None else f"{p.status}, [red]broken[/]"
        table.add_row(p.name, status, p.template, str(p.version), p.kind, p.clone_mode,
                      f"{p.min_size}/{p.spare}/{p.max_size}", counts)
    out.print(table)


@pool_app.command("rollout")
def pool_rollout(
    name: str,
    version: Annotated[int | None, typer.Option(help="default: the template's latest")] = None,
    canary: Annotated[int | None, typer.Option(
        help="new desktops ready before free old ones are replaced (default: as set)")] = None,
) -> None:
    """Roll a template version out: free desktops are replaced now, held ones as users leave."""
    with services() as ctx:
        out.print(_describe(PoolAdmin(ctx, Actor.local()).rollout(name, version, canary)))


@pool_app.command("rollback")
def pool_rollback(name: str) -> None:
    """Return a pool to the version it ran before its last rollout."""
    with services() as ctx:
        out.print(_describe(PoolAdmin(ctx, Actor.local()).rollback(name)))


@pool_app.command("update")
def pool_update(
    name: str,
    template: Annotated[str | None, typer.Option(help="only while the pool is empty")] = None,
    kind: Annotated[PoolKind | None, typer.Option(help="only while the pool is empty")] = None,
    assignment: Annotated[Assignment | None, typer.Option(
        help="only while the pool is empty")] = None,
    min_size: Annotated[int | None, typer.Option("--min")] = None,
    max_size: Annotated[int | None, typer.Option("--max")] = None,
    spare: int | None = None,
    pattern: Annotated[str | None, typer.Option(help="naming pattern with {n}")] = None,
    clone: Annotated[CloneMode | None, typer.Option(help="for new desktops")] = None,
    on_logout: OnLogout | None = None,
    one_time: Annotated[bool | None, typer.Option("--one-time/--not-one-time")] = None,
    max_age: Annotated[int | None, typer.Option(help="seconds; 0: no limit")] = None,
    power: PowerPolicy | None = None,
    canary: int | None = None,
    reservation_timeout: Annotated[int | None, typer.Option(help="seconds")] = None,
    idle_timeout: Annotated[int | None, typer.Option(help="seconds; 0: never")] = None,
    disconnect_timeout: Annotated[int | None, typer.Option(help="seconds; 0: never")] = None,
    session_start_timeout: Annotated[int | None, typer.Option(
        help="seconds a user's graphical session may take to start")] = None,
    placement: Annotated[str | None, typer.Option(help="spread or pack")] = None,
    roaming_profiles: Annotated[bool | None, typer.Option(
        "--roaming-profiles/--no-roaming-profiles",
        help="users' homes follow them (profile containers)")] = None,
    second_session: Annotated[SecondSession | None, typer.Option(
        help="refuse, read_only or merge a user's second concurrent session")] = None,
    revert_by: Annotated[RevertBy | None, typer.Option(
        help="snapshot or boot: how a revert is done")] = None,
    profile_exclude: Annotated[list[str] | None, typer.Option(
        help="the paths kept out of profiles, all of them (repeat it; '' for none)")] = None,
    redirect_folders: Annotated[str | None, typer.Option(
        help="the folders put on the user's file share, all of them, comma-separated "
             "('' for none)")] = None,
    balance: Annotated[bool | None, typer.Option(
        "--balance/--no-balance",
        help="whether the load balancer may move its running desktops")] = None,
    host: Annotated[list[str] | None, typer.Option(
        help="pin to these hosts (repeatable); --any-host unpins")] = None,
    any_host: Annotated[bool, typer.Option(help="unpin: any host")] = False,
    offline: OfflineOption = None,
) -> None:
    """Change a pool's settings; the ones not given stay (audited, old and new values)."""
    given: dict[str, object | None] = {
        "template": template, "kind": kind, "assignment": assignment, "min_size": min_size,
        "max_size": max_size, "spare": spare, "naming_pattern": pattern,
        "clone_mode": clone.value if clone else None, "on_logout": on_logout,
        "one_time": one_time, "power_policy": power, "canary": canary,
        "reservation_timeout_s": reservation_timeout,
        "session_start_timeout_s": session_start_timeout, "placement": placement,
        "roaming_profiles": roaming_profiles, "second_session": second_session,
        "revert_by": revert_by, "balance": balance,
        "profile_exclusions": None if profile_exclude is None
        else tuple(p for p in profile_exclude if p),
        "redirect_folders": None if redirect_folders is None
        else redirect_folders_of(redirect_folders)}
    changes = {k: v for k, v in given.items() if v is not None}
    # 0 clears a limit that may be absent ("never").
    for key, value in (("max_age_s", max_age), ("idle_timeout_s", idle_timeout),
                       ("disconnect_timeout_s", disconnect_timeout)):
        if value is not None:
            changes[key] = value or None
    if offline is not None:
        changes["offline"] = policy_fields(offline)
    if host or any_host:
        changes["hosts"] = [] if any_host else list(host or [])
    if not changes:
        raise typer.BadParameter("give at least one setting to change")
    with services() as ctx:
        out.print(_describe(PoolAdmin(ctx, Actor.local()).update(name, changes)))


@pool_app.command("resize")
def pool_resize(
    name: str,
    min_size: Annotated[int | None, typer.Option("--min")] = None,
    max_size: Annotated[int | None, typer.Option("--max")] = None,
    spare: int | None = None,
) -> None:
    """Change a pool's min, max and spare desktops."""
    with services() as ctx:
        out.print(_describe(PoolAdmin(ctx, Actor.local()).resize(
            name, min_size=min_size, max_size=max_size, spare=spare)))


@pool_app.command("disable")
def pool_disable(name: str) -> None:
    """No new sessions; users keep and reconnect to the desktops they hold."""
    with services() as ctx:
        out.print(_describe(PoolAdmin(ctx, Actor.local()).set_enabled(name, False)))


@pool_app.command("enable")
def pool_enable(name: str) -> None:
    with services() as ctx:
        out.print(_describe(PoolAdmin(ctx, Actor.local()).set_enabled(name, True)))


@pool_app.command("delete")
def pool_delete(name: str) -> None:
    """Delete a pool: free desktops are retired now, held ones as their users log off, then
    the pool goes (the reconciler does it)."""
    with services() as ctx:
        out.print(_describe(PoolAdmin(ctx, Actor.local()).delete(name)))


@pool_app.command("revoke")
def pool_revoke(
    pool: str,
    user: Annotated[str | None, typer.Option(help="the user's entitlement")] = None,
    group: Annotated[str | None, typer.Option(help="the group's entitlement")] = None,
) -> None:
    """Take a user's or a group's entitlement to a pool away."""
    if (user is None) == (group is None):
        raise typer.BadParameter("give exactly one of --user or --group")
    kind, principal = ("user", user) if user else ("group", group)
    assert principal is not None
    with services() as ctx:
        EntitlementService(ctx).revoke(pool, kind, principal, actor=Actor.local())
    out.print(f"{kind} {principal} may no longer use pool {pool}")


def _print_report(report: PassReport) -> None:
    out.print(f"created {report.created}, ready {report.readied}, recycled {report.recycled}, "
              f"retired {report.retired}, deleted {report.deleted}, power changes "
              f"{report.power_changes}, vanished {report.vanished}, orphans removed "
              f"{report.orphans_removed}")
    for note in report.notes:
        out.print(f"  {note}")
    for problem in report.errors:
        err.print(f"  [yellow]problem:[/] {problem}", highlight=False)


def reconcile(
    loop: Annotated[bool, typer.Option(help="keep running passes until interrupted")] = False,
    interval: Annotated[float, typer.Option(help="seconds between passes (0.1 to 3600)")] = 10.0,
) -> None:
    """Run one reconcile pass (or keep running them): pool sizes, recycle, retire, power."""
    # NaN passes any min/max comparison, so it is named on its own.
    if not (math.isfinite(interval) and 0.1 <= interval <= 3600):
        raise typer.BadParameter(f"--interval {interval} must be seconds from 0.1 to 3600")
    with services() as ctx:
        reconciler = Reconciler(ctx)
        if not loop:
            _print_report(reconciler.run_pass())
            return
        with contextlib.suppress(KeyboardInterrupt):
            reconciler.run_forever(threading.Event(), interval, on_report=_print_report)
