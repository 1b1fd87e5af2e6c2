"""An in-memory hypervisor that behaves like a real one, for tests (after Nova's virt/fake.py).

It is strict rather than lenient: every point of the ``base.py`` contract holds here exactly as
on libvirt, and where a real host would refuse (a name with '/', a full disk, a deleted backing
file at start) the fake refuses too, so code that passes against it also works on a real host.

Semantics worth knowing when writing tests against it:

* A VM "boots a guest" only when its spec carries ``identity_text``: the guest agent then answers
  (after ``agent_delay_polls`` silent calls, the boot time) and its files hold the identity the
  real guest hook writes. Without ``identity_text`` the VM is a disk with no OS: it runs, its
  agent never answers and it ignores a graceful stop (as SeaBIOS does with an empty disk).
* A graceful ``stop_vm`` is asynchronous, as on a real host: the VM still reports running on the
  first ``get_vm``/``list_vms`` after the request and is shut off from the second one on.
* ``fail_next`` arms one failure for the next call of a method, or of a step inside
  ``create_vm`` (see ``FAULT_POINTS`` in ``fake_faults.py``), to prove callers and rollbacks
  handle it.
* Saved guest state: the guest's ``files`` stand for its disk, and those under ``/run/`` for
  its memory (a tmpfs, emptied at boot). A snapshot copies the files and the power state, a
  managed save (``suspend_vm``) keeps them while the VM is off, a captured memory state keeps
  them for instant clones; each restore brings back a guest whose agent answers at once, with
  the boot hook not run again and a stale clock (``guest_clock_stale``). The guest's files
  are written with ``guest-file-open``/``guest-file-write`` or ``guest-exec`` of
  ``sh -c 'echo TEXT > PATH'`` (the only shell command it knows).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import deque
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from deskpool.domain.errors import (
    AgentUnavailable,
    ChecksumMismatch,
    Conflict,
    DriverError,
    InvalidInput,
    NotFound,
    VmNotFound,
)
from deskpool.domain.models import (
    CloneMode,
    ConsoleAddress,
    ConsoleProtocol,
    DomainType,
    HostCapacity,
    PowerState,
    StopReason,
    VmRecord,
    VmSpec,
    VolumeInfo,
)
from deskpool.drivers.base import (
    HypervisorDriver,
    owned_volume_names,
    root_volume_name,
    seed_volume_name,
    validate_disk_serial,
)
from deskpool.drivers.fake.faults import FaultInjectionMixin, api
from deskpool.drivers.fake.guest import FakeGuest
from deskpool.drivers.fake.load import FakeLoadMixin
from deskpool.drivers.fake.migration import FakeMigrationMixin
from deskpool.drivers.fake.saved_state import ACTIVE_STATES, FakeSavedStateMixin
from deskpool.drivers.fake.shared import FakeSharedStorageMixin, shared_volumes
from deskpool.drivers.fake.state import (
    FakeShape,
    FakeVm,
    FakeVolume,
    SavedGuest,
    check_definition,
    read_source,
)
from deskpool.drivers.fake.volume_copy import FakeVolumeCopyMixin

GiB = 1024**3
_QCOW2_MAGIC = b"QFI\xfb"
# What `qemu-img create -b base` writes for an empty qcow2 overlay.
_OVERLAY_ALLOCATION = 196_608
_FIRST_VNC_PORT = 5900
_FIRST_RDP_PORT = 33900  # the RDP ports forwarded to the guests
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


class FakeDriver(FaultInjectionMixin, FakeSavedStateMixin, FakeMigrationMixin, FakeLoadMixin,
                 FakeSharedStorageMixin, FakeVolumeCopyMixin, HypervisorDriver):
    """One fake host. Thread-safe (one lock), unlike real drivers, so tests may share it."""

    def __init__(
        self,
        uri: str = "fake://local",
        *,
        # A big server by default, so tests and benchmarks of thousands of desktops fit on
        # one fake host; the URI's query shapes smaller ones.
        vcpus: int = 512,
        memory_mib: int = 1024 * 1024,
        storage_bytes: int = 10 * 1024 * GiB,
        domain_types: tuple[str, ...] = ("qemu",),
        agent_delay_polls: int = 0,
    ) -> None:
        shape = FakeShape.parse(uri, vcpus=vcpus, memory_mib=memory_mib,
                                storage_bytes=storage_bytes,
                                agent_delay_polls=agent_delay_polls)
        vcpus, memory_mib, storage_bytes = shape.vcpus, shape.memory_mib, shape.storage_bytes
        agent_delay_polls = shape.agent_delay_polls
        self._hypervisor, self._arch, self._cpu_model = (shape.hypervisor, shape.arch,
                                                         shape.cpu_model)
        self.uri = uri
        self._host = urlparse(uri).netloc or "default"
        self._vcpus = vcpus
        self._memory_mib = memory_mib
        self._storage_bytes = storage_bytes
        self._domain_types = tuple(domain_types)
        self.agent_delay_polls = agent_delay_polls
        self._lock = threading.RLock()
        self.shared_storage = shape.shared_storage or None
        self._volumes: dict[str, FakeVolume] = (
            shared_volumes(self.shared_storage, self) if self.shared_storage else {})
        self._vms: dict[uuid.UUID, FakeVm] = {}
        # Captured memory states (and instant clones' copies), by volume name: what the file
        # would hold. The template's spec comes along: it is the definition inside the file.
        self._memory_states: dict[str, tuple[VmSpec, SavedGuest]] = {}
        self._faults: dict[str, deque[Exception]] = {}
        self._closed = False
        self._reachable = True

    # --- test controls ------------------------------------------------------------------

    def set_power_state(self, vm_id: uuid.UUID, state: PowerState) -> None:
        """Change a VM's power state behind deskpool's back (a crash, an admin's virsh...)."""
        with self._lock:
            vm = self._vm(vm_id)
            if state is PowerState.SAVED:
                if vm.power in ACTIVE_STATES:
                    self._save(vm)
            elif state in ACTIVE_STATES:
                if vm.power not in ACTIVE_STATES:
                    self._power_on(vm)
                vm.power = state
            else:
                reason = StopReason.CRASHED if state is PowerState.CRASHED else StopReason.OTHER
                self._power_off(vm, state, reason)

    def crash_vm(self, vm_id: uuid.UUID, reason: StopReason = StopReason.CRASHED) -> None:
        """Its QEMU process dies (SIGKILL, an abort): the VM reads shut off with ``reason``,
        as libvirt reports a QEMU that ended without being asked to."""
        with self._lock:
            vm = self._vm(vm_id)
            if vm.power not in ACTIVE_STATES:
                raise InvalidInput(f"VM {vm.name} is not running; nothing to crash")
            self._power_off(vm, PowerState.SHUTOFF, reason)

    def reboot_guest(self, vm_id: uuid.UUID) -> None:
        """The guest reboots itself (its user's menu, ``reboot``): a VM made with
        ``reboot_ends_vm`` goes off as from a shutdown inside; any other boots again at once
        on the same disk, its files kept, its sessions gone."""
        with self._lock:
            vm = self._vm(vm_id)
            if vm.power not in ACTIVE_STATES:
                raise InvalidInput(f"VM {vm.name} is not running; nothing to reboot")
            if vm.spec is not None and vm.spec.reboot_ends_vm:
                self._power_off(vm, PowerState.SHUTOFF, StopReason.SHUTDOWN)
            elif vm.spec is not None and vm.spec.identity_text is not None:
                # The same QEMU process (its displays and plugged disks stay), a new boot.
                vm.guest = FakeGuest.boot(vm.spec, vm.files, self.agent_delay_polls)

    def remove_vm_behind_our_back(self, vm_id: uuid.UUID) -> None:
        """Undefine a VM as an admin would with virsh: its volumes stay."""
        with self._lock:
            self._power_off(self._vm(vm_id), PowerState.SHUTOFF)
            del self._vms[vm_id]

    def add_foreign_vm(
        self, name: str, *, power_state: PowerState = PowerState.SHUTOFF,
        vm_id: uuid.UUID | None = None,
    ) -> uuid.UUID:
        """Define a VM that deskpool did not make (no metadata); returns its id."""
        with self._lock:
            vm_id = vm_id or uuid.uuid4()
            self._refuse_duplicate(vm_id, name)
            self._vms[vm_id] = FakeVm(vm_id=vm_id, spec=None, name=name)
            self.set_power_state(vm_id, power_state)
            return vm_id

    def defined_spec(self, vm_id: uuid.UUID) -> VmSpec | None:
        """The spec a VM was created from (None for a foreign VM); lets tests check inputs.
        An instant clone's is the template's with the clone's id, name, disk, MAC and
        metadata: what its libvirt definition would hold."""
        with self._lock:
            return self._vm(vm_id).spec

    def guest_clock_stale(self, vm_id: uuid.UUID) -> bool:
        """Whether the running guest was restored from saved memory and its clock not set
        since (``guest-set-time``). False when no guest OS runs."""
        with self._lock:
            guest = self._vm(vm_id).guest
            return guest is not None and guest.clock_stale

    def guest_session(self, vm_id: uuid.UUID, user: str | None, *,
                      idle_minutes: int = 0) -> None:
        """A user logs in to the running guest's desktop (``None``: logs out) and has been
        idle ``idle_minutes``, as ``guest-get-users`` and ``who -u`` will then report."""
        with self._lock:
            guest = self._vm(vm_id).guest
            if guest is None:
                raise DriverError(f"VM {vm_id} runs no guest OS")
            guest.users = [] if user is None else [user]
            guest.idle_minutes = idle_minutes

    def guest_holds_disks(self, vm_id: uuid.UUID, hold: bool = True) -> None:
        """The guest ignores (``hold``) or honours disk unplug requests, as a hung or busy
        guest OS would."""
        with self._lock:
            self._vm(vm_id).holds_disks = hold

    # --- host ---------------------------------------------------------------------------

    @api
    def capacity(self) -> HostCapacity:
        return HostCapacity(
            hypervisor=self._hypervisor,
            vcpus=self._vcpus,
            memory_mib=self._memory_mib,
            storage_free_bytes=self._free_bytes(),
            domain_types=self._domain_types,
            arch=self._arch,
            cpu_model=self._cpu_model,
        )

    def probe_kvm_boots(self, kernel: Path) -> bool:
        # The fake "has" working KVM exactly when it offers it.
        return DomainType.KVM.value in self._domain_types

    # --- storage ------------------------------------------------------------------------

    @api
    def import_volume(self, name: str, source: Path, sha256: str | None = None) -> VolumeInfo:
        existing = self._volumes.get(name)
        if existing is not None:
            if existing.allocation == _file_size(source) or not source.is_file():
                if sha256 is not None and existing.sha256 not in (None, sha256.lower()):
                    raise ChecksumMismatch(  # template images are immutable: only checked
                        f"volume {name} on {self.uri} is corrupt: its checksum is "
                        f"{existing.sha256}, expected {sha256}")
                return existing.info()
            self._drop_volume(name)  # an import cut short (as on libvirt): made again
        size, capacity, digest = read_source(source)
        if sha256 is not None and digest != sha256.lower():
            raise ChecksumMismatch(
                f"checksum of {source} is {digest}, expected {sha256}: volume not imported"
            )
        volume = self._add_volume(name, capacity=capacity, allocation=size)
        volume.sha256 = digest
        volume.source = str(source)
        return volume.info()

    def tamper_volume(self, name: str) -> None:
        """Test control: bytes of a volume change behind the driver's back (a bad disk)."""
        with self._lock:
            volume = self._volume(name)
            volume.sha256 = "0" * 64 if volume.sha256 != "0" * 64 else "1" * 64

    @api
    def volume_info(self, name: str) -> VolumeInfo:
        return self._volume(name).info()

    @api
    def list_volumes(self) -> list[str]:
        return sorted(self._volumes)

    @api
    def delete_volume(self, name: str) -> None:
        # As in a libvirt dir pool, a volume in use (or backing another) can be deleted; the
        # VMs using it then fail to start.
        self._drop_volume(name)

    # --- VMs ----------------------------------------------------------------------------

    @api
    def create_vm(self, spec: VmSpec) -> VmRecord:
        if spec.clone_mode is CloneMode.INSTANT:
            return self._create_instant(spec)
        self._refuse_duplicate(spec.vm_id, spec.name)
        base = self._volume(spec.base_volume, f"base volume {spec.base_volume}")
        if spec.direct_boot is not None:
            self._volume(spec.direct_boot.kernel_volume, "kernel volume")
            self._volume(spec.direct_boot.initrd_volume, "initrd volume")
        if spec.layer_volume is not None:
            self._volume(spec.layer_volume, "user layer volume")
        if spec.layer_base_volume is not None:
            self._volume(spec.layer_base_volume, "user layer's base volume")
        spec = replace(spec, domain_type=self._resolve_type(spec.domain_type))
        for leftover in owned_volume_names(spec.vm_id):  # a crash's leftovers: no VM owns them
            self._drop_volume(leftover)
        try:
            self._maybe_fail("create_vm.root_volume")
            name = root_volume_name(spec.vm_id)
            if spec.clone_mode is CloneMode.LINKED:
                self._add_overlay(name, base)
            else:
                self._add_volume(name, base.capacity, base.allocation)
            if spec.seed_image is not None:
                self._maybe_fail("create_vm.seed_volume")
                size, capacity, _ = read_source(spec.seed_image)
                self._add_volume(seed_volume_name(spec.vm_id), capacity, size)
            self._maybe_fail("create_vm.define")
            check_definition(spec)
        except BaseException:
            # Like the libvirt driver: whatever the VM would own goes, leftovers included.
            for owned in owned_volume_names(spec.vm_id):
                self._drop_volume(owned)
            raise
        vm = FakeVm(vm_id=spec.vm_id, spec=spec, name=spec.name)
        self._vms[spec.vm_id] = vm
        return vm.record()

    @api
    def start_vm(self, vm_id: uuid.UUID) -> None:
        vm = self._own_vm(vm_id)
        if vm.power is PowerState.PAUSED:
            vm.power = PowerState.RUNNING  # resumed
            return
        if vm.power in ACTIVE_STATES:
            return
        if vm.spec is not None:
            self._check_disks(vm.spec)
        if vm.saved is not None:
            saved, vm.saved = vm.saved, None
            self._restore(vm, replace(saved, power=PowerState.RUNNING))
            return
        self._power_on(vm)

    @api
    def stop_vm(self, vm_id: uuid.UUID, *, force: bool = False) -> None:
        vm = self._own_vm(vm_id)
        if vm.power not in ACTIVE_STATES:
            return
        if force:
            self._power_off(vm, PowerState.SHUTOFF, StopReason.DESTROYED)
        elif vm.guest is not None and vm.power is PowerState.RUNNING and vm.shutdown_in is None:
            vm.shutdown_in = 1  # the guest's OS shuts down shortly, not during this call
        # else: no OS (or a paused one) to act on the ACPI request, so nothing happens.

    # --- hot-plugged disks ----------------------------------------------------------------

    @api
    def attach_disk(self, vm_id: uuid.UUID, path: Path, serial: str) -> None:
        validate_disk_serial(serial)
        vm = self._own_vm(vm_id)
        if not Path(path).is_file():
            raise NotFound(f"disk file {path} does not exist on {self.uri}")
        if vm.power not in ACTIVE_STATES:
            raise DriverError(f"attaching disk {serial} to VM {vm.name} failed: it is not "
                              "running (disks are hot-plugged into running VMs only)")
        if serial in vm.disks:
            raise Conflict(f"VM {vm.name} already has a disk with serial {serial}")
        vm.disks[serial] = str(path)

    @api
    def detach_disk(self, vm_id: uuid.UUID, serial: str, *, timeout_s: float = 10.0) -> None:
        vm = self._own_vm(vm_id)
        if serial not in vm.disks:
            return
        # PCI hot-unplug needs a guest OS that answers; the fake does not wait it out.
        if vm.guest is None or vm.holds_disks or vm.power is not PowerState.RUNNING:
            raise DriverError(f"the guest of VM {vm.name} did not release disk {serial} "
                              f"within {timeout_s:g} s; power it off to release it")
        del vm.disks[serial]

    @api
    def attached_disks(self, vm_id: uuid.UUID) -> dict[str, str]:
        return dict(self._vm(vm_id).disks)

    @api
    def delete_vm(self, vm_id: uuid.UUID) -> None:
        if vm_id in self._vms:
            self._own_vm(vm_id)
        vm = self._vms.pop(vm_id, None)
        if vm is not None:
            self._power_off(vm, PowerState.SHUTOFF)
        for name in owned_volume_names(vm_id):
            self._drop_volume(name)

    @api
    def get_vm(self, vm_id: uuid.UUID) -> VmRecord:
        vm = self._vm(vm_id)
        self._observe(vm)
        return vm.record()

    @api
    def list_vms(self) -> list[VmRecord]:
        for vm in self._vms.values():
            self._observe(vm)
        return [vm.record() for vm in sorted(self._vms.values(), key=lambda v: v.name)]

    @api
    def console_address(
        self, vm_id: uuid.UUID, protocol: ConsoleProtocol = ConsoleProtocol.VNC,
    ) -> ConsoleAddress:
        vm = self._vm(vm_id)
        if vm.vnc_port is None:
            raise DriverError(f"VM {vm_id} has no {protocol.value.upper()} console now "
                              f"(it is {vm.power.value})")
        listen = vm.spec.vnc_listen if vm.spec is not None else "127.0.0.1"
        # As QEMU does with autoport: the SPICE display takes the port after the VNC one.
        port = vm.vnc_port + (1 if protocol is ConsoleProtocol.SPICE else 0)
        if protocol is ConsoleProtocol.RDP:  # a forwarded port of its own, one per VM
            port = _FIRST_RDP_PORT + (vm.vnc_port - _FIRST_VNC_PORT) // 2
        return ConsoleAddress(protocol=protocol.value, host=listen, port=port)

    @api
    def set_console_password(
        self, vm_id: uuid.UUID, protocol: ConsoleProtocol, password: str, valid_until: datetime,
    ) -> None:
        vm = self._vm(vm_id)
        if vm.vnc_port is None:
            raise DriverError(f"VM {vm_id} is not running: its display has no password to set")
        vm.console_passwords[protocol] = (password, valid_until)

    def console_password(self, vm_id: uuid.UUID,
                         protocol: ConsoleProtocol) -> tuple[str, datetime] | None:
        """Tests: the display password last set, with its expiry (None: never set)."""
        return self._vm(vm_id).console_passwords.get(protocol)

    @api
    def agent_command(
        self, vm_id: uuid.UUID, command: str, arguments: dict[str, Any] | None = None,
        timeout_s: int = 5,
    ) -> Any:
        vm = self._vm(vm_id)
        if vm.power is not PowerState.RUNNING:
            raise AgentUnavailable(
                f"guest agent of VM {vm_id} not available: the VM is {vm.power.value}"
            )
        if vm.guest is None or vm.shutdown_in is not None:
            raise AgentUnavailable(
                f"guest agent of VM {vm_id} not available: QEMU guest agent is not connected"
            )
        return vm.guest.execute(command, arguments or {})

    def close(self) -> None:
        with self._lock:
            self._closed = True

    # --- internals ----------------------------------------------------------------------

    def _vm(self, vm_id: uuid.UUID) -> FakeVm:
        try:
            return self._vms[vm_id]
        except KeyError:
            raise VmNotFound(f"no VM with id {vm_id} on {self.uri}") from None

    def _own_vm(self, vm_id: uuid.UUID) -> FakeVm:
        vm = self._vm(vm_id)
        if vm.spec is None:
            raise Conflict(f"VM {vm.name} ({vm_id}) was not created by deskpool; "
                           "deskpool leaves it alone")
        return vm

    def _volume(self, name: str, what: str | None = None) -> FakeVolume:
        try:
            return self._volumes[name]
        except KeyError:
            raise NotFound(f"{what or 'volume ' + name} is not on host {self.uri}") from None

    def _refuse_duplicate(self, vm_id: uuid.UUID, name: str) -> None:
        for vm in self._vms.values():
            if vm.vm_id == vm_id or vm.name == name:
                raise Conflict(f"a VM with id {vm_id} or name {name!r} exists on {self.uri}")

    def _resolve_type(self, requested: DomainType) -> DomainType:
        if requested is DomainType.AUTO:
            raise InvalidInput("create_vm needs a resolved domain type, not 'auto'")
        if requested.value not in self._domain_types:
            raise InvalidInput(
                f"host {self.uri} does not offer domain type {requested.value!r} "
                f"(it offers: {', '.join(self._domain_types) or 'none'})"
            )
        return requested

    def _add_volume(
        self, name: str, capacity: int, allocation: int, backing: str | None = None
    ) -> FakeVolume:
        if not name or "/" in name:
            raise DriverError(f"volume name {name!r} is empty or contains '/'")
        if name in self._volumes:
            raise DriverError(f"storage volume {name!r} exists already on {self.uri}")
        if allocation > self._free_bytes():
            raise DriverError(f"no space left on {self.uri} for volume {name}")
        volume = FakeVolume(name, f"/fake/{self._host}/{name}", capacity, allocation, backing)
        self._volumes[name] = volume
        return volume

    def _add_overlay(self, name: str, base: FakeVolume) -> FakeVolume:
        """An empty qcow2 overlay backed by ``base``."""
        return self._add_volume(name, base.capacity, _OVERLAY_ALLOCATION, backing=base.path)

    def _free_bytes(self) -> int:
        return self._storage_bytes - sum(v.allocation for v in self._volumes.values())

    def _drop_volume(self, name: str) -> None:
        self._volumes.pop(name, None)
        self._memory_states.pop(name, None)

    def _check_disks(self, spec: VmSpec) -> None:
        """QEMU opens every disk (and backing file) at start; a missing one fails the start."""
        needed = [root_volume_name(spec.vm_id)]
        if spec.seed_image is not None:
            needed.append(seed_volume_name(spec.vm_id))
        if spec.direct_boot is not None:
            needed += [spec.direct_boot.kernel_volume, spec.direct_boot.initrd_volume]
        needed += [v for v in (spec.layer_volume, spec.layer_base_volume) if v is not None]
        paths = {v.path for v in self._volumes.values()}
        for name in needed:
            volume = self._volumes.get(name)
            if volume is None or (volume.backing is not None and volume.backing not in paths):
                raise DriverError(
                    f"starting VM {spec.name} failed on {self.uri}: cannot open disk {name} "
                    "or its backing file"
                )

    def _next_vnc_port(self) -> int:
        used = {v.vnc_port for v in self._vms.values()}
        return next(p for p in range(_FIRST_VNC_PORT, 65536, 2) if p not in used)

    def _power_on(self, vm: FakeVm) -> None:
        vm.vnc_port = self._next_vnc_port()
        vm.power = PowerState.RUNNING
        vm.shutdown_in = None
        if vm.spec is not None and vm.spec.identity_text is not None:
            vm.guest = FakeGuest.boot(vm.spec, vm.files, self.agent_delay_polls)

    def _power_off(self, vm: FakeVm, state: PowerState,
                   reason: StopReason = StopReason.OTHER) -> None:
        vm.power, vm.vnc_port, vm.guest, vm.shutdown_in = state, None, None, None
        vm.stop_reason = reason
        vm.cpu_time_ns = 0  # counted again by its next QEMU process
        vm.disks.clear()  # hot-plugged disks live as long as the VM's process
        vm.console_passwords.clear()  # a display's password lives as long as its QEMU
        vm.saved = None

    def _save(self, vm: FakeVm) -> None:
        """Managed save: the QEMU process ends, the guest's memory (its files) is kept."""
        saved = SavedGuest(vm.power, dict(vm.files), vm.guest is not None)
        self._power_off(vm, PowerState.SAVED)
        vm.saved = saved

    def _restore(self, vm: FakeVm, state: SavedGuest) -> None:
        """A QEMU process resumes the saved guest: no boot, its agent answers at once."""
        used = {v.vnc_port for v in self._vms.values()}
        vm.vnc_port = next(p for p in range(_FIRST_VNC_PORT, 65536, 2) if p not in used)
        vm.power, vm.shutdown_in, vm.saved = state.power, None, None
        vm.files = dict(state.files)
        vm.guest = None
        if state.had_guest and vm.spec is not None:
            vm.guest = FakeGuest.restore(vm.spec, vm.files)

    def _observe(self, vm: FakeVm) -> None:
        """A graceful shutdown completes one observation after it was requested."""
        if vm.shutdown_in is None:
            return
        if vm.shutdown_in == 0:
            self._power_off(vm, PowerState.SHUTOFF, StopReason.SHUTDOWN)
        else:
            vm.shutdown_in -= 1


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
