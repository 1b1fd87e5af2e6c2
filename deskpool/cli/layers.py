"""``deskpool layer ...``: user layers by hand, for administrators and tests.

``rebase``, ``init`` and ``exclusions`` work on directories (a template version's root
filesystem, a layer directory), not on the database: the service that rebases desktops at a
rollout calls the same code. ``show`` and ``pool`` read the database: a desktop's layer and
its last rebase, and a pool's desktops per version and the conflicts of its rollout.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from deskpool.cli.common import out, services
from deskpool.domain.layers import DEFAULT_EXCLUSIONS, LayerRules, RebaseReport
from deskpool.images.layer_rebase import create_layer, read_manifest, rebase_layer
from deskpool.services.user_layers import LayerItemView, UserLayerViews

layer_app = typer.Typer(help="User layers: a stateful desktop's own changes to the system.",
                        no_args_is_help=True)


def print_report(report: RebaseReport) -> None:
    out.print(f"rebased from [bold]{report.old_version}[/] to [bold]{report.new_version}[/]: "
              f"{len(report.kept)} kept, {len(report.dropped)} dropped, "
              f"{len(report.conflicts)} conflict(s), {len(report.notes)} note(s), "
              f"{report.excluded} excluded, {report.bytes / 2**20:.1f} MiB in the new layer")
    if report.conflicts:
        # Paths fold rather than end in "…": an admin must be able to find the user's copy.
        table = Table(title="the new base won")
        table.add_column("conflict", overflow="fold")
        table.add_column("why")
        table.add_column("the user's copy", overflow="fold")
        for c in report.conflicts:
            table.add_row(c.path, c.reason, c.user_copy or "(the user had deleted it)")
        out.print(table)
    if report.notes:
        out.print(_notes_table([(n.path, n.text) for n in report.notes]))


def _notes_table(notes: list[tuple[str, str]]) -> Table:
    """Paths where the user's version won, and why (long paths fold, never cut)."""
    table = Table(title="the user's version won")
    table.add_column("path", overflow="fold")
    table.add_column("note")
    for path, text in notes:
        table.add_row(path, text)
    return table


@layer_app.command("rebase")
def layer_rebase(
    old: Annotated[Path, typer.Option(help="root filesystem of the version the layer is on",
                                      file_okay=False)],
    new: Annotated[Path, typer.Option(help="root filesystem of the new version",
                                      file_okay=False)],
    layer: Annotated[Path, typer.Option(help="the layer directory (upper/, .deskpool/)",
                                        file_okay=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="the new layer directory to write",
                                          file_okay=False)],
    new_version: Annotated[str, typer.Option(help="name of the new version")],
    old_version: Annotated[str | None, typer.Option(
        help="the version the layer is on (default: what its manifest says)")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="glob of paths to drop unreported (repeat; replaces the defaults)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Rebase a user layer onto a new version into a new directory; the old is only read."""
    rules = LayerRules(exclusions=tuple(exclude)) if exclude else LayerRules()
    version = old_version or read_manifest(layer).base_version
    report = rebase_layer(old, new, layer, out_dir, old_version=version,
                          new_version=new_version, rules=rules)
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        print_report(report)


@layer_app.command("init")
def layer_init(
    layer: Annotated[Path, typer.Argument(help="the layer directory to create",
                                          file_okay=False)],
    version: Annotated[str, typer.Option(help="the version the layer starts on")],
) -> None:
    """Create an empty user layer (upper/, work/ and its manifest) on a version."""
    create_layer(layer, version)
    out.print(f"empty user layer on {version} at {layer}")


@layer_app.command("exclusions")
def layer_exclusions() -> None:
    """Print the default exclusions: paths every rebase drops without a report."""
    for pattern in DEFAULT_EXCLUSIONS:
        out.print(pattern, highlight=False)


def _mib(size: int | None) -> str:
    return "not reported" if size is None else f"{size / 2**20:.1f} MiB"


def _conflict_table(title: str, conflicts: list[LayerItemView]) -> Table:
    # Paths fold rather than end in "…", as in the rebase report above.
    table = Table(title=title)
    table.add_column("conflict", overflow="fold")
    table.add_column("why")
    table.add_column("the user's copy", overflow="fold")
    for c in conflicts:
        table.add_row(c.path, c.reason, c.user_copy or "(the user had deleted it)")
    return table


@layer_app.command("show")
def layer_show(
    desktop: Annotated[str, typer.Argument(help="the desktop's name (or id)")],
) -> None:
    """A desktop's user layer: size, changed files, version, and its last rebase."""
    try:
        which: uuid.UUID | str = uuid.UUID(desktop)
    except ValueError:
        which = desktop
    with services() as ctx:
        view = UserLayerViews(ctx).desktop_layer(which)
    layer_on = "not reported" if view.layer_version is None else f"v{view.layer_version}"
    files = "not reported" if view.changed_files is None else str(view.changed_files)
    out.print(f"desktop [bold]{view.desktop}[/] (pool {view.pool or '-'}, user "
              f"{view.user or '-'}) runs version {view.template_version}; its layer is on "
              f"{layer_on}: {_mib(view.layer_bytes)}, {files} changed file(s)", highlight=False)
    last = view.last_rebase
    if last is None:
        out.print("its layer was never rebased")
        return
    when = last.finished_at.strftime("%Y-%m-%d %H:%M")
    if last.outcome != "rebased":
        out.print(f"last rebase, v{last.old_version} to v{last.new_version} at {when}, "
                  f"[red]failed[/]: {last.error}", highlight=False)
        return
    out.print(f"last rebase, v{last.old_version} to v{last.new_version} at {when}: "
              f"{last.kept} kept, {last.dropped} dropped, {last.conflict_count} conflict(s), "
              f"{last.note_count} note(s), {last.excluded} excluded", highlight=False)
    if last.conflicts:
        out.print(_conflict_table("the new base won", last.conflicts))
    if last.notes:
        out.print(_notes_table([(n.path, n.reason) for n in last.notes]))


@layer_app.command("pool")
def layer_pool(pool: Annotated[str, typer.Argument(help="the pool's name")]) -> None:
    """A pool's desktops per template version, and the conflicts and failures of the
    rebases onto its current version."""
    with services() as ctx:
        view = UserLayerViews(ctx).pool_layers(pool)
    table = Table(title=f"pool {view.pool}: desktops per version")
    table.add_column("version", justify="right")
    table.add_column("desktops", justify="right")
    table.add_column("")
    for v in view.versions:
        table.add_row(str(v.version), str(v.desktops), "current" if v.current else "")
    out.print(table)
    out.print(f"rebased onto version {view.current_version}: {view.rebased} desktop(s), "
              f"{view.failed} failed, {view.conflicts} conflict(s), {view.notes} note(s)",
              highlight=False)
    out.print(f"waiting for a rebase: {view.awaiting_rebase} desktop(s)", highlight=False)
    if view.conflict_list:
        table = Table(title="the new base won")
        table.add_column("desktop")
        table.add_column("conflict", overflow="fold")
        table.add_column("why")
        table.add_column("the user's copy", overflow="fold")
        for c in view.conflict_list:
            table.add_row(c.desktop, c.path, c.reason, c.user_copy or "(the user had deleted it)")
        out.print(table)
    if view.failures:
        table = Table(title="failed rebases (their layers were left as they were)")
        table.add_column("desktop")
        table.add_column("error", overflow="fold")
        for f in view.failures:
            table.add_row(f.desktop, f.error)
        out.print(table)
