"""HA restart on libvirt: a lost host's VM defined and started here over the disk it left on
storage both hosts mount (a ``dir`` pool on NFS, CephFS, GlusterFS...), and the lost host's
stale definition forgotten once it answers again.

The fence is QEMU's own image locking: a QEMU that opens a disk for writing takes a lock on
it (OFD locks, which shared file systems that carry POSIX locks, NFSv4 among them, honour
between hosts). While the old QEMU lives, wherever it runs, the new one fails to start with
"Failed to get "write" lock", and nothing is left defined here. A mixin of ``LibvirtDriver``.
"""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import libvirt

from deskpool.domain.errors import (
    Conflict,
    DiskInUse,
    DriverError,
    InvalidInput,
    NotFound,
    VmNotFound,
)
from deskpool.domain.models import CloneMode, DomainType, PowerState, VmRecord, VmSpec
from deskpool.drivers.base import root_volume_name, seed_volume_name
from deskpool.drivers.libvirt.connection import error_code

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from deskpool.domain.models import VolumeInfo
    from deskpool.drivers.libvirt import xml

# QEMU's words when another process holds an image's lock.
_LOCKED = re.compile(r'Failed to get "\w+" lock|another process using the image', re.I)


class SharedRestartMixin:
    if TYPE_CHECKING:  # provided by LibvirtDriver
        uri: str
        _lock: threading.RLock
        _is_test: bool

        @property
        def _conn(self) -> libvirt.virConnect: ...
        def _translate(self, what: str) -> AbstractContextManager[None]: ...
        def _failure(self, what: str, exc: libvirt.libvirtError) -> DriverError: ...
        def _volume(self, name: str) -> libvirt.virStorageVol | None: ...
        def _refresh_pool(self) -> None: ...
        def _refuse_duplicate(self, spec: VmSpec) -> None: ...
        def _own_domain(self, vm_id: uuid.UUID) -> libvirt.virDomain: ...
        def _undefine(self, dom: libvirt.virDomain) -> None: ...
        def _definition(self, spec: VmSpec, root: str,
                        seed: str | None) -> xml.DomainDefinition: ...
        def import_volume(self, name: str, source: Path,
                          sha256: str | None = None) -> VolumeInfo: ...

    def restart_on_shared_storage(self, spec: VmSpec) -> VmRecord:
        if self._is_test:
            raise DriverError(f"restarting on shared storage is not supported by {self.uri}: "
                              "its test driver takes no disk locks to fence with")
        if spec.clone_mode is CloneMode.INSTANT:
            raise InvalidInput(f"VM {spec.name} is an instant clone: it refers to its host's "
                               "memory state and cannot be restarted elsewhere")
        if spec.domain_type is DomainType.AUTO:
            raise InvalidInput("restart_on_shared_storage needs a resolved domain type")
        with self._lock:
            self._refresh_pool()  # files another host wrote into the shared directory
            root = self._volume(root_volume_name(spec.vm_id))
            if root is None:
                raise NotFound(f"disk {root_volume_name(spec.vm_id)} of VM {spec.name} is not "
                               f"in the storage of {self.uri}: it is not shared with the VM's "
                               "host")
            self._refuse_duplicate(spec)
            seed = None
            if spec.seed_image is not None:
                found = self._volume(seed_volume_name(spec.vm_id))
                seed = (str(found.path()) if found is not None else
                        self.import_volume(seed_volume_name(spec.vm_id), spec.seed_image).path)
            definition = self._definition(spec, str(root.path()), seed)
            with self._translate(f"defining VM {spec.name}"):
                dom = self._conn.defineXML(definition.to_xml())
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                self._undefine_keeping_disks(dom)
                message = exc.get_error_message()
                if _LOCKED.search(message):
                    raise DiskInUse(f"starting VM {spec.name} on {self.uri} failed: its disk is "
                                    f"locked by another QEMU process ({message})") from exc
                raise self._failure(f"starting VM {spec.name}", exc) from exc
            return VmRecord(vm_id=spec.vm_id, name=spec.name, power_state=PowerState.RUNNING,
                            metadata=spec.metadata)

    def forget_vm(self, vm_id: uuid.UUID) -> None:
        with self._lock:
            try:
                dom = self._own_domain(vm_id)
            except VmNotFound:
                return
            with self._translate(f"forgetting VM {vm_id}"):
                if dom.isActive():
                    raise Conflict(f"VM {dom.name()} runs on {self.uri}: only a VM that is off "
                                   "can be forgotten")
                try:
                    self._undefine(dom)
                except libvirt.libvirtError as exc:
                    if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:  # gone meanwhile
                        raise

    def _undefine_keeping_disks(self, dom: libvirt.virDomain) -> None:
        try:
            self._undefine(dom)
        except libvirt.libvirtError as exc:
            raise self._failure("removing the definition of a VM that did not start",
                                exc) from exc
