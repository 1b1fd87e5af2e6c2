"""Instant clones on libvirt: many running VMs restored from one saved memory state.

A mixin of ``LibvirtDriver``, split from ``driver.py`` by responsibility; it uses the driver's
lock, lookups, volumes and error translation.

``capture_memory_state`` unplugs the template's NIC, then saves the template with
``virDomainSave`` into a volume and keeps its root volume. A clone is then:

1. a qcow2 overlay on that root volume (the saved memory belongs to that disk);
2. a copy of the save file whose *embedded* XML names the clone (name, UUID, disk, metadata):
   ``virDomainRestoreFlags`` refuses a changed name or UUID in its ``dxml`` argument, so the
   file itself is rewritten (``save_image.py``) and restored without one;
3. ``defineXML`` of the restored (transient) domain, so it is persistent like any desktop;
4. a NIC with the clone's MAC plugged in. A restored guest keeps the MAC it was saved with
   whatever the XML says, so the MAC cannot be changed in the file; the template's NIC is
   unplugged once, before the save, rather than in every clone: no clone ever shows the
   template's MAC on the network, none waits for its guest to release a NIC, and the new
   NIC takes the free name ``eth0`` (the guest's network configuration names it). A saved
   state that still has a NIC (its guest did not let go of it) gets it unplugged per clone;
5. (the guest clock stays stale: the caller sets it with the identity, see base.py).

Measured on libvirt 9.0 / QEMU 7.2 under TCG: a restore takes ~0.7 s and its guest agent
answers ~0.8 s after the call for one clone, 2-7 s each for six at once on two cores.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import AbstractContextManager, suppress
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import libvirt

from deskpool.domain.errors import (
    Conflict,
    DriverError,
    NotFound,
)
from deskpool.domain.models import CloneMode, VmRecord, VmSpec
from deskpool.drivers.base import (
    check_instant_spec,
    memory_state_volume_name,
    owned_volume_names,
    root_volume_name,
    seed_volume_name,
)
from deskpool.drivers.libvirt import xml
from deskpool.drivers.libvirt.save_image import (
    read_save_image,
    retarget_domain_xml,
    write_save_image_clone,
)

_BOTH = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
_DEFINITION_FLAGS = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
# The restored agent answers within a second (facts file); a busy host gets a few more.


class InstantClonesMixin:
    if TYPE_CHECKING:  # provided by LibvirtDriver
        uri: str
        _lock: threading.RLock
        _is_test: bool

        @property
        def _conn(self) -> libvirt.virConnect: ...
        @property
        def _pool(self) -> libvirt.virStoragePool: ...
        def _own_domain(self, vm_id: uuid.UUID) -> libvirt.virDomain: ...
        def _translate(self, what: str) -> AbstractContextManager[None]: ...
        def _volume(self, name: str) -> libvirt.virStorageVol | None: ...
        def _refuse_duplicate(self, spec: VmSpec) -> None: ...
        def _create_root_volume(self, spec: VmSpec, base: libvirt.virStorageVol) -> str: ...
        def _remove_leftovers(self, vm_id: uuid.UUID) -> None: ...
        def _undefine(self, dom: libvirt.virDomain) -> None: ...
        def _record(self, dom: libvirt.virDomain) -> VmRecord: ...
        def delete_volume(self, name: str) -> None: ...
        def agent_command(
            self, vm_id: uuid.UUID, command: str, arguments: dict[str, Any] | None = None,
            timeout_s: int = 5,
        ) -> Any: ...

    def _instant_unsupported(self) -> str | None:
        """Why this host cannot make instant clones, or None."""
        if self._is_test:
            return "it keeps volumes as metadata only and cannot restore a changed definition"
        if urlparse(self.uri).hostname:
            # save_image.py rewrites the memory file in place on this machine's file system.
            return "its storage is on another machine"
        return None

    # --- capture -------------------------------------------------------------------------------

    def capture_memory_state(self, vm_id: uuid.UUID) -> tuple[str, str]:
        with self._lock:
            dom = self._own_domain(vm_id)
            name = dom.name()
            with self._translate(f"reading VM {name}"):
                running = dom.state(0)[0] == libvirt.VIR_DOMAIN_RUNNING
            if not running:
                raise Conflict(f"VM {name} is not running: only a running VM's memory can be "
                               "captured")
            if self._volume(seed_volume_name(vm_id)) is not None:
                raise Conflict(f"VM {name} has a seed volume: instant clones of it would all "
                               "need that one volume")
            if self._is_test:
                raise DriverError(f"capturing a memory state is not supported by this "
                                  f"hypervisor ({self.uri}): its storage cannot hold the file")
            disk, memory = root_volume_name(vm_id), memory_state_volume_name(vm_id)
            self.delete_volume(memory)  # an earlier capture's, or the VM's own instant copy
            with self._translate(f"unplugging the NIC of VM {name}"):
                unplugged = self._unplug_nics(dom, keep_mac=None)
            try:
                vol = self._new_file_volume(memory)
                with self._translate(f"saving the memory of VM {name}"):
                    dom.save(vol.path())  # QEMU exits; libvirt resumes the VM if this fails
            except BaseException:
                with suppress(DriverError):
                    self.delete_volume(memory)
                for element in unplugged:  # the VM runs on: give its network back
                    with suppress(libvirt.libvirtError):
                        dom.attachDeviceFlags(element, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                raise
            # The volumes stay: they are the instant clones' disk and memory from now on.
            with self._translate(f"undefining captured VM {name}"):
                self._undefine(dom)
            return disk, memory

    def _new_file_volume(self, name: str) -> libvirt.virStorageVol:
        """An empty volume whose file deskpool (or libvirt's save) then writes whole."""
        definition = xml.VolumeDefinition(name=name, capacity_bytes=0, format="raw")
        with self._translate(f"creating volume {name}"):
            return self._pool.createXML(definition.to_xml(), 0)

    # --- clone ---------------------------------------------------------------------------------

    def _create_instant(self, spec: VmSpec) -> VmRecord:
        memory_volume = check_instant_spec(spec)
        why_not = self._instant_unsupported()
        if why_not is not None:
            raise DriverError(f"instant clones are not supported by this hypervisor "
                              f"({self.uri}): {why_not}")
        with self._lock:
            self._refuse_duplicate(spec)
            for leftover in owned_volume_names(spec.vm_id):  # a crash's: no VM owns them
                self.delete_volume(leftover)
            base = self._volume(spec.base_volume)
            if base is None:
                raise NotFound(f"base volume {spec.base_volume} is not on host {self.uri}")
            memory = self._volume(memory_volume)
            if memory is None:
                raise NotFound(f"memory state volume {spec.memory_state_volume} is not on host "
                               f"{self.uri}")
            try:
                dom = self._restore_clone(spec, base, memory)
            except BaseException:
                self._remove_leftovers(spec.vm_id)
                raise
        # The VM exists now; outside the lock, since unplugging a NIC waits for the guest.
        try:
            self._swap_nic(dom, spec)
        except BaseException:
            with self._lock:
                self._remove_leftovers(spec.vm_id)
            raise
        with self._lock, self._translate(f"reading VM {spec.name}"):
            return self._record(dom)

    def _restore_clone(
        self, spec: VmSpec, base: libvirt.virStorageVol, memory: libvirt.virStorageVol
    ) -> libvirt.virDomain:
        with self._translate(f"reading volumes for instant clone {spec.name}"):
            root_path = self._create_root_volume(replace(spec, clone_mode=CloneMode.LINKED), base)
            source = Path(memory.path())
        saved = read_save_image(source)
        domain_xml = retarget_domain_xml(
            saved.domain_xml, name=spec.name, uuid=spec.vm_id, disk_path=root_path
        )
        domain_xml = xml.replace_metadata(domain_xml, spec.metadata)
        if spec.reboot_ends_vm:
            domain_xml = xml.replace_on_reboot(domain_xml, "destroy")
        copy = self._new_file_volume(memory_state_volume_name(spec.vm_id))
        with self._translate(f"reading volume {memory_state_volume_name(spec.vm_id)}"):
            target = Path(copy.path())
        write_save_image_clone(source, target, domain_xml)
        with self._translate(f"restoring instant clone {spec.name}"):
            self._conn.restoreFlags(str(target), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)
            dom = self._conn.lookupByUUIDString(str(spec.vm_id))
            # Restored domains are transient: define it so it outlives its QEMU process.
            definition = dom.XMLDesc(_DEFINITION_FLAGS)
            if spec.identity_text is not None:  # for its next cold boot, not the running guest
                definition = xml.replace_fwcfg_identity(definition, spec.identity_text)
            self._conn.defineXML(definition)
        return dom

    def _swap_nic(self, dom: libvirt.virDomain, spec: VmSpec) -> None:
        new_nic = xml.NetworkInterface(mac=spec.mac, network=spec.network)
        with self._translate(f"giving instant clone {spec.name} its own NIC"):
            self._unplug_nics(dom, keep_mac=spec.mac.lower(), flags=_BOTH)
            if spec.mac.lower() not in {mac for mac, _ in xml.parse_interfaces(dom.XMLDesc(0))}:
                dom.attachDeviceFlags(new_nic.to_xml(), _BOTH)

    @staticmethod
    def _unplug_nics(
        dom: libvirt.virDomain, keep_mac: str | None,
        flags: int = libvirt.VIR_DOMAIN_AFFECT_LIVE,
    ) -> list[str]:
        """Unplug every NIC but ``keep_mac``'s; returns their XML. Synchronous: libvirt waits
        (up to 5 s) for the guest to release each; a guest that does not (no OS) keeps it
        until it stops."""
        unplugged = []
        for mac, element in xml.parse_interfaces(dom.XMLDesc(0)):
            if mac != keep_mac:
                dom.detachDeviceFlags(element, flags)
                unplugged.append(element)
        return unplugged

