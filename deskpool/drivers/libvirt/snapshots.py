"""Saved guest state on libvirt: internal snapshots and managed save (the "suspend" policy).

A mixin of ``LibvirtDriver``, split from ``driver.py`` by responsibility; it uses the driver's
lock, lookups and error translation.

* Snapshots are libvirt's default kind for qcow2 disks: *internal*, kept inside the VM's root
  volume (QEMU ``savevm``, memory included when the VM runs), so they go with the volume and
  ``delete_vm`` needs nothing more than the snapshot-metadata flag it passes already. libvirt
  9.0 cannot revert to an external snapshot.
* Managed save writes the memory to a file libvirt owns; the domain is then shut off "with a
  managed save image", which ``LibvirtDriver`` reports as ``SAVED``, and ``dom.create()``
  restores it.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import libvirt

from deskpool.domain.errors import Conflict, NotFound
from deskpool.drivers.base import validate_snapshot_name
from deskpool.drivers.libvirt import xml
from deskpool.drivers.libvirt.connection import error_code


class SnapshotsMixin:
    if TYPE_CHECKING:  # provided by LibvirtDriver
        uri: str
        _lock: threading.RLock

        def _domain(self, vm_id: uuid.UUID) -> libvirt.virDomain: ...
        def _own_domain(self, vm_id: uuid.UUID) -> libvirt.virDomain: ...
        def _translate(self, what: str) -> AbstractContextManager[None]: ...

    # --- managed save ------------------------------------------------------------------------

    def suspend_vm(self, vm_id: uuid.UUID) -> None:
        with self._lock:
            dom = self._own_domain(vm_id)
            if not dom.isActive():  # off, or saved already
                return
            with self._translate(f"saving VM {dom.name()}"):
                dom.managedSave(0)

    # --- snapshots ---------------------------------------------------------------------------

    def create_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        validate_snapshot_name(name)
        with self._lock:
            dom = self._own_domain(vm_id)
            if self._snapshot(dom, name) is not None:
                raise Conflict(f"VM {dom.name()} has a snapshot named {name!r} already")
            with self._translate(f"checking VM {dom.name()} for a saved state"):
                saved = not dom.isActive() and dom.hasManagedSaveImage(0)
            if saved:
                # The memory is in the save file, not the disk: a snapshot now would pair the
                # disk with no memory, and libvirt would not refuse it.
                raise Conflict(f"VM {dom.name()} is saved: start it before taking a snapshot")
            with self._translate(f"taking snapshot {name} of VM {dom.name()}"):
                dom.snapshotCreateXML(xml.SnapshotDefinition(name).to_xml(), 0)

    def revert_to_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        with self._lock:
            dom = self._own_domain(vm_id)
            snapshot = self._snapshot(dom, name)
            if snapshot is None:
                raise NotFound(f"VM {dom.name()} has no snapshot named {name!r}")
            with self._translate(f"reverting VM {dom.name()} to snapshot {name}"):
                if dom.hasManagedSaveImage(0):
                    # libvirt (QEMU) keeps the save file across a revert; a later start would
                    # then restore that memory over the reverted disk.
                    dom.managedSaveRemove(0)
                dom.revertToSnapshot(snapshot, 0)

    def list_snapshots(self, vm_id: uuid.UUID) -> list[str]:
        with self._lock:
            dom = self._domain(vm_id)
            with self._translate(f"listing snapshots of VM {vm_id}"):
                return sorted(dom.snapshotListNames(0))

    def delete_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        with self._lock:
            dom = self._own_domain(vm_id)
            snapshot = self._snapshot(dom, name)
            if snapshot is None:
                return
            with self._translate(f"deleting snapshot {name} of VM {dom.name()}"):
                try:
                    snapshot.delete(0)
                except libvirt.libvirtError as exc:
                    if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                        raise

    def _snapshot(self, dom: libvirt.virDomain, name: str) -> libvirt.virDomainSnapshot | None:
        with self._translate(f"looking up snapshot {name} of VM {dom.name()}"):
            try:
                return dom.snapshotLookupByName(name, 0)
            except libvirt.libvirtError as exc:
                if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
                    return None
                raise
