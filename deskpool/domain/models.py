"""Enums and value objects shared by every layer."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class CloneMode(StrEnum):
    LINKED = "linked"  # qcow2 overlay whose backing file is the template version's image
    FULL = "full"  # independent copy of the template version's image
    # overlay on a captured template disk, restored running from its saved memory state
    INSTANT = "instant"


class Customization(StrEnum):
    FWCFG = "fwcfg"  # deskpool guest hook reads identity from QEMU fw_cfg at boot
    CLOUD_INIT = "cloud-init"  # NoCloud seed disk labelled 'cidata'
    NONE = "none"


class DomainType(StrEnum):
    AUTO = "auto"  # kvm where a probe shows it boots guests, else qemu
    KVM = "kvm"
    QEMU = "qemu"  # TCG software emulation


class PowerState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    SUSPENDED = "suspended"  # guest power-management suspend
    SAVED = "saved"  # off, memory saved by the hypervisor (managed save); start resumes it
    UNKNOWN = "unknown"


class StopReason(StrEnum):
    """Why a VM is off (or crashed), as the hypervisor says: told apart so a crash is never
    taken for a shutdown deskpool or the user asked for."""

    SHUTDOWN = "shutdown"  # the guest shut itself down (asked to, or by its user)
    DESTROYED = "destroyed"  # forced off from outside (deskpool's forced stop, virsh destroy)
    CRASHED = "crashed"  # QEMU ended on its own (killed, aborted) or the guest panicked
    FAILED = "failed"  # QEMU failed (to start, or on a fatal error)
    # The hypervisor has no record of why: it has not run the VM since it (re)started, as
    # after its host rebooted. Not a crash by itself: a VM made and never booted reads so too.
    UNKNOWN = "unknown"
    OTHER = "other"  # saved, migrated, restored from a snapshot, or not told

    @property
    def unexpected(self) -> bool:
        """Whether nobody asked for the VM to stop: its QEMU died under it."""
        return self in (StopReason.CRASHED, StopReason.FAILED)


class HostState(StrEnum):
    ENABLED = "enabled"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"
    DOWN = "down"


class PoolStatus(StrEnum):
    """Whether a pool takes new sessions: ``disabled`` refuses new ones (held desktops stay
    their users'); ``deleting`` too, and its desktops are retired as they free up, then the
    pool goes."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    DELETING = "deleting"


@dataclass(frozen=True)
class HostCapacity:
    hypervisor: str  # libvirt's driver type, e.g. "QEMU" or "TEST"
    vcpus: int
    memory_mib: int
    storage_free_bytes: int
    domain_types: tuple[str, ...]  # what the hypervisor offers, e.g. ("qemu", "kvm")
    arch: str = "x86_64"
    cpu_model: str = ""  # the host CPU's model name (its generation), "" when not reported


@dataclass(frozen=True)
class VmMetadata:
    """deskpool's ids, stored inside each VM so the broker finds its own VMs after a crash."""

    desktop_id: uuid.UUID
    desktop_name: str
    template_version_id: uuid.UUID | None = None
    # The deskpool deployment (database) that made it: another deployment's brokers sharing
    # the host leave it alone. None on VMs made before deployments were told apart.
    installation_id: uuid.UUID | None = None


@dataclass(frozen=True)
class DirectBoot:
    """Boot a kernel and initrd from the host's storage instead of the disk's boot loader."""

    kernel_volume: str
    initrd_volume: str
    cmdline: str


# The serial of a desktop's user layer disk: the guest's initramfs looks for it to assemble
# the layered root (deskpool/images/guest/.../deskpool-layer).
USER_LAYER_SERIAL = "deskpool-layer"
# The serial of the template version a user layer was made on, attached read-only for the
# boot that rebases the layer onto the version the VM now runs (``VmSpec.layer_base_volume``).
LAYER_BASE_SERIAL = "deskpool-layer-base"


@dataclass(frozen=True)
class VmSpec:
    """Everything a driver needs to create one desktop VM.

    ``vm_id`` is deskpool's id for the VM (the desktop id); drivers address VMs by it only.
    """

    vm_id: uuid.UUID
    name: str
    base_volume: str
    clone_mode: CloneMode
    mac: str
    metadata: VmMetadata
    vcpus: int = 1
    memory_mib: int = 512
    domain_type: DomainType = DomainType.QEMU
    direct_boot: DirectBoot | None = None
    identity_text: str | None = None  # handed to the guest through fw_cfg when set
    seed_image: Path | None = None  # local cloud-init NoCloud seed, attached read-only
    network: str | None = None  # libvirt network name; None = user-mode networking
    vnc_listen: str = "127.0.0.1"
    extra: dict[str, str] = field(default_factory=dict)
    # CloneMode.INSTANT only: the captured memory state (see HypervisorDriver.capture_memory_state)
    memory_state_volume: str | None = None
    # A reboot the guest starts ends the VM (stop reason SHUTDOWN) instead of restarting it
    # on the same disk, so deskpool resets a stateless desktop before it runs again.
    reboot_ends_vm: bool = False
    # A user layer: a volume on the host, made and kept by the caller (the VM does not own
    # it), attached writable in the definition with serial USER_LAYER_SERIAL.
    layer_volume: str | None = None
    # With layer_volume: the root volume of the version the layer was made on, attached
    # read-only with serial LAYER_BASE_SERIAL, so the guest can rebase the layer at boot.
    layer_base_volume: str | None = None


def moves_live(clone_mode: CloneMode, power_state: PowerState, *,
               user_layer: bool = False) -> bool:
    """Whether a desktop's VM may move live to another host: a running linked clone (the
    target rebuilds only its overlay, on its own copy of the template). Not yet one with a
    user layer: its layer disk would have to be made on the target first."""
    return (clone_mode is CloneMode.LINKED and power_state is PowerState.RUNNING
            and not user_layer)


@dataclass(frozen=True)
class MigrationStats:
    """What a live migration moved, as the hypervisor counted it."""

    seconds: float
    memory_bytes: int  # guest memory sent (pages sent again after the guest dirtied them too)
    disk_bytes: int  # disk data copied: a linked clone's overlay only
    downtime_ms: int | None  # the hypervisor's figure for the guest's pause, if it gives one


@dataclass(frozen=True)
class VmLoad:
    """One running VM's measured use of its host."""

    memory_used_mib: float  # what it holds of the host's memory: its RSS, else its balloon
    cpu_time_ns: int  # CPU time it has used since it started (cumulative)


@dataclass(frozen=True)
class LoadSample:
    """A host's measured load at one moment (``HypervisorDriver.load_sample``). Memory is a
    level; CPU figures are cumulative counters, so a CPU load comes only from two samples of
    the same host (``cpu_load_since``, ``vm_cpus_since``)."""

    taken_at_s: float  # the driver's monotonic clock: only differences mean anything
    memory_total_mib: int  # physical memory
    memory_used_mib: float  # in use by anything (guests, QEMU, the host's own processes)
    cpu_count: int
    cpu_busy_ns: int  # time all CPUs spent busy (user and kernel), cumulative
    cpu_total_ns: int  # time all CPUs spent busy or idle (waiting included), cumulative
    vms: Mapping[uuid.UUID, VmLoad] = field(default_factory=dict)  # running VMs, by vm_id

    def cpu_load_since(self, earlier: LoadSample) -> float | None:
        """The fraction of the host's CPUs busy between ``earlier`` and this sample; None
        when the counters did not move forward (the host restarted, or no time passed)."""
        total = self.cpu_total_ns - earlier.cpu_total_ns
        busy = self.cpu_busy_ns - earlier.cpu_busy_ns
        if total <= 0 or busy < 0:
            return None
        return min(1.0, busy / total)

    def vm_cpus_since(self, earlier: LoadSample, vm_id: uuid.UUID) -> float | None:
        """How many CPUs the VM kept busy between the two samples (e.g. 0.5); None when it
        is missing from either or its counter went back (it was restarted or moved)."""
        now, then = self.vms.get(vm_id), earlier.vms.get(vm_id)
        elapsed_ns = (self.taken_at_s - earlier.taken_at_s) * 1e9
        if now is None or then is None or elapsed_ns <= 0 or now.cpu_time_ns < then.cpu_time_ns:
            return None
        return (now.cpu_time_ns - then.cpu_time_ns) / elapsed_ns


@dataclass(frozen=True)
class VmRecord:
    """What a driver reports about a VM it finds on the hypervisor."""

    vm_id: uuid.UUID
    name: str
    power_state: PowerState
    metadata: VmMetadata | None  # None for VMs that deskpool did not create
    # Why it is off or crashed; None while it runs (or paused, suspended).
    stop_reason: StopReason | None = None

    def crash_description(self) -> str | None:
        """A sentence naming how the VM ended when nobody asked it to stop, else None."""
        if self.power_state is PowerState.CRASHED:
            return "its guest crashed (the hypervisor reports it crashed)"
        if (self.power_state is PowerState.SHUTOFF and self.stop_reason is not None
                and self.stop_reason.unexpected):
            return f"its VM stopped unexpectedly: QEMU ended ({self.stop_reason.value})"
        return None


class ConsoleProtocol(StrEnum):
    """A desktop's displays: VNC (the browser's noVNC) and SPICE (native remote-viewer), both
    QEMU's, and RDP (xfreerdp, mstsc), the guest's own xrdp."""

    VNC = "vnc"
    SPICE = "spice"
    RDP = "rdp"


@dataclass(frozen=True)
class ConsoleAddress:
    protocol: str  # a ConsoleProtocol value
    host: str
    port: int


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    path: str
    capacity_bytes: int
    allocation_bytes: int
    backing_volume_path: str | None
