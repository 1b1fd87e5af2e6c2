"""Live migration between two fake hosts, as ``libvirt/migration.py`` does between libvirt
hosts: the guest (its processes, sessions and files) carries on on the target, over a new
overlay on the target's copy of the base; a failure leaves it running where it was.

Two failures part way, as on real hosts:

- The target runs out of memory: once the disk has crossed, the guest's memory must fit in
  what the target has free (its own use, ``set_host_load``, and its running VMs' taken
  off): if not, the target's QEMU fails and the VM runs on here, nothing left there.
- The connection to this host is lost while the move runs (a test calls
  ``set_reachable(False)`` from ``progress``): this host's daemon drives the move and
  finishes it, but the caller only hears ``HostConnectionLost``; the VM runs on the
  target, once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from deskpool.domain.errors import Conflict, DriverError, HostConnectionLost, InvalidInput
from deskpool.domain.models import MigrationStats
from deskpool.drivers.base import HypervisorDriver, owned_volume_names, root_volume_name
from deskpool.drivers.fake.faults import FAULT_POINTS
from deskpool.drivers.fake.load import vm_memory_mib
from deskpool.drivers.fake.saved_state import ACTIVE_STATES
from deskpool.drivers.fake.state import FakeVm, FakeVolume

MiB = 1024**2
FAULT_POINTS.update({"migrate_vm", "migrate_vm.transfer"})  # .transfer: after the overlay


class FakeMigrationMixin:
    if TYPE_CHECKING:  # provided by FakeDriver
        uri: str
        _lock: threading.RLock
        _vms: dict[uuid.UUID, FakeVm]
        _volumes: dict[str, FakeVolume]
        _reachable: bool

        def _check_usable(self) -> None: ...
        def _maybe_fail(self, point: str) -> None: ...
        def _own_vm(self, vm_id: uuid.UUID) -> FakeVm: ...
        def _volume(self, name: str, what: str | None = None) -> FakeVolume: ...
        def _add_overlay(self, name: str, base: FakeVolume) -> FakeVolume: ...
        def _drop_volume(self, name: str) -> None: ...
        def _next_vnc_port(self) -> int: ...
        def _memory_free_mib(self) -> float: ...

    def migrate_vm(self, vm_id: uuid.UUID, target: HypervisorDriver, *, base_volume: str,
                   timeout_s: float = 600.0,
                   progress: Callable[[int, int], None] | None = None) -> MigrationStats:
        if not isinstance(target, FakeMigrationMixin):
            raise DriverError(f"live migration from {self.uri} to a {type(target).__name__} "
                              "is not supported")
        if target is self or target.uri == self.uri:
            raise InvalidInput(f"a VM cannot be migrated to its own host ({self.uri})")
        # Both hosts' locks, in one order whichever way the VM goes.
        first, second = sorted((self, target), key=lambda d: d.uri)
        with first._lock, second._lock:
            self._check_usable()
            target._check_usable()
            self._maybe_fail("migrate_vm")
            vm = self._own_vm(vm_id)
            assert vm.spec is not None  # own VMs have one
            self._check_movable(vm)
            root = root_volume_name(vm_id)
            moved = target._add_overlay(root, target._volume(base_volume,
                                                             f"base volume {base_volume}"))
            try:
                self._maybe_fail("migrate_vm.transfer")
            except BaseException:
                target._drop_volume(root)
                raise
            overlay = self._volumes[root]
            moved.allocation = overlay.allocation
            memory = vm.spec.memory_mib * MiB
            free = target._memory_free_mib()  # the disk has crossed; now the memory
            if vm_memory_mib(vm) > free:
                target._drop_volume(root)
                raise DriverError(
                    f"host {target.uri} ran out of memory during the live migration of VM "
                    f"{vm.name}: it needs {vm_memory_mib(vm):.0f} MiB, {free:.0f} MiB are "
                    f"free there; the VM runs on at {self.uri}")
            if progress is not None:
                progress(memory + overlay.allocation, memory + overlay.allocation)
            vm.spec = replace(vm.spec, base_volume=base_volume)
            vm.vnc_port = target._next_vnc_port()
            vm.cpu_time_ns = 0  # a new QEMU process on the target counts afresh
            del self._vms[vm_id]
            target._vms[vm_id] = vm
            for name in owned_volume_names(vm_id):
                self._drop_volume(name)
            if not self._reachable:  # lost while it ran: the move went on without the caller
                raise HostConnectionLost(f"the connection to {self.uri} was lost while VM "
                                         f"{vm.name} moved to {target.uri}")
        return MigrationStats(seconds=0.0, memory_bytes=memory, disk_bytes=overlay.allocation,
                              downtime_ms=0)

    @staticmethod
    def _check_movable(vm: FakeVm) -> None:
        if vm.power not in ACTIVE_STATES:
            raise Conflict(f"VM {vm.name} is not running: only a running VM moves live")
        if vm.snapshots:
            raise Conflict(f"VM {vm.name} has snapshots (a factory snapshot): libvirt cannot "
                           "migrate them")
        if vm.disks:
            raise Conflict(f"VM {vm.name} has hot-plugged disks ({', '.join(sorted(vm.disks))})"
                           ": they would not follow it")
        if vm.spec is not None and vm.spec.seed_image is not None:
            raise Conflict(f"VM {vm.name} has disks besides its root volume (its seed image): "
                           "only a clone's root moves")
