"""``deskpool pool ...`` and ``deskpool reconcile``."""

from __future__ import annotations

import contextlib
import threading
from typing import Annotated

import typer
from rich.table import Table

from deskpool.cli.common import err, out, services
from deskpool.domain.pools import Assignment, OnLogout, PoolKind, PoolSpec, PowerPolicy
from deskpool.reconciler.loop import PassReport, Reconciler
from deskpool.services.pools import PoolService, PoolView

pool_app = typer.Typer(help="Pools of desktops made from one template.", no_args_is_help=True)


def _describe(pool: PoolView) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(pool.counts.items())) or "empty"
    return (f"pool [bold]{pool.name}[/]: {pool.template} v{pool.version}, "
            f"min {pool.min_size} / spare {pool.spare} / max {pool.max_size}; {counts}; "
            f"sessions start within {pool.session_start_timeout_s} s")


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
    one_time: bool = False,
    max_age: Annotated[int | None, typer.Option(help="seconds before a free desktop is "
                                                     "replaced")] = None,
    power: PowerPolicy = PowerPolicy.RUNNING,
    canary: int = 0,
    host: Annotated[str | None, typer.Option(help="pin the pool to one host")] = None,
    session_start_timeout: Annotated[int, typer.Option(
        help="seconds a user's graphical session may take to start at hand-over before the "
             "desktop is failed and another tried")] = 150,
) -> None:
    """Create a pool; the reconciler fills it."""
    spec = PoolSpec(name=name, template=template, kind=kind, assignment=assignment,
                    min_size=min_size, max_size=max_size, spare=spare, naming_pattern=pattern,
                    clone_mode=clone, on_logout=on_logout, one_time=one_time, max_age_s=max_age,
                    power_policy=power, canary=canary,
                    session_start_timeout_s=session_start_timeout)
    with services() as ctx:
        out.print(_describe(PoolService(ctx).create(spec, host=host)))


@pool_app.command("list")
def pool_list() -> None:
    """List pools with their desktops by state."""
    with services() as ctx:
        pools = PoolService(ctx).list()
    table = Table("pool", "template", "version", "kind", "clone", "min/spare/max", "desktops")
    for p in pools:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(p.counts.items()))
        table.add_row(p.name, p.template, str(p.version), p.kind, p.clone_mode,
                      f"{p.min_size}/{p.spare}/{p.max_size}", counts)
    out.print(table)


@pool_app.command("rollout")
def pool_rollout(
    name: str,
    version: Annotated[int | None, typer.Option(help="default: the template's latest")] = None,
) -> None:
    """Roll a template version out: free desktops are replaced now, held ones as users leave."""
    with services() as ctx:
        out.print(_describe(PoolService(ctx).rollout(name, version)))


@pool_app.command("rollback")
def pool_rollback(name: str) -> None:
    """Return a pool to the version it ran before its last rollout."""
    with services() as ctx:
        out.print(_describe(PoolService(ctx).rollback(name)))


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
    interval: Annotated[float, typer.Option(help="seconds between passes")] = 10.0,
) -> None:
    """Run one reconcile pass (or keep running them): pool sizes, recycle, retire, power."""
    with services() as ctx:
        reconciler = Reconciler(ctx)
        if not loop:
            _print_report(reconciler.run_pass())
            return
        with contextlib.suppress(KeyboardInterrupt):
            reconciler.run_forever(threading.Event(), interval, on_report=_print_report)
