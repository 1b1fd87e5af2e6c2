"""What every CLI module shares: the consoles and the service context."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deskpool.config import CONFIG_ENV, ConfigFileError
from deskpool.services.context import ServiceContext

out = Console()
err = Console(stderr=True)


@contextmanager
def services() -> Iterator[ServiceContext]:
    ctx = ServiceContext()
    try:
        yield ctx
    finally:
        ctx.close()


@contextmanager
def spinner(title: str) -> Iterator[object]:
    with out.status(title) as status:
        yield status


# ``--config FILE`` of the commands that run the broker or act on its data directory.
ConfigOption = Annotated[Path | None, typer.Option(
    "--config", help=f"TOML configuration file (default: ${CONFIG_ENV}, else "
                     "/etc/deskpool/deskpool.toml when it exists)")]


def use_config(path: Path | None) -> None:
    """Make ``path`` the file every ``Settings()`` of this process reads (through the
    environment, so the drivers' and the daemon's own reads see it too)."""
    if path is None:
        return
    if not path.is_file():
        raise ConfigFileError(f"the configuration file {path} (--config) does not exist or "
                              "is not a file")
    os.environ[CONFIG_ENV] = str(path.resolve())
