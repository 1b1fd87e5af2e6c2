"""``deskpool layer ...``: user layers by hand, for administrators and tests.

Works on directories (a template version's root filesystem, a layer directory), not on the
database: the service that rebases desktops at a rollout calls the same code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from deskpool.cli.common import out
from deskpool.domain.layers import DEFAULT_EXCLUSIONS, LayerRules, RebaseReport
from deskpool.images.layer_rebase import create_layer, read_manifest, rebase_layer

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
        table = Table(title="the user's version won")
        table.add_column("path", overflow="fold")
        table.add_column("note")
        for n in report.notes:
            table.add_row(n.path, n.text)
        out.print(table)


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
