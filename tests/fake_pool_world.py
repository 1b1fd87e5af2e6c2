"""A broker world on one in-memory fake host, for reconciler and pool tests: a settable clock,
the context with its host (and a tiny golden template), and the fake driver behind it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from deskpool.config import Settings
from deskpool.drivers.fake import FakeDriver
from deskpool.drivers.registry import forget_fake_hosts, open_driver
from deskpool.services.context import ServiceContext
from deskpool.services.hosts import HostService
from deskpool.services.templates import ImageFiles, TemplateService


class Clock:
    """The reconciler's clock, moved on by the test."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime(2026, 12, 6, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@contextmanager
def fake_host_context(tmp_path: Path, uri: str, *, golden: bool = True
                      ) -> Iterator[ServiceContext]:
    """A context on a fresh data dir with host ``h1`` at ``uri`` (a ``fake://`` one) and,
    with ``golden``, template ``golden`` published from an empty 64 MiB qcow2."""
    forget_fake_hosts()
    context = ServiceContext(Settings(data_dir=tmp_path / "data"))
    HostService(context).add("h1", uri)
    if golden:
        disk = tmp_path / "golden.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"],
                       check=True)
        TemplateService(context).publish("golden", ImageFiles(disk=disk))
    try:
        yield context
    finally:
        context.close()
        forget_fake_hosts()


def fake_driver(uri: str) -> FakeDriver:
    driver = open_driver(uri)
    assert isinstance(driver, FakeDriver)
    return driver
