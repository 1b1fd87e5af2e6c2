"""Fake hosts that share their storage, as libvirt hosts whose storage pools are one shared
directory (NFS, CephFS...): HA restart of a lost host's VMs on another host.

Hosts whose URIs carry the same ``shared_storage=NAME`` see one set of volumes. The disk lock
QEMU takes on an image it runs is modelled by the VMs themselves: a VM active on any host of
the group holds its root volume, whether or not that host's daemon answers (a QEMU that
outlived its libvirtd), so a restart elsewhere is refused with ``DiskInUse`` as on a real host.
A guest's ``files`` stand for its disk and go with the restart.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from typing import TYPE_CHECKING

from deskpool.domain.errors import Conflict, DiskInUse, InvalidInput, NotFound
from deskpool.domain.models import CloneMode, PowerState, StopReason, VmRecord, VmSpec
from deskpool.drivers.base import root_volume_name, seed_volume_name
from deskpool.drivers.fake.faults import FAULT_POINTS
from deskpool.drivers.fake.saved_state import ACTIVE_STATES
from deskpool.drivers.fake.state import FakeVm, FakeVolume, check_definition, read_source

FAULT_POINTS.update({"restart_on_shared_storage", "forget_vm"})

_registry_lock = threading.Lock()
# One volume table per shared storage, and the hosts that mount it.
_volumes: dict[str, dict[str, FakeVolume]] = {}
_hosts: dict[str, weakref.WeakSet[FakeSharedStorageMixin]] = {}


def shared_volumes(name: str, host: FakeSharedStorageMixin) -> dict[str, FakeVolume]:
    """The volume table of shared storage ``name``, ``host`` joining its hosts."""
    with _registry_lock:
        _hosts.setdefault(name, weakref.WeakSet()).add(host)
        return _volumes.setdefault(name, {})


def forget_shared_storage() -> None:
    """Tests: every shared storage emptied with the fake hosts."""
    with _registry_lock:
        _volumes.clear()
        _hosts.clear()


class FakeSharedStorageMixin:
    if TYPE_CHECKING:  # provided by FakeDriver
        uri: str
        _lock: threading.RLock
        _vms: dict[uuid.UUID, FakeVm]
        _volumes: dict[str, FakeVolume]
        shared_storage: str | None
        _reachable: bool

        def _check_usable(self) -> None: ...
        def _maybe_fail(self, point: str) -> None: ...
        def _own_vm(self, vm_id: uuid.UUID) -> FakeVm: ...
        def _refuse_duplicate(self, vm_id: uuid.UUID, name: str) -> None: ...
        def _add_volume(self, name: str, capacity: int, allocation: int,
                        backing: str | None = None) -> FakeVolume: ...
        def _power_on(self, vm: FakeVm) -> None: ...
        def _power_off(self, vm: FakeVm, state: PowerState,
                       reason: StopReason = StopReason.OTHER) -> None: ...
        def _check_disks(self, spec: VmSpec) -> None: ...

    # --- test control ---------------------------------------------------------------------

    def lose_power(self) -> None:
        """The host is lost whole (power cut, panic): every QEMU process of it is gone, its
        disk locks with them, and it does not answer until ``set_reachable(True)``, then
        reading its VMs off for no known reason, as a rebooted host does."""
        with self._lock:
            for vm in self._vms.values():
                if vm.power in ACTIVE_STATES:
                    self._power_off(vm, PowerState.SHUTOFF, StopReason.UNKNOWN)
            self._reachable = False

    # --- the contract ---------------------------------------------------------------------

    def restart_on_shared_storage(self, spec: VmSpec) -> VmRecord:
        with self._lock:
            self._check_usable()
            self._maybe_fail("restart_on_shared_storage")
            if spec.clone_mode is CloneMode.INSTANT:
                raise InvalidInput(f"VM {spec.name} is an instant clone: it refers to its "
                                   "host's memory state and cannot be restarted elsewhere")
            root = root_volume_name(spec.vm_id)
            if root not in self._volumes:
                raise NotFound(f"disk {root} of VM {spec.name} is not in the storage of "
                               f"{self.uri}: it is not shared with the VM's host")
            self._refuse_duplicate(spec.vm_id, spec.name)
            check_definition(spec)
            holder = self._disk_holder(spec.vm_id)
            if holder is not None:
                raise DiskInUse(f"starting VM {spec.name} on {self.uri} failed: its disk "
                                f"{root} is locked by a running QEMU (of {holder.uri})")
            seed = seed_volume_name(spec.vm_id)
            if spec.seed_image is not None and seed not in self._volumes:
                size, capacity, _ = read_source(spec.seed_image)
                self._add_volume(seed, capacity, size)
            vm = FakeVm(vm_id=spec.vm_id, spec=spec, name=spec.name,
                        files=self._disk_files(spec.vm_id))
            self._check_disks(spec)
            self._vms[spec.vm_id] = vm
            self._power_on(vm)
            return vm.record()

    def forget_vm(self, vm_id: uuid.UUID) -> None:
        with self._lock:
            self._check_usable()
            self._maybe_fail("forget_vm")
            if vm_id not in self._vms:
                return
            vm = self._own_vm(vm_id)
            if vm.power in ACTIVE_STATES:
                raise Conflict(f"VM {vm.name} runs on {self.uri}: only a VM that is off "
                               "can be forgotten")
            del self._vms[vm_id]

    # --- internals ------------------------------------------------------------------------

    def _peers(self) -> list[FakeSharedStorageMixin]:
        if self.shared_storage is None:
            return []
        with _registry_lock:
            return [h for h in _hosts.get(self.shared_storage, ()) if h is not self]

    def _disk_holder(self, vm_id: uuid.UUID) -> FakeSharedStorageMixin | None:
        """The host whose QEMU holds the VM's disk (its image lock), if any."""
        for peer in self._peers():
            vm = peer._vms.get(vm_id)
            if vm is not None and vm.power in ACTIVE_STATES:
                return peer
        return None

    def _disk_files(self, vm_id: uuid.UUID) -> dict[str, bytes]:
        """What the guest wrote to its disk, as its last host's definition holds it (the
        fake keeps a guest's files with its VM, not in the volume); ``/run`` is memory."""
        for peer in self._peers():
            vm = peer._vms.get(vm_id)
            if vm is not None:
                return {p: b for p, b in vm.files.items() if not p.startswith("/run/")}
        return {}
