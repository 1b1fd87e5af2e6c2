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
* **A lost connection is said so.** A call during which the connection to the host broke (its
  daemon restarted) raises ``HostConnectionLost``: whether it took effect is unknown. The
  driver reconnects by itself at a later call once the host answers again.
* **Idempotent cleanup.** Deleting a VM or volume that does not exist succeeds.
* **No half-made VMs.** A ``create_vm`` that fails removes every volume and definition it made
  before raising, so the only outcomes are "VM fully defined" or "nothing there". (After a
  ``HostConnectionLost`` the cleanup itself may not have reached the host: the caller's
  ``delete_vm`` of the VM's id removes what is left, and every create path starts with it.)
* **Findable after a crash.** Every VM created carries ``VmMetadata`` inside its definition, and
  ``list_vms`` returns it, so a restarted broker can match VMs to its database.
* **Hands off others' VMs.** ``list_vms`` reports VMs deskpool did not create (metadata None,
  ``vm_id`` their hypervisor UUID, since they have no deskpool id), but every call that
  changes a VM (start, stop, suspend, delete, snapshots, capture) refuses them with
  ``Conflict`` and changes nothing.
* **Thread-safe.** One driver instance per host is shared by the threads of a process.
* **Deterministic volume names.** A VM's own volumes are named from its ``vm_id``
  (``<vm_id>-root.qcow2``, ``<vm_id>-seed.img``, ``<vm_id>-memory.save``), so ``delete_vm`` can
  remove them even when the VM definition itself was never written (a crash between the steps).
* **Saved guest state.** Three features keep a guest's memory, and every one leaves the guest's
  clock behind (it stood still while saved): internal snapshots (``create_snapshot``), managed
  save (``suspend_vm``, power state ``SAVED``) and instant clones (``capture_memory_state`` +
  ``CloneMode.INSTANT``). The caller sets the clock afterwards, with the identity work it does
  anyway (``GuestAgent.set_time``, or the guest identity hook's clock argument, which skips
  the RTC write that makes ``guest-set-time`` take about a second under TCG).
"""

from __future__ import annotations

import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from deskpool.domain.errors import DriverError, InvalidInput
from deskpool.domain.models import (
    LAYER_BASE_SERIAL,
    USER_LAYER_SERIAL,
    ConsoleAddress,
    ConsoleProtocol,
    DomainType,
    HostCapacity,
    LoadSample,
    MigrationStats,
    PowerState,
    VmRecord,
    VmSpec,
    VolumeInfo,
)


def root_volume_name(vm_id: uuid.UUID) -> str:
    return f"{vm_id}-root.qcow2"


def seed_volume_name(vm_id: uuid.UUID) -> str:
    return f"{vm_id}-seed.img"


def memory_state_volume_name(vm_id: uuid.UUID) -> str:
    """A saved memory state: a captured template's, or an instant clone's own copy of it."""
    return f"{vm_id}-memory.save"


def layer_volume_name(vm_id: uuid.UUID) -> str:
    """A desktop's user layer disk (``VmSpec.layer_volume``): not among the VM's owned
    volumes, so no VM delete or re-create ever removes it."""
    return f"{vm_id}-layer.qcow2"


def owned_volume_names(vm_id: uuid.UUID) -> tuple[str, ...]:
    """Every volume a VM may own; ``delete_vm`` removes all of them."""
    return (root_volume_name(vm_id), seed_volume_name(vm_id), memory_state_volume_name(vm_id))


def partial_volume_name(name: str) -> str:
    """Where ``receive_volume`` writes ``name`` until every byte has arrived and checked."""
    return f"{name}.part"


_SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_snapshot_name(name: str) -> str:
    """Snapshot names are short words every hypervisor accepts (and no path or XML trick)."""
    if not _SNAPSHOT_NAME_RE.match(name):
        raise InvalidInput(
            f"snapshot name {name!r} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def check_instant_spec(spec: VmSpec) -> str:
    """What every driver refuses in an instant-clone spec, before it makes anything. Returns
    the memory state volume to restore."""
    if spec.memory_state_volume is None:
        raise InvalidInput(f"an instant clone needs a memory state: VM {spec.name} has no "
                           "memory_state_volume")
    if spec.seed_image is not None:
        raise InvalidInput(f"an instant clone cannot have a seed image (VM {spec.name})")
    return spec.memory_state_volume


_DISK_SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,19}$")


def validate_disk_serial(serial: str) -> str:
    """A hot-plugged disk's serial: what the guest sees as ``/dev/disk/by-id/virtio-SERIAL``.
    virtio-blk keeps 20 bytes of it, and udev turns anything but these characters into
    ``_``, so the name is refused rather than silently changed."""
    if not _DISK_SERIAL_RE.match(serial):
        raise InvalidInput(f"disk serial {serial!r} must be 1-20 characters of A-Z, a-z, 0-9, "
                           "'_' and '-', starting with a letter or digit")
    if serial in (USER_LAYER_SERIAL, LAYER_BASE_SERIAL):
        raise InvalidInput(f"disk serial {serial!r} is a user layer's, never hot-plugged")
    return serial


def stop_gracefully(driver: HypervisorDriver, vm_id: uuid.UUID, *, grace_s: float,
                    poll_s: float) -> bool:
    """Ask the guest to shut down (its file systems written out), and pull the plug if it is
    not off within ``grace_s``; returns whether it had to be forced. A VM that is off
    already is left as it is."""
    if driver.get_vm(vm_id).power_state is PowerState.SHUTOFF:
        return False
    driver.stop_vm(vm_id)
    deadline = time.monotonic() + grace_s
    while driver.get_vm(vm_id).power_state is not PowerState.SHUTOFF:
        if time.monotonic() >= deadline:
            driver.stop_vm(vm_id, force=True)
            return True
        time.sleep(poll_s)
    return False


class HypervisorDriver(ABC):
    """One hypervisor host, reached at ``uri``."""

    uri: str
    # Where the host keeps deskpool's volumes, when the hypervisor has such a path.
    storage_dir: Path | None = None

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

    def load_sample(self) -> LoadSample:
        """The host's measured load now, for the load balancer: its physical memory and the
        memory in use, its CPUs' cumulative busy and total time, and each running VM's
        memory in use (its RSS, else its balloon's size) and cumulative CPU time, keyed by
        ``vm_id`` (others' VMs under their hypervisor UUID), stamped with the driver's
        monotonic clock.

        One sample gives memory; CPU loads come from the difference of two samples of the
        same driver (``LoadSample.cpu_load_since``). Counters only grow while the host
        runs; a VM that restarted or moved starts its counter again. A VM that ends while
        the sample is taken is left out. ``DriverError`` when the hypervisor cannot report
        the host's memory or CPU time ("not supported"): the caller then leaves the host
        out of balancing. The default says so for every driver that does not sample.
        """
        raise DriverError(f"load sampling is not supported by {type(self).__name__}")

    # --- storage: volumes in the host's own (local) storage -----------------------------

    @abstractmethod
    def import_volume(self, name: str, source: Path, sha256: str | None = None) -> VolumeInfo:
        """Copy a local file into the host's storage as volume ``name``.

        If a volume of that name exists already and is the source's size, it is returned
        unchanged (volumes holding template images are immutable and named per version);
        when ``sha256`` is given its bytes are checked against it first (hashed again only
        when the volume changed since the driver last hashed or wrote it) and a mismatch
        raises ``ChecksumMismatch``, the volume left as it is (running desktops may read it).
        One that is not the source's size is an import cut short (a crash, a lost
        connection): replaced by a new import rather than trusted as a template's disk. When
        ``sha256`` is given for a new volume the data sent is hashed and a mismatch removes
        the new volume and raises ``ChecksumMismatch``. A missing ``source`` raises
        ``NotFound`` and creates nothing.
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

    # --- copying a volume between hosts: an immutable profile layer ---------------------

    @property
    def copies_volumes(self) -> bool:
        """Whether ``read_volume`` / ``receive_volume`` work here (storage holding bytes)."""
        return False

    def read_volume(self, name: str, *, chunk_bytes: int = 4 * 2**20) -> Iterator[bytes]:
        """The bytes of volume ``name`` (its file on the host, as stored: a qcow2 layer's
        header and clusters, not the guest's view), in chunks of at most ``chunk_bytes``, read
        as the caller iterates (libvirt: a ``virStorageVol.download`` stream). ``NotFound``
        when there is no such volume, raised at the first ``next()``. Meant for immutable
        volumes: one changed while read gives a mixture, which the receiver's checksum
        refuses. Drivers whose storage holds no bytes (libvirt's ``test:///``) raise
        ``DriverError`` "not supported" and read nothing.
        """
        raise DriverError(f"reading volumes is not supported by {type(self).__name__}")

    def receive_volume(self, name: str, chunks: Iterable[bytes], *, size: int, sha256: str,
                       progress: Callable[[int], None] | None = None) -> VolumeInfo:
        """Write volume ``name`` from ``chunks`` (another host's ``read_volume``): never
        half-usable under its name.

        * The bytes go to ``partial_volume_name(name)`` first (one left by an earlier cut,
          a killed process or a lost connection, is removed and written again: a re-run
          restarts cleanly). Only when exactly ``size`` bytes arrived and their sha256 is
          ``sha256`` is it published under ``name`` (a rename where the storage can,
          else a copy on the host then the partial removed).
        * A mismatch (size or checksum) removes the partial and raises ``ChecksumMismatch``;
          an exception from ``chunks`` (the sender failed) removes it too and is raised as
          is. Nothing is then under ``name``.
        * ``name`` there already with that ``sha256`` (immutable volumes: an earlier copy
          published, its caller killed before it recorded so): returned as it is, ``chunks``
          not read. With other bytes: ``Conflict``, nothing changed.
        * ``progress(done)`` is called with the bytes received so far, after each chunk.
        * Drivers whose storage holds no bytes (libvirt's ``test:///``) raise
          ``DriverError`` "not supported" and write nothing.
        """
        raise DriverError(f"receiving volumes is not supported by {type(self).__name__}")

    # --- VMs ----------------------------------------------------------------------------

    @abstractmethod
    def create_vm(self, spec: VmSpec) -> VmRecord:
        """Create the VM's disk from ``spec.base_volume`` and define the VM, powered off
        (an instant clone excepted: it is running, see below).

        * ``CloneMode.LINKED``: the root volume is a qcow2 overlay backed by the base volume.
        * ``CloneMode.FULL``: the root volume is an independent copy of the base volume.
        * ``CloneMode.INSTANT``: ``spec.base_volume`` and ``spec.memory_state_volume`` are the
          two volumes ``capture_memory_state`` returned (``InvalidInput`` when
          ``memory_state_volume`` is None). The root volume is a qcow2 overlay on the captured
          disk; the memory state is copied to the VM's own ``memory_state_volume_name`` volume,
          made to name this VM (name, id, disk, metadata), and restored, so the VM is
          **running** when this returns, with the template guest's memory: same processes,
          same files, same hostname and identity marker, stale clock. Then a NIC with
          ``spec.mac`` on ``spec.network`` is plugged in (the guest sees it appear, as
          hot-plugged hardware; the template's was unplugged before its memory was saved,
          since a restored guest keeps the MAC it was saved with whatever its definition
          says). The clock stays stale and, like hostname, machine-id and the rest of the
          identity, is the caller's work, through the agent; ``spec.identity_text``, when set,
          goes into the definition for the VM's next cold boot only (the running guest read
          the template's at its boot), so a rebooted clone keeps its own identity. Everything
          else about the VM (vCPUs, memory, boot, console) is the template's: those fields of
          ``spec`` are ignored, and ``seed_image`` is refused (``InvalidInput``). The VM is
          persistent like any other: it can be stopped, started (a cold boot from its disk),
          snapshotted, suspended and deleted. Hypervisors that cannot restore a changed
          definition or plug devices raise ``DriverError`` ("not supported by this
          hypervisor") and create nothing: libvirt's ``test:///``, and a remote libvirt host
          (deskpool rewrites the memory file, so it must be on this machine's file system).
        * ``spec.seed_image`` (if set) is imported as the VM's seed volume, attached read-only.
        * ``spec.layer_volume`` (if set) names a volume already on the host (``NotFound``
          otherwise), attached writable in the definition, at every boot, as a virtio disk
          whose serial is ``USER_LAYER_SERIAL``. The VM does not own it: ``delete_vm`` and a
          failed create leave it, since it holds the user's changes (its caller deletes it).
          ``spec.layer_base_volume`` (with it) names another volume on the host, attached
          read-only with serial ``LAYER_BASE_SERIAL`` (``NotFound`` if missing); ignored
          without ``layer_volume``.
        * ``spec.reboot_ends_vm``: a reboot started inside the guest ends the VM, which then
          reads ``SHUTOFF`` with ``StopReason.SHUTDOWN`` like a shutdown from inside, instead
          of booting again on the same disk (an instant clone too).
        * ``spec.identity_text`` (if set) is handed to the guest at boot through fw_cfg under
          ``deskpool.domain.identity.FWCFG_KEY``.
        * The VM gets one NIC with ``spec.mac`` and two displays on ``spec.vnc_listen``: VNC,
          and SPICE (with the SPICE agent's channel) locked by a random password.

        ``spec.domain_type`` must be resolved already (``resolve_domain_type``): ``auto`` is
        ``InvalidInput``. Volumes the id would own that exist without a VM (left by a crash)
        are replaced, so a retry after a crash succeeds.

        Raises ``Conflict`` when a VM with that id or name exists (and changes nothing),
        ``NotFound`` when the base volume, a direct-boot volume or the seed file is missing.
        Any failure leaves nothing behind.
        """

    @abstractmethod
    def start_vm(self, vm_id: uuid.UUID) -> None:
        """Power the VM on; a paused VM is resumed, a ``SAVED`` one is restored from its saved
        memory (running, whatever it was when saved; its clock is stale). Starting a running
        VM does nothing. ``VmNotFound`` for an unknown id."""

    @abstractmethod
    def stop_vm(self, vm_id: uuid.UUID, *, force: bool = False) -> None:
        """Power the VM off: ``force`` pulls the plug at once, else the guest is asked to shut
        down (this returns without waiting; a guest that ignores the request keeps running, and
        escalating to ``force`` is the caller's decision). Stopping a VM that is off succeeds;
        so does stopping a ``SAVED`` one, which stays saved. ``VmNotFound`` for an unknown id."""

    @abstractmethod
    def suspend_vm(self, vm_id: uuid.UUID) -> None:
        """Save a running or paused VM's memory to the host's disk and end its process (the
        "suspend" power policy: it costs no host memory); the VM is then ``SAVED`` until
        ``start_vm`` resumes it with its memory intact. Suspending a VM that is off or saved
        does nothing. ``VmNotFound``; ``Conflict`` for a VM deskpool did not create."""

    # --- snapshots: the "factory" state a recycled desktop reverts to ------------------------

    @abstractmethod
    def create_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        """Take an internal snapshot (kept inside the VM's own disk) named ``name``.

        Of a running or paused VM it includes the memory, so a revert returns to a running
        (paused) guest; of a VM that is off, only the disk. ``InvalidInput`` for a name that
        ``validate_snapshot_name`` refuses, ``Conflict`` when the VM has a snapshot of that name
        or is ``SAVED`` (its memory is in the save file, not in the disk: start it first),
        ``VmNotFound``; ``Conflict`` for a VM deskpool did not create.
        """

    @abstractmethod
    def revert_to_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        """Return the VM to snapshot ``name``: afterwards it is in the snapshot's power state
        (running for a snapshot of a running VM) with the guest's disk and memory as they were
        then, so files written since are gone. A saved state (``SAVED``) is discarded first.
        ``NotFound`` naming the snapshot when there is none of that name, ``VmNotFound``;
        ``Conflict`` for a VM deskpool did not create."""

    @abstractmethod
    def list_snapshots(self, vm_id: uuid.UUID) -> list[str]:
        """The names of the VM's snapshots, sorted. ``VmNotFound``."""

    @abstractmethod
    def delete_snapshot(self, vm_id: uuid.UUID, name: str) -> None:
        """Delete snapshot ``name``; a missing snapshot is not an error. ``VmNotFound`` for an
        unknown VM, ``Conflict`` for a VM deskpool did not create. (``delete_vm`` removes a VM
        with snapshots too: there is no need to delete them first.)"""

    # --- instant clones ------------------------------------------------------------------

    @abstractmethod
    def capture_memory_state(self, vm_id: uuid.UUID) -> tuple[str, str]:
        """Turn a running VM (a booted template) into the assets instant clones are made from.

        Its NICs are unplugged (clones get their own; none should ever show the template's
        MAC), its memory is saved to a new volume ``memory_state_volume_name(vm_id)`` and the
        VM is undefined, but its root volume is kept: the saved memory belongs to that disk as the
        VM left it, so clones are overlays on it (base <- captured root <- clone), never on
        the template's original base. Returns ``(disk_volume, memory_volume)``, the names to
        put in ``VmSpec.base_volume`` and ``VmSpec.memory_state_volume``. Afterwards the VM
        no longer exists (``VmNotFound``); the two volumes stay until ``delete_volume`` (or
        ``delete_vm`` of the old id, which owns them by name). Clones restored from the state
        need the volumes the template booted from (direct-boot kernel and initrd) too.

        ``VmNotFound``; ``Conflict`` for a VM deskpool did not create, one that is not
        running, or one with a seed volume (every clone would need it). A failed save leaves
        the VM running (its NIC plugged back) and no memory volume. Capture a template once
        its boot is over (``systemctl is-system-running --wait``): its agent answers earlier,
        and a clone would otherwise go on booting, devices and all, from where it was saved.
        ``DriverError`` "not supported by this hypervisor" on libvirt's ``test:///``, whose
        storage cannot hold the memory file.
        """

    # --- hot-plugged disks: a user's profile layer during their session --------------------

    def migrate_vm(self, vm_id: uuid.UUID, target: HypervisorDriver, *, base_volume: str,
                   timeout_s: float = 600.0,
                   progress: Callable[[int, int], None] | None = None) -> MigrationStats:
        """Move the running VM to ``target``'s host, live: its memory and its root volume go,
        and it keeps its name, id, MAC, metadata, fw_cfg identity and display passwords.

        * ``base_volume`` is the root's base on the target, under its name there (the caller
          copied it, as for a clone): the target gets a new overlay on it, and only the
          overlay's data crosses.
        * Refused before anything starts: a VM not running or with snapshots (``Conflict``),
          disks besides its root (a hot-plugged profile, a seed image: ``Conflict``), its
          own host as the target (``InvalidInput``), others' VMs (``Conflict``).
        * ``progress(done, total)`` is called with the bytes moved so far while it runs.
        * On success the VM runs on the target and nothing of it is left here (definition and
          owned volumes removed); the returned ``MigrationStats`` say what crossed.
        * On a failure (the target out of memory part way included) or a timeout
          (cancelled): it runs here as before, nothing of it is left on the target, and
          ``DriverError`` says why.
        * The connection to this host lost while the move runs: ``HostConnectionLost``, and
          the caller cannot know where the VM runs. It runs on exactly one of the two
          hosts (the target's copy starts only once this one has stopped); whoever lists
          both hosts later finds which.
        * Hypervisors that cannot (libvirt ``test:///``), or two different drivers, raise
          ``DriverError`` ("not supported") and change nothing.
        """
        raise DriverError(f"live migration is not supported by {type(self).__name__}")

    @abstractmethod
    def attach_disk(self, vm_id: uuid.UUID, path: Path, serial: str) -> None:
        """Hot-plug the qcow2 file ``path`` (on the host, with its backing chain) into the
        running VM as a writable virtio disk whose serial is ``serial``: the guest finds it
        as ``/dev/disk/by-id/virtio-<serial>``.

        The disk is attached to the live VM only, never to its definition: when the VM's
        process ends (powered off, crashed, saved) the disk is gone with it, and a later
        start never opens a file that may have been set aside meanwhile. The hypervisor
        opens ``path`` for writing and its backing files read-only until the disk is
        detached or the process ends.

        ``InvalidInput`` for a serial ``validate_disk_serial`` refuses, ``NotFound`` for a
        missing file, ``Conflict`` when the VM already has a disk with that serial or was
        not created by deskpool, ``DriverError`` when the VM is not running or the
        hypervisor cannot hot-plug (libvirt's ``test:///``: "not supported by this
        hypervisor"). ``VmNotFound``. A failed attach leaves no disk attached.
        """

    @abstractmethod
    def detach_disk(self, vm_id: uuid.UUID, serial: str, *, timeout_s: float = 10.0) -> None:
        """Unplug the disk with ``serial`` from the running VM and return once the hypervisor
        has closed its file, so the caller may read, check or commit it.

        Unplugging a virtio disk needs the guest's consent (PCI hot-unplug): a guest that
        has not released it within ``timeout_s`` gives ``DriverError`` ("did not release")
        and the disk stays attached; powering the VM off (``stop_vm(force=True)``) releases
        it for sure. Detaching a serial that is not attached, or from a VM that is off,
        succeeds (nothing is attached then). ``VmNotFound``; ``Conflict`` for a VM deskpool
        did not create.
        """

    @abstractmethod
    def attached_disks(self, vm_id: uuid.UUID) -> dict[str, str]:
        """The hot-plugged disks of the running VM: serial -> file path (the VM's own
        disks, which have no serial, are not listed). Empty for a VM that is off.
        ``VmNotFound``."""

    @abstractmethod
    def delete_vm(self, vm_id: uuid.UUID) -> None:
        """Power off and undefine the VM and delete every volume it owns (see
        ``owned_volume_names``). Deleting a VM that does not exist succeeds; so does deleting
        one whose definition is gone but whose volumes remain (they are removed)."""

    # --- HA restart: a lost host's VM started again over the storage it shared ------------

    def restart_on_shared_storage(self, spec: VmSpec) -> VmRecord:
        """Define ``spec``'s VM here over the root volume its lost host left on storage both
        hosts reach (``<vm_id>-root.qcow2`` is in this host's storage already; it is used as
        it is, nothing is cloned) and start it: running when this returns.

        * **Fenced by the disk.** QEMU takes its disk's write lock when it starts, so while
          any process on any host sharing the storage still holds the disk (a QEMU that
          outlived its libvirtd), the start fails: this raises ``DiskInUse`` and leaves
          nothing defined here. One desktop never runs twice.
        * ``NotFound`` when the root volume is not in this host's storage (it is not shared
          with the lost host), ``Conflict`` when a VM with that id or name is defined here.
        * ``spec.clone_mode`` must be linked or full (instant clones refer to a memory state
          of their host: ``InvalidInput``). The seed volume is kept if present, imported
          from ``spec.seed_image`` if not. Other failures leave nothing defined here and the
          volumes as they were (``DriverError``).
        * Drivers that cannot (libvirt's ``test:///`` takes no disk locks and is refused too,
          ``DriverError`` "not supported") change nothing.
        """
        raise DriverError(f"restarting on shared storage is not supported by "
                          f"{type(self).__name__}")

    def forget_vm(self, vm_id: uuid.UUID) -> None:
        """Remove the VM's definition here and keep its volumes: it runs on another host that
        shares this host's storage (``restart_on_shared_storage``), and they are its disks
        now. A running VM is refused (``Conflict``); an unknown one is no error. Others'
        VMs are refused (``Conflict``)."""
        raise DriverError(f"forgetting a VM is not supported by {type(self).__name__}")

    @abstractmethod
    def get_vm(self, vm_id: uuid.UUID) -> VmRecord:
        """The VM's current record, power state read from the hypervisor. ``VmNotFound``.

        A VM that is off (or crashed) says why in ``stop_reason``: ``destroyed`` after a
        forced ``stop_vm``, ``shutdown`` after its guest shut down, ``crashed`` when its QEMU
        process ended without being asked to (a SIGKILL, an abort); None while it runs."""

    @abstractmethod
    def list_vms(self) -> list[VmRecord]:
        """Every VM on the host, deskpool's (with metadata) and others (metadata None)."""

    @abstractmethod
    def console_address(
        self, vm_id: uuid.UUID, protocol: ConsoleProtocol = ConsoleProtocol.VNC,
    ) -> ConsoleAddress:
        """Where the running VM's ``protocol`` display listens (every VM has a VNC and a
        SPICE display, both on ``spec.vnc_listen``). ``DriverError`` when it is off or the
        hypervisor gives it no port (libvirt's ``test:///``).

        ``ConsoleProtocol.RDP`` is the guest's own RDP server (xrdp, TCP 3389 in the guest):
        the first ask forwards a free port of ``spec.vnc_listen`` to it, for the life of the
        VM's running hypervisor process, and later asks give the same address. The guest's
        RDP server asks for a password, as the displays do; whether anything listens behind
        the port is the guest's business (a console-flavor guest has no xrdp)."""

    @abstractmethod
    def set_console_password(
        self, vm_id: uuid.UUID, protocol: ConsoleProtocol, password: str, valid_until: datetime,
    ) -> None:
        """Set the running VM's ``protocol`` display password, accepted for new connections
        until ``valid_until`` (aware UTC); connections already open stay. A SPICE display
        starts with a random password nobody knows, so it admits no one before this is
        called. ``DriverError`` when the VM is off or the hypervisor cannot change it
        (libvirt's ``test:///``); ``VmNotFound`` for an unknown VM."""

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
