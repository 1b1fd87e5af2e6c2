"""The fake hypervisor's saved guest state: managed save, snapshots, instant clones."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

from deskpool.domain.errors import Conflict, DriverError, InvalidInput, NotFound
from deskpool.domain.models import (
    CloneMode,
    DomainType,
    PowerState,
    StopReason,
    VmRecord,
    VmSpec,
)
from deskpool.drivers.base import (
    check_instant_spec,
    memory_state_volume_name,
    owned_volume_names,
    root_volume_name,
    validate_snapshot_name,
)
from deskpool.drivers.fake.faults import api
from deskpool.drivers.fake.guest import FakeGuest
from deskpool.drivers.fake.state import FakeVm, FakeVolume, SavedGuest, check_definition

# States in which a QEMU process exists (libvirt's "active" domains).
ACTIVE_STATES = frozenset({PowerState.RUNNING, PowerState.PAUSED, PowerState.SUSPENDED})
# What a saved memory state's file takes per MiB of guest memory (a booted guest's dirty pages).
_SAVE_BYTES_PER_MIB = 256 * 1024


class FakeSavedStateMixin:
    """A mixin of ``FakeDriver`` (as ``libvirt/snapshots.py`` and ``instant.py`` are of
    ``LibvirtDriver``); it uses the driver's lock, records, volumes and power changes."""

    if TYPE_CHECKING:  # provided by FakeDriver
        uri: str
        _lock: threading.RLock
        _vms: dict[uuid.UUID, FakeVm]
        _memory_states: dict[str, tuple[VmSpec, SavedGuest]]

        def _check_usable(self) -> None: ...
        def _maybe_fail(self, point: str) -> None: ...
        def _vm(self, vm_id: uuid.UUID) -> FakeVm: ...
        def _own_vm(self, vm_id: uuid.UUID) -> FakeVm: ...
        def _volume(self, name: str, what: str | None = None) -> FakeVolume: ...
        def _refuse_duplicate(self, vm_id: uuid.UUID, name: str) -> None: ...
        def _add_volume(self, name: str, capacity: int, allocation: int,
                        backing: str | None = None) -> FakeVolume: ...
        def _add_overlay(self, name: str, base: FakeVolume) -> FakeVolume: ...
        def _drop_volume(self, name: str) -> None: ...
        def _check_disks(self, spec: VmSpec) -> None: ...
        def _power_off(self, vm: FakeVm, state: PowerState,
                       reason: StopReason = ...) -> None: ...
        def _save(self, vm: FakeVm) -> None: ...
        def _restore(self, vm: FakeVm, state: SavedGuest) -> None: ...

    # --- managed save -------------------------------------------------------------------

    @api
    def suspend_vm(self, vm_id: uuid.UUID) -> None:
        vm = self._own_vm(vm_id)
        if vm.power is PowerState.SUSPENDED:
            # libvirt refuses too: a guest in PM suspend cannot be migrated to a file.
            raise DriverError(f"saving VM {vm.name} failed on {self.uri}: domain is "
                              "pmsuspended")
        if vm.power in ACTIVE_STATES:
            self._save(vm)

    # --- snapshots ----------------------------------------------------------------------

    @api
    def create_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        validate_snapshot_name(name)
        vm = self._own_vm(vm_id)
        if name in vm.snapshots:
            raise Conflict(f"VM {vm.name} has a snapshot named {name!r} already")
        if vm.power is PowerState.SAVED:
            raise Conflict(f"VM {vm.name} is saved: its memory is not in its disk; start it "
                           "before taking a snapshot")
        power = vm.power if vm.power in ACTIVE_STATES else PowerState.SHUTOFF
        vm.snapshots[name] = SavedGuest(power, dict(vm.files), vm.guest is not None)

    @api
    def revert_to_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        vm = self._own_vm(vm_id)
        snapshot = vm.snapshots.get(name)
        if snapshot is None:
            raise NotFound(f"VM {vm.name} has no snapshot named {name!r}")
        self._power_off(vm, PowerState.SHUTOFF)  # discards a managed save too
        vm.files = dict(snapshot.files)
        if snapshot.power in ACTIVE_STATES:
            self._restore(vm, snapshot)

    @api
    def list_snapshots(self, vm_id: uuid.UUID) -> list[str]:
        return sorted(self._vm(vm_id).snapshots)

    @api
    def delete_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        self._own_vm(vm_id).snapshots.pop(name, None)

    # --- instant clones -----------------------------------------------------------------

    @api
    def capture_memory_state(self, vm_id: uuid.UUID) -> tuple[str, str]:
        vm = self._own_vm(vm_id)
        assert vm.spec is not None  # _own_vm: deskpool's VMs have one
        if vm.power is not PowerState.RUNNING:
            raise Conflict(f"VM {vm.name} is {vm.power.value}: only a running VM's memory "
                           "can be captured")
        if vm.spec.seed_image is not None:
            raise Conflict(f"VM {vm.name} has a seed volume: instant clones of it would all "
                           "need that one volume")
        disk, memory = root_volume_name(vm_id), memory_state_volume_name(vm_id)
        self._drop_volume(memory)  # an earlier capture's, or the VM's own as an instant clone
        self._add_volume(memory, vm.spec.memory_mib * 1024 * 1024,
                         vm.spec.memory_mib * _SAVE_BYTES_PER_MIB)
        state = SavedGuest(PowerState.RUNNING, dict(vm.files), vm.guest is not None)
        self._memory_states[memory] = (vm.spec, state)
        self._power_off(vm, PowerState.SHUTOFF)
        del self._vms[vm_id]
        return disk, memory

    def _create_instant(self, spec: VmSpec) -> VmRecord:
        memory_volume = check_instant_spec(spec)
        if spec.domain_type is DomainType.AUTO:  # checked as for any VM; the template's is used
            raise InvalidInput("create_vm needs a resolved domain type, not 'auto'")
        self._refuse_duplicate(spec.vm_id, spec.name)
        base = self._volume(spec.base_volume, f"base volume {spec.base_volume}")
        memory = self._volume(memory_volume, f"memory state volume {memory_volume}")
        for leftover in owned_volume_names(spec.vm_id):
            self._drop_volume(leftover)
        vm: FakeVm | None = None
        try:
            self._maybe_fail("create_vm.root_volume")
            self._add_overlay(root_volume_name(spec.vm_id), base)
            self._maybe_fail("create_vm.memory_volume")
            if memory.name not in self._memory_states:  # libvirt finds no save image header
                raise DriverError(f"volume {memory.name} on {self.uri} is not a saved memory "
                                  "state")
            template, state = self._memory_states[memory.name]
            # The definition inside the file, retargeted as the libvirt driver does.
            clone = replace(
                template, vm_id=spec.vm_id, name=spec.name, base_volume=spec.base_volume,
                clone_mode=CloneMode.INSTANT, metadata=spec.metadata,
                memory_state_volume=spec.memory_state_volume, seed_image=None,
                reboot_ends_vm=spec.reboot_ends_vm,
            )
            check_definition(clone)
            copy_name = memory_state_volume_name(spec.vm_id)
            self._add_volume(copy_name, memory.capacity, memory.allocation)
            self._memory_states[copy_name] = (clone, state)
            self._maybe_fail("create_vm.restore")
            self._check_disks(clone)
            vm = FakeVm(vm_id=spec.vm_id, spec=clone, name=spec.name, files=dict(state.files))
            self._vms[spec.vm_id] = vm
            self._restore(vm, state)
            self._maybe_fail("create_vm.nic_swap")
            # The NIC swapped; the identity, if given, for the next cold boot.
            defined = replace(clone, mac=spec.mac, network=spec.network,
                              identity_text=spec.identity_text or clone.identity_text)
            check_definition(defined)
            vm.spec = defined
            if vm.guest is not None:  # the swapped NIC; the clock stays stale
                vm.guest = FakeGuest.restore(vm.spec, vm.files)
        except BaseException:
            if vm is not None:
                self._power_off(vm, PowerState.SHUTOFF)
                self._vms.pop(spec.vm_id, None)
            for owned in owned_volume_names(spec.vm_id):
                self._drop_volume(owned)
            raise
        return vm.record()
