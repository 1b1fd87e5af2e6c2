"""Hot-plugged disks on libvirt: a user's profile layer, plugged in for their session.

A mixin of ``LibvirtDriver`` (as ``snapshots.py``), using its lock, lookups and error
translation. Disks are attached with ``VIR_DOMAIN_AFFECT_LIVE`` only: the definition never
names a session layer, so a VM that restarts after a crash does not open (and write) a layer
the broker has set aside meanwhile. Detaching a virtio disk is a PCI hot-unplug the guest
must answer; libvirt's ``detachDeviceFlags`` returns after a few seconds whether or not it
did, so the driver then watches the live definition until the disk is gone.
"""

from __future__ import annotations

import threading
import time
import uuid
import xml.etree.ElementTree as ET
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import libvirt

from deskpool.domain.errors import Conflict, DriverError, NotFound
from deskpool.domain.models import LAYER_BASE_SERIAL, USER_LAYER_SERIAL
from deskpool.drivers.base import validate_disk_serial
from deskpool.drivers.libvirt import xml

_POLL_S = 0.2


# The domain XML parsed here (`nosec B314`) is libvirt's own answer (virDomainGetXMLDesc) for a
# domain deskpool defined, not input from a user or a guest.


def _serial_disks(domain_xml: str) -> dict[str, ET.Element]:
    """The disks of a domain document that have a serial (deskpool's hot-plugged ones; a
    user layer disk has one too, but it is the VM's own, in its definition)."""
    found: dict[str, ET.Element] = {}
    for disk in ET.fromstring(domain_xml).findall("./devices/disk"):  # nosec B314
        serial = disk.findtext("serial")
        if serial and serial not in (USER_LAYER_SERIAL, LAYER_BASE_SERIAL):
            found[serial] = disk
    return found


def _free_target(domain_xml: str) -> str:
    used = {target.get("dev") for target in ET.fromstring(domain_xml).findall(  # nosec B314
        "./devices/disk/target")}
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if f"vd{letter}" not in used:
            return f"vd{letter}"
    raise DriverError("no free virtio disk name left (vdb-vdz all taken)")


class HotplugMixin:
    if TYPE_CHECKING:  # provided by LibvirtDriver
        uri: str
        _lock: threading.RLock
        _is_test: bool

        def _own_domain(self, vm_id: uuid.UUID) -> libvirt.virDomain: ...
        def _domain(self, vm_id: uuid.UUID) -> libvirt.virDomain: ...
        def _translate(self, what: str) -> AbstractContextManager[None]: ...

    def attach_disk(self, vm_id: uuid.UUID, path: Path, serial: str) -> None:
        validate_disk_serial(serial)
        with self._lock:
            dom = self._own_domain(vm_id)
            name = dom.name()
            if self._is_test:
                raise DriverError(f"attaching a disk to VM {name} is not supported by this "
                                  f"hypervisor ({self.uri} cannot change a live VM)")
            # Only a host on this machine can be asked about its files beforehand.
            if not urlparse(self.uri).hostname and not Path(path).is_file():
                raise NotFound(f"disk file {path} does not exist on {self.uri}")
            with self._translate(f"reading VM {name}"):
                if not dom.isActive():
                    raise DriverError(f"attaching disk {serial} to VM {name} failed: it is not "
                                      "running (disks are hot-plugged into running VMs only)")
                live = dom.XMLDesc(0)
            if serial in _serial_disks(live):
                raise Conflict(f"VM {name} already has a disk with serial {serial}")
            device = xml.DiskDevice(path=str(path), target=_free_target(live), serial=serial)
            with self._translate(f"attaching disk {serial} to VM {name}"):
                dom.attachDeviceFlags(device.to_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def detach_disk(self, vm_id: uuid.UUID, serial: str, *, timeout_s: float = 10.0) -> None:
        with self._lock:
            dom = self._own_domain(vm_id)
            name = dom.name()
            with self._translate(f"reading VM {name}"):
                if not dom.isActive():
                    return  # live-only disks went with the VM's process
                disk = _serial_disks(dom.XMLDesc(0)).get(serial)
            if disk is None:
                return
            with self._translate(f"detaching disk {serial} from VM {name}"):
                dom.detachDeviceFlags(ET.tostring(disk, encoding="unicode"),
                                      libvirt.VIR_DOMAIN_AFFECT_LIVE)
        deadline = time.monotonic() + timeout_s
        while True:
            # Outside the lock: other VMs of this host need not wait for this guest.
            if serial not in self.attached_disks(vm_id):
                return
            if time.monotonic() >= deadline:
                raise DriverError(f"the guest of VM {name} did not release disk {serial} "
                                  f"within {timeout_s:g} s; power it off to release it")
            time.sleep(_POLL_S)

    def attached_disks(self, vm_id: uuid.UUID) -> dict[str, str]:
        with self._lock:
            dom = self._domain(vm_id)
            with self._translate(f"reading VM {vm_id}"):
                if not dom.isActive():
                    return {}
                live = dom.XMLDesc(0)
        found: dict[str, str] = {}
        for serial, disk in _serial_disks(live).items():
            source = disk.find("source")
            found[serial] = "" if source is None else source.get("file", "")
        return found
