"""Live migration between two libvirt hosts, with the VM's own disk copied as it runs.

A mixin of ``LibvirtDriver`` (as ``snapshots.py`` and ``instant.py`` are): the source driver
drives it, the target driver makes the disk on its host. libvirt's client-driven migration
(``migrate3`` without peer-to-peer) needs no host to reach the other's daemon, only their QEMU
processes to reach each other (the migration stream and the disk copy's NBD server).

* **Only the overlay crosses.** A linked clone's root is a qcow2 overlay on the template's
  disk, which the caller has copied to the target already (as for any clone there). The
  target gets a new overlay of the same name on its own copy, and ``VIR_MIGRATE_NON_SHARED_INC``
  mirrors only the top of the chain into it.
* **The target's paths.** Each host keeps volumes in its own directory: the definition sent
  along (``VIR_MIGRATE_PARAM_DEST_XML``) names the target's root, kernel and initrd files.
* **The user's SPICE client follows.** QEMU tells a connected SPICE client the display's
  address on the target (libvirt's graphics relocation), and the client links its channels
  there with the password it holds. That password may have expired on this host (it is a
  ticket's, minutes old; connected clients are kept): the target's copy stays valid for the
  move only, and is expired again once the move is done.
* **A failure moves nothing.** Until libvirt's finish step the VM runs here; if the
  migration fails, times out or is cancelled, libvirt resumes it here and this driver
  removes what it made on the target. On success the source's definition (libvirt's
  ``UNDEFINE_SOURCE``) and its volumes go.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt

from deskpool.domain.errors import Conflict, DriverError, HostConnectionLost, InvalidInput
from deskpool.domain.models import CloneMode, MigrationStats, VolumeInfo
from deskpool.drivers.base import HypervisorDriver, root_volume_name
from deskpool.drivers.libvirt.connection import error_code
from deskpool.drivers.libvirt.xml import graphics_with_password

_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
          | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_NON_SHARED_INC)
_XML_FLAGS = libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_MIGRATABLE
_POLL_S = 0.2
log = logging.getLogger(__name__)
MigrationProgress = Callable[[int, int], None]  # (bytes processed, bytes in all) so far


def _no_progress(_done: int, _total: int) -> None:
    return None



def target_definition(domain_xml: str, paths: dict[str, str],
                      spice_valid_to: str | None = None) -> str:
    """The definition for the target: each file ``paths`` names (a disk's source, a kernel,
    an initrd) replaced by the target's, and a SPICE password that expires valid until
    ``spice_valid_to`` there. Everything else (name, uuid, MAC, metadata, fw_cfg identity,
    the display passwords themselves) stays as it is."""
    root = ET.fromstring(domain_xml)  # nosec B314
    spice = root.find("devices/graphics[@type='spice']")
    if spice_valid_to is not None and spice is not None and spice.get("passwdValidTo"):
        spice.set("passwdValidTo", spice_valid_to)
    for source in root.iterfind("devices/disk/source"):
        found = source.get("file")
        if found in paths:
            source.set("file", paths[found])
    for tag in ("kernel", "initrd"):
        element = root.find(f"os/{tag}")
        if element is not None and element.text in paths:
            element.text = paths[element.text]
    return ET.tostring(root, encoding="unicode")


class MigrationMixin:
    if TYPE_CHECKING:  # provided by LibvirtDriver
        uri: str
        _lock: threading.RLock
        _is_test: bool

        @property
        def _conn(self) -> libvirt.virConnect: ...
        def _own_domain(self, vm_id: uuid.UUID) -> libvirt.virDomain: ...
        def _translate(self, what: str) -> AbstractContextManager[None]: ...
        def _alive(self) -> bool: ...
        def volume_info(self, name: str) -> VolumeInfo: ...
        def delete_vm(self, vm_id: uuid.UUID) -> None: ...
        def attached_disks(self, vm_id: uuid.UUID) -> dict[str, str]: ...
        def clone_volume(self, base_volume: str, name: str, mode: CloneMode) -> None: ...

    def migrate_vm(self, vm_id: uuid.UUID, target: HypervisorDriver, *, base_volume: str,
                   timeout_s: float = 600.0,
                   progress: MigrationProgress | None = None) -> MigrationStats:
        peer = self._migration_peer(target)
        with self._lock:
            dom = self._own_domain(vm_id)
            name = dom.name()
            device = self._check_movable(dom, vm_id)
            with self._translate(f"reading VM {name}'s definition"):
                domain_xml = dom.XMLDesc(_XML_FLAGS)
        root = root_volume_name(vm_id)
        boot_files = [e.text for e in ET.fromstring(domain_xml).iterfind("os/*")  # nosec B314
                      if e.tag in ("kernel", "initrd") and e.text]
        peer.delete_vm(vm_id)  # an earlier attempt's leftovers (its root volume) go first
        try:
            peer.clone_volume(base_volume, root, CloneMode.LINKED)
            paths = {self.volume_info(root).path: peer.volume_info(root).path}
            for path in boot_files:
                paths[path] = peer.volume_info(Path(path).name).path
            # Valid for the move's longest time (and a margin for the client to link).
            until = datetime.now(UTC) + timedelta(seconds=timeout_s + 120)
            definition = target_definition(domain_xml, paths,
                                           until.strftime("%Y-%m-%dT%H:%M:%S"))
            stats = self._run_migration(dom, name, peer, definition, device, timeout_s,
                                        progress or _no_progress)
        except BaseException:
            peer.delete_vm(vm_id)  # nothing of it stays on the target; it runs here
            raise
        self.delete_vm(vm_id)  # undefined by libvirt already: its volumes here go
        peer._expire_spice_password(vm_id, domain_xml)
        return stats

    def _expire_spice_password(self, vm_id: uuid.UUID, source_xml: str) -> None:
        """The moved VM's SPICE password back to the expiry it had on the source (connected
        clients stay). A failure leaves it to expire at the move's own limit."""
        spice = ET.fromstring(source_xml).find("devices/graphics[@type='spice']")  # nosec B314
        valid_to = spice.get("passwdValidTo") if spice is not None else None
        if spice is None or not valid_to or not spice.get("passwd"):
            return
        try:
            with self._lock:
                dom = self._own_domain(vm_id)
                changed = graphics_with_password(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE),
                                                 "spice", spice.get("passwd", ""), valid_to)
                if changed is not None:
                    dom.updateDeviceFlags(changed, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except (libvirt.libvirtError, DriverError) as exc:
            log.warning("the SPICE password of moved VM %s stays valid until the move's "
                        "limit: %s", vm_id, exc)

    def _migration_peer(self, target: HypervisorDriver) -> MigrationMixin:
        if self._is_test or not isinstance(target, MigrationMixin) or target._is_test:
            raise DriverError(f"live migration from {self.uri} is not supported by this "
                              "hypervisor")
        if target is self or target.uri == self.uri:
            raise InvalidInput(f"a VM cannot be migrated to its own host ({self.uri})")
        return target

    def _check_movable(self, dom: libvirt.virDomain, vm_id: uuid.UUID) -> str:
        """The root disk's target device; refused before anything starts, with why
        (libvirt's own refusals come later and say less)."""
        name = dom.name()
        with self._translate(f"checking VM {name} before migrating it"):
            if not dom.isActive():
                raise Conflict(f"VM {name} is not running: only a running VM moves live")
            if dom.snapshotNum(0):
                raise Conflict(f"VM {name} has snapshots (a factory snapshot): libvirt "
                               "cannot migrate them")
            live = ET.fromstring(dom.XMLDesc(0))  # nosec B314
        plugged = sorted(self.attached_disks(vm_id))
        if plugged:
            raise Conflict(f"VM {name} has hot-plugged disks ({', '.join(plugged)}): they "
                           "would not follow it")
        root_path = self.volume_info(root_volume_name(vm_id)).path
        devices: dict[str, str] = {}
        for disk in live.iterfind("devices/disk"):
            source, target = disk.find("source"), disk.find("target")
            if source is not None and target is not None:
                devices[source.get("file", "")] = target.get("dev", "")
        if list(devices) != [root_path]:
            raise Conflict(f"VM {name} has disks besides its root volume "
                           f"({sorted(set(devices) - {root_path})}): only a clone's root "
                           "moves")
        return devices[root_path]

    def _run_migration(self, dom: libvirt.virDomain, name: str, peer: MigrationMixin,
                       definition: str, device: str, timeout_s: float,
                       progress: MigrationProgress) -> MigrationStats:
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: definition,
                                  libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: [device]}
        outcome: dict[str, Any] = {}

        def migrate() -> None:
            try:
                outcome["domain"] = dom.migrate3(peer._conn, params, _FLAGS)
            except libvirt.libvirtError as exc:
                outcome["error"] = exc

        started = time.monotonic()
        disk_seen = 0  # the source's figure while it ran: the target's final one lacks it
        worker = threading.Thread(target=migrate, name=f"migrate-{name}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(_POLL_S)
            if time.monotonic() - started > timeout_s:
                self._abort(dom, name)
                worker.join()
                raise DriverError(f"migrating VM {name} took over {timeout_s:.0f} s: "
                                  "cancelled, it runs on where it was")
            disk_seen = max(disk_seen, self._report(dom, progress))
        if "error" in outcome and not self._alive():
            # The source's daemon drives the move: it may have finished without us.
            raise HostConnectionLost(f"the connection to {self.uri} was lost while VM {name} "
                                     f"moved to {peer.uri}; where it runs is unknown: "
                                     f"{outcome['error']}")
        if "error" in outcome:
            raise DriverError(f"migrating VM {name} from {self.uri} to {peer.uri} failed, it "
                              f"runs on where it was: {outcome['error']}")
        moved: libvirt.virDomain = outcome["domain"]
        with peer._translate(f"reading VM {name}'s migration statistics"):
            done = moved.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        return MigrationStats(
            seconds=time.monotonic() - started,
            memory_bytes=int(done.get("memory_processed", 0)),
            disk_bytes=max(int(done.get("disk_processed", 0)), disk_seen),
            downtime_ms=int(done["downtime"]) if "downtime" in done else None)

    @staticmethod
    def _report(dom: libvirt.virDomain, progress: MigrationProgress) -> int:
        """Progress so far; returns the disk bytes copied so far (the disk goes first)."""
        try:
            stats = dom.jobStats(0)
        except libvirt.libvirtError:
            return 0  # the job is ending (or not begun): the next look tells
        progress(int(stats.get("data_processed", 0)), int(stats.get("data_total", 0)))
        return int(stats.get("disk_processed", 0))

    def _abort(self, dom: libvirt.virDomain, name: str) -> None:
        try:
            dom.abortJob()
        except libvirt.libvirtError as exc:
            if error_code(exc) != libvirt.VIR_ERR_OPERATION_INVALID:  # no job: it ended meanwhile
                raise DriverError(f"cancelling VM {name}'s migration failed: {exc}") from exc
