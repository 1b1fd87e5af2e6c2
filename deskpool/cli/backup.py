"""``deskpool backup DEST`` and ``deskpool restore SRC``, with Rich progress bars.

Neither opens the broker's service context: a backup must not migrate the database it copies,
and a restore must not create the database it is about to fill.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from deskpool.cli.common import ConfigOption, out, use_config
from deskpool.config import Settings
from deskpool.services import backup as backups

_LABELS = {"database": "copying the database", "templates": "copying the template store",
           "checksums": "checksumming", "verifying": "verifying checksums"}


@contextmanager
def _bars() -> Iterator[backups.Progress]:
    """One bar per step, in bytes (the database copy in pages or, for pg_dump, a spinner)."""
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), console=out, transient=True) as bars:
        tasks: dict[str, TaskID] = {}

        def report(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bars.add_task(_LABELS.get(what, what), total=total or None)
            bars.update(tasks[what], completed=done, total=total or None)

        yield report


def backup_command(
    dest: Annotated[Path, typer.Argument(help="new directory to write the backup to")],
    config: ConfigOption = None,
) -> None:
    """Back up the database and the template store (a consistent copy, with checksums)."""
    use_config(config)
    with _bars() as progress:
        report = backups.backup(Settings(), dest, progress)
    out.print(f"backed up the {report.database} database (schema {report.revision}) and "
              f"{report.files - 1} template file(s), {report.size_bytes / 2**20:.1f} MiB, "
              f"to [bold]{report.path}[/]")


def restore_command(
    src: Annotated[Path, typer.Argument(help="a directory 'deskpool backup' wrote")],
    force: Annotated[bool, typer.Option(
        help="replace the database and template store of a data directory in use")] = False,
    config: ConfigOption = None,
) -> None:
    """Restore a backup into an empty data directory (stop the broker first)."""
    use_config(config)
    settings = Settings()
    with _bars() as progress:
        report = backups.restore(settings, src, force=force, progress=progress)
    migrated = (f", migrated from schema {report.revision_before} to {report.revision_after}"
                if report.revision_before != report.revision_after else "")
    out.print(f"restored {report.files} file(s) from {src} into {settings.data_dir}{migrated}")
