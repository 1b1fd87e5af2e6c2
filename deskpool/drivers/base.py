"""The hypervisor driver contract.

Every driver (``fake``, ``libvirt`` on ``test:///`` and on ``qemu:///system``) implements this
class, and ``tests/contract/`` runs one test suite against all of them. The docstrings below are
the contract; where a driver cannot honour a point (``test:///`` has no guest agent) the contract
says what it must do instead.

Rules that hold for every method:

* **deskpool ids only.** VMs are addressed by ``vm_id``, deskpool's own UUID for the desktop.
  Hypervisor-internal ids (libvirt domain ids, UUIDs it would generate, paths it chose) never
  leave the driver; callers get ``VmRecord``/``VolumeInfo`` objects.
* **deskpool errors only.** Hypervisor exceptions are translated: a missing VM raises
  ``VmNotFound``, an unreachable or non-hypervisor URI raises ``HypervisorUnreachable``, a silent
  guest agent raises ``AgentUnavailable``, anything else ``DriverError`` with the hypervisor's
  message. No ``libvirt.libvirtError`` escapes.
* **Idempotent cleanup.** Deleting a VM or volume that does not exist succeeds.
* **No half-made VMs.** A ``create_vm`` that fails removes every volume and definition it made
  before raising, so the only outcomes are "VM fully defined" or "nothing there".
* **Findable after a crash.** Every VM created carries ``VmMetadata`` inside its definition, and
  ``list_vms`` returns it, so a restarted broker can match VMs to its database.
* **Hands off others' VMs.** ``list_vms`` reports VMs deskpool did not create (metadata None,
  ``vm_id`` their hypervisor UUID, since they have no deskpool id), but ``start_vm``,
  ``stop_vm`` and ``delete_vm`` refuse them with ``Conflict`` and change nothing.
* **Thread-safe.** One driver instance per host is shared by the threads of a process.
* **Deterministic volume names.** A VM's own volumes are named from its ``vm_id``
  (``<vm_id>-root.qcow2``, ``<vm_id>-seed.img``), so ``delete_vm`` can remove them even when the
  VM definition itself was never written (a crash between the two steps).
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from deskpool.domain.errors import InvalidInput
from deskpool.domain.models import (
    ConsoleAddress,
    DomainType,
    HostCapacity,
    VmRecord,
    VmSpec,
    VolumeInfo,
)


def root_volume_name(vm_id: uuid.UUID) -> str:
    return f"{vm_id}-root.qcow2"


def seed_volume_name(vm_id: uuid.UUID) -> str:
    return f"{vm_id}-seed.img"


def owned_volume_names(vm_id: uuid.UUID) -> tuple[str, ...]:
    """Every volume a VM may own; ``delete_vm`` removes all of them."""
    return (root_volume_name(vm_id), seed_volume_name(vm_id))


class HypervisorDriver(ABC):
    """One hypervisor host, reached at ``uri``."""

    uri: str

    # --- host ---------------------------------------------------------------------------

    @abstractmethod
    def capacity(self) -> HostCapacity:
        """The host's hypervisor type, vCPUs, memory, free storage and offered domain types."""

    def resolve_domain_type(self, requested: DomainType, kernel: Path | None) -> DomainType:
        """Turn a requested domain type into the one to use on this host.

        An explicit ``kvm`` or ``qemu`` is returned as is when the host offers it (else
        ``InvalidInput``). ``auto`` gives ``kvm`` only when the host offers it *and*
        ``probe_kvm_boots`` shows a guest kernel really boots under it, else ``qemu`` (TCG).
        """
        offered = self.capacity().domain_types
        if requested is not DomainType.AUTO:
            if requested.value not in offered:
                raise InvalidInput(
                    f"host {self.uri} does not offer domain type {requested.value!r} "
                    f"(it offers: {', '.join(offered) or 'none'})"
                )
            return requested
        if DomainType.KVM.value in offered and kernel is not None and self.probe_kvm_boots(kernel):
            return DomainType.KVM
        return DomainType.QEMU

    def probe_kvm_boots(self, kernel: Path) -> bool:
        """Whether ``kernel`` boots under KVM on this host. Drivers without KVM say False."""
        return False

    # --- storage: volumes in the host's own (local) storage -----------------------------

    @abstractmethod
    def import_volume(self, name: str, source: Path, sha256: str | None = None) -> VolumeInfo:
        """Copy a local file into the host's storage as volume ``name``.

        If a volume of that name exists already it is returned unchanged, without re-hashing
        (volumes holding template images are immutable and named per version). When ``sha256``
        is given the data sent is hashed and a mismatch removes the new volume and raises
        ``DriverError``. A missing ``source`` raises ``NotFound`` and creates nothing.
        """

    @abstractmethod
    def volume_info(self, name: str) -> VolumeInfo:
        """Facts about a volume; ``NotFound`` when there is none of that name."""

    @abstractmethod
    def list_volumes(self) -> list[str]:
        """Names of all volumes in the host's deskpool storage."""

    @abstractmethod
    def delete_volume(self, name: str) -> None:
        """Remove a volume. A missing volume is not an error."""

    # --- VMs ----------------------------------------------------------------------------

    @abstractmethod
    def create_vm(self, spec: VmSpec) -> VmRecord:
        """Create the VM's disk from ``spec.base_volume`` and define the VM, powered off.

        * ``CloneMode.LINKED``: the root volume is a qcow2 overlay backed by the base volume.
        * ``CloneMode.FULL``: the root volume is an independent copy of the base volume.
        * ``spec.seed_image`` (if set) is imported as the VM's seed volume, attached read-only.
        * ``spec.identity_text`` (if set) is handed to the guest at boot through fw_cfg under
          ``deskpool.domain.identity.FWCFG_KEY``.
        * The VM gets one NIC with ``spec.mac`` and a VNC console on ``spec.vnc_listen``.

        ``spec.domain_type`` must be resolved already (``resolve_domain_type``): ``auto`` is
        ``InvalidInput``. Volumes the id would own that exist without a VM (left by a crash)
        are replaced, so a retry after a crash succeeds.

        Raises ``Conflict`` when a VM with that id or name exists (and changes nothing),
        ``NotFound`` when the base volume, a direct-boot volume or the seed file is missing.
        Any failure leaves nothing behind.
        """

    @abstractmethod
    def start_vm(self, vm_id: uuid.UUID) -> None:
        """Power the VM on; a paused VM is resumed. Starting a running VM does nothing.
        ``VmNotFound`` for an unknown id."""

    @abstractmethod
    def stop_vm(self, vm_id: uuid.UUID, *, force: bool = False) -> None:
        """Power the VM off: ``force`` pulls the plug at once, else the guest is asked to shut
        down (this returns without waiting; a guest that ignores the request keeps running, and
        escalating to ``force`` is the caller's decision). Stopping a VM that is off succeeds;
        ``VmNotFound`` for an unknown id."""

    @abstractmethod
    def delete_vm(self, vm_id: uuid.UUID) -> None:
        """Power off and undefine the VM and delete every volume it owns (see
        ``owned_volume_names``). Deleting a VM that does not exist succeeds; so does deleting
        one whose definition is gone but whose volumes remain (they are removed)."""

    @abstractmethod
    def get_vm(self, vm_id: uuid.UUID) -> VmRecord:
        """The VM's current record, power state read from the hypervisor. ``VmNotFound``."""

    @abstractmethod
    def list_vms(self) -> list[VmRecord]:
        """Every VM on the host, deskpool's (with metadata) and others (metadata None)."""

    @abstractmethod
    def console_address(self, vm_id: uuid.UUID) -> ConsoleAddress:
        """Where the running VM's VNC console listens. ``DriverError`` when it is off or the
        hypervisor gives it no port (libvirt's ``test:///``)."""

    @abstractmethod
    def agent_command(
        self, vm_id: uuid.UUID, command: str, arguments: dict[str, Any] | None = None,
        timeout_s: int = 5,
    ) -> Any:
        """Send one QEMU guest agent command and return its ``return`` value.

        ``AgentUnavailable`` when the VM is off, the agent has not started, or the hypervisor
        has no agent channel (libvirt's ``test:///``); ``DriverError`` when the agent answered
        with an error. ``VmNotFound`` for an unknown VM.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most drivers hold nothing to close
        """Release the connection. Later calls fail with ``DriverError``."""
