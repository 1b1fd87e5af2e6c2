"""A host's libvirt daemon is shared: other clients (another deployment, a second broker, an
administrator) define and undefine VMs while a broker lists them. Found by bench/r1_kill.py on a
machine where other sessions made VMs: a VM undefined between libvirt's list of domains and the
read of its state made the whole listing fail, so the reconciler took the host for silent and
dropped its connection under the steps then running, which failed their desktops; and a
leftover VM removed by another client while the reconciler removed it failed its pass."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from deskpool.domain.errors import DriverError
from deskpool.drivers.libvirt import LibvirtDriver

URI = "test:///default"


def _define(conn: Any, name: str) -> None:
    conn.defineXML(f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>"
                   "<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>")


class _UndefinesAfterListing:
    """The driver's connection, except that listing domains lets another client undefine
    ``victim`` right after libvirt answered, before the driver reads each domain."""

    def __init__(self, conn: Any, victim: str) -> None:
        self._conn, self.victim = conn, victim

    def listAllDomains(self, flags: int) -> list[Any]:
        domains = self._conn.listAllDomains(flags)
        self._conn.lookupByName(self.victim).undefine()
        return list(domains)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.fixture()
def driver(tmp_path: Path) -> Iterator[LibvirtDriver]:
    d = LibvirtDriver(URI, storage_dir=tmp_path / "pool")
    yield d
    d.close()


def test_a_vm_undefined_while_listing_is_left_out_not_a_failure(driver: LibvirtDriver) -> None:
    stem = f"listing-{uuid.uuid4().hex[:8]}"
    for suffix in ("stays", "goes"):
        _define(driver._conn, f"{stem}-{suffix}")
    real = driver._conn
    driver._connection = _UndefinesAfterListing(real, f"{stem}-goes")
    try:
        names = {vm.name for vm in driver.list_vms()}
    finally:
        driver._connection = real
        real.lookupByName(f"{stem}-stays").undefine()
    assert f"{stem}-stays" in names
    assert f"{stem}-goes" not in names


def test_other_errors_while_listing_still_fail_the_listing(driver: LibvirtDriver) -> None:
    """Only a VM that is gone is skipped: a daemon that breaks mid-list is still an error."""

    class Broken:
        def isAlive(self) -> int:  # the connection itself answers; listing breaks
            return 1

        def listAllDomains(self, flags: int) -> list[Any]:
            raise libvirt.libvirtError("the daemon went away")

    real = driver._conn
    driver._connection = Broken()
    try:
        with pytest.raises(DriverError, match="listing VMs"):
            driver.list_vms()
    finally:
        driver._connection = real


def test_a_vm_undefined_while_being_deleted_counts_as_deleted(
        driver: LibvirtDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """delete_vm of a VM that another client removes between the lookup and the undefine
    succeeds (a missing VM's delete does): the reconciler's removal of a leftover VM, met
    by such a race, failed its whole pass."""
    name = f"deleting-{uuid.uuid4().hex[:8]}"
    _define(driver._conn, name)
    dom = driver._conn.lookupByName(name)

    def found_then_gone(vm_id: uuid.UUID) -> Any:
        driver._conn.lookupByName(name).undefine()  # the other client wins the race
        return dom

    monkeypatch.setattr(driver, "_own_domain", found_then_gone)
    driver.delete_vm(uuid.UUID(dom.UUIDString()))
    assert name not in {vm.name for vm in driver.list_vms()}


def test_a_vm_started_meanwhile_by_another_client_counts_as_started(
        driver: LibvirtDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker SIGKILLed while libvirtd starts a VM leaves that start going on; the next
    broker's start_vm found the VM off, then met 'domain is already running' and failed the
    desktop (bench/r1_kill.py). Running is what it asked for."""
    name = f"starting-{uuid.uuid4().hex[:8]}"
    _define(driver._conn, name)
    dom = driver._conn.lookupByName(name)

    class SeenOffThenStarted:
        """The domain as the broker saw it just before the other client's start landed."""

        def __init__(self) -> None:
            self.looked = False

        def isActive(self) -> bool:
            if not self.looked:
                self.looked = True
                dom.create()  # the other client's start lands now
                return False
            return bool(dom.isActive())

        def __getattr__(self, attr: str) -> Any:
            return getattr(dom, attr)

    monkeypatch.setattr(driver, "_own_domain", lambda vm_id: SeenOffThenStarted())
    try:
        driver.start_vm(uuid.UUID(dom.UUIDString()))
        assert dom.isActive()
    finally:
        dom.destroy()
        dom.undefine()
