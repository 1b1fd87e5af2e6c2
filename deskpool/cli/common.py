"""What every CLI module shares: the consoles and the service context."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

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
