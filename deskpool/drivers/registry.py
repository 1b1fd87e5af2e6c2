"""Open the right driver for a host URI.

``fake://NAME`` gives an in-memory ``FakeDriver``, one per name and process, so the same fake
host keeps its VMs between calls; ``fake+tcp://HOST:PORT/NAME`` a fake host served by another
process (``deskpool.drivers.fake.remote``); every other URI is handed to libvirt.
"""

from __future__ import annotations

import threading
from pathlib import Path

from deskpool.drivers.base import HypervisorDriver

_fakes: dict[str, HypervisorDriver] = {}
_fakes_lock = threading.Lock()


def open_driver(uri: str, *, storage_dir: Path | None = None) -> HypervisorDriver:
    if uri.startswith("fake://"):
        from deskpool.drivers.fake import FakeDriver

        with _fakes_lock:
            if uri not in _fakes:
                _fakes[uri] = FakeDriver(uri)
            return _fakes[uri]
    if uri.startswith("fake+tcp://"):
        from deskpool.drivers.fake.remote import RemoteFakeDriver

        return RemoteFakeDriver(uri)
    from deskpool.drivers.libvirt import LibvirtDriver

    return LibvirtDriver(uri, storage_dir=storage_dir)


def release_driver(driver: HypervisorDriver) -> None:
    """Close a driver ``open_driver`` gave, unless it is a shared fake host (closing that one
    would end the fake hypervisor for everybody in the process)."""
    if driver not in _fakes.values():
        driver.close()


def forget_fake_hosts() -> None:
    """Tests: drop every fake host so the next test starts empty."""
    from deskpool.drivers.fake.shared import forget_shared_storage

    with _fakes_lock:
        _fakes.clear()
    forget_shared_storage()
