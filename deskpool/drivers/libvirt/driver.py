"""The libvirt driver: any hypervisor libvirt reaches (``qemu:///system``, ``qemu+ssh://``,
``test:///default``...). Desktops' disks live in a libvirt ``dir`` storage pool on the host, so
a remote host needs nothing but libvirt (instant clones excepted: see ``instant.py``).

Snapshots and managed save live in ``snapshots.py``, instant clones in ``instant.py``, the
connection (made again after the host's daemon restarted) in ``connection.py``: mixins that
share this class's lock and helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import libvirt
import libvirt_qemu

from deskpool.config import Settings
from deskpool.domain.errors import (
    AgentUnavailable,
    Conflict,
    DriverError,
    InvalidInput,
    NotFound,
    VmNotFound,
)
from deskpool.domain.models import (
    LAYER_BASE_SERIAL,
    USER_LAYER_SERIAL,
    CloneMode,
    ConsoleAddress,
    ConsoleProtocol,
    DomainType,
    HostCapacity,
    PowerState,
    VmRecord,
    VmSpec,
    VolumeInfo,
)
from deskpool.drivers.base import (
    HypervisorDriver,
    owned_volume_names,
    root_volume_name,
    seed_volume_name,
)
from deskpool.drivers.libvirt import xml
from deskpool.drivers.libvirt.connection import ConnectionMixin, error_code
from deskpool.drivers.libvirt.hotplug import HotplugMixin
from deskpool.drivers.libvirt.imports import VolumeImportsMixin
from deskpool.drivers.libvirt.instant import InstantClonesMixin
from deskpool.drivers.libvirt.kvm_probe import kvm_boots_kernel
from deskpool.drivers.libvirt.load import LoadSampleMixin
from deskpool.drivers.libvirt.migration import MigrationMixin
from deskpool.drivers.libvirt.overlays import OverlayWriter
from deskpool.drivers.libvirt.power import power_of
from deskpool.drivers.libvirt.rdp_forward import rdp_forward
from deskpool.drivers.libvirt.shared_restart import SharedRestartMixin
from deskpool.drivers.libvirt.snapshots import SnapshotsMixin
from deskpool.drivers.libvirt.volume_check import VerifiedVolumes
from deskpool.drivers.libvirt.volume_streams import VolumeStreamsMixin

# libvirt prints every error to stderr unless a handler swallows it; we translate them instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_AGENT_SILENT = {
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    libvirt.VIR_ERR_OPERATION_INVALID,  # domain is not running
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,  # no agent channel configured
    libvirt.VIR_ERR_NO_SUPPORT,  # test:/// has no guest agent
}
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)
_UNDEFINE_SAVE_AND_SNAPSHOTS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
)


def default_pool_name(storage_dir: Path) -> str:
    """One pool per storage directory, so several hosts (or tests) on one daemon never mix."""
    return "deskpool-" + hashlib.sha256(str(storage_dir).encode()).hexdigest()[:10]


def forget_storage_pool(storage_dir: Path, uri: str = "qemu:///system") -> None:
    """Stop and undefine the libvirt storage pool deskpool made for ``storage_dir`` (its
    files stay), once nothing uses it: what a test or a benchmark on a temporary directory
    leaves behind otherwise. Nothing happens when there is no such pool."""
    conn = libvirt.open(uri)
    try:
        pool = conn.storagePoolLookupByName(default_pool_name(storage_dir))
        if pool.isActive():
            pool.destroy()
        pool.undefine()
    except libvirt.libvirtError:
        pass  # never made, or gone already
    finally:
        conn.close()



class LibvirtDriver(SnapshotsMixin, InstantClonesMixin, HotplugMixin, VolumeImportsMixin,
                    VolumeStreamsMixin, MigrationMixin, LoadSampleMixin, SharedRestartMixin,
                    ConnectionMixin, HypervisorDriver):
    """One connection per host, opened again by the first call after it died (the host's
    libvirtd was restarted; see ``connection.py``)."""

    def __init__(
        self, uri: str, *, storage_dir: Path | None = None, pool_name: str | None = None
    ) -> None:
        self.uri = uri
        self._lock = threading.RLock()
        self._closed = False
        self._connection, hv_type = self._open()
        self._is_test = hv_type == "TEST"
        self.storage_dir = storage_dir or Settings().resolved_storage_dir
        self._pool_name = pool_name or default_pool_name(self.storage_dir)
        self._storage_pool = self._ensure_pool(self._pool_name)
        self._writer = OverlayWriter(self._connection, self._storage_pool,
                                     self._local_pool_dir())
        self._verified = VerifiedVolumes()

    # --- helpers ---------------------------------------------------------------------------

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except libvirt.libvirtError as exc:
            raise self._failure(what, exc) from exc

    def _ensure_pool(self, name: str) -> libvirt.virStoragePool:
        with self._translate(f"preparing storage pool {name}"):
            try:
                pool = self._conn.storagePoolLookupByName(name)
            except libvirt.libvirtError as exc:
                if error_code(exc) != libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise
                definition = xml.DirPoolDefinition(name=name, path=str(self.storage_dir))
                pool = self._conn.storagePoolDefineXML(definition.to_xml(), 0)
                pool.setAutostart(1)
            if not pool.isActive():
                pool.build(0)  # mkdir of the target, harmless if it exists
                pool.create(0)
            pool_path = xml.parse_pool_path(pool.XMLDesc(0))
            if pool_path and Path(pool_path) != self.storage_dir:
                self.storage_dir = Path(pool_path)  # the host's own record wins
            return pool

    def _local_pool_dir(self) -> Path | None:
        """The pool's directory if this process may write volumes there as libvirt would:
        root on this machine's system daemon (see ``overlays.py``)."""
        parsed = urlparse(self.uri)
        if (self._is_test or parsed.hostname or parsed.path != "/system"
                or parsed.scheme not in ("qemu", "qemu+unix") or os.geteuid() != 0):
            return None
        storage = self.storage_dir
        return storage if storage is not None and os.access(storage, os.W_OK) else None

    def _domain(self, vm_id: uuid.UUID) -> libvirt.virDomain:
        try:
            return self._conn.lookupByUUIDString(str(vm_id))
        except libvirt.libvirtError as exc:
            if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                raise VmNotFound(f"no VM with id {vm_id} on {self.uri}") from exc
            raise self._failure(f"looking up VM {vm_id}", exc) from exc

    def _own_domain(self, vm_id: uuid.UUID) -> libvirt.virDomain:
        """The VM, refusing one deskpool did not create."""
        dom = self._domain(vm_id)
        if self._metadata(dom) is None:
            raise Conflict(f"VM {dom.name()} ({vm_id}) was not created by deskpool; "
                           "deskpool leaves it alone")
        return dom

    def _volume(self, name: str) -> libvirt.virStorageVol | None:
        try:
            return self._pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if error_code(exc) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise self._failure(f"looking up volume {name}", exc) from exc
        if not self._local_file_exists(name):
            return None
        self._refresh_pool()  # a file written straight into the pool: make libvirt see it
        try:
            return self._pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if error_code(exc) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise self._failure(f"looking up volume {name}", exc) from exc

    def _local_file_exists(self, name: str) -> bool:
        """Whether the pool's directory holds ``name``, when this process writes it."""
        local_dir = self._overlays.local_dir
        return local_dir is not None and "/" not in name and (local_dir / name).exists()

    def _record(self, dom: libvirt.virDomain) -> VmRecord:
        power, stop_reason = power_of(dom)
        return VmRecord(
            vm_id=uuid.UUID(dom.UUIDString()),
            name=dom.name(),
            power_state=power,
            metadata=self._metadata(dom),
            stop_reason=stop_reason,
        )

    @staticmethod
    def _metadata(dom: libvirt.virDomain) -> Any:
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml.METADATA_NS, 0)
        except libvirt.libvirtError:
            return None  # no deskpool metadata: a VM somebody else made
        return xml.parse_metadata(text)

    def _refresh_pool(self) -> None:
        with suppress(libvirt.libvirtError):
            self._pool.refresh(0)

    # --- host ------------------------------------------------------------------------------

    def capacity(self) -> HostCapacity:
        with self._translate("reading host capacity"):
            _model, memory_mib, cpus, *_ = self._conn.getInfo()
            pool_info = self._pool.info()
            capabilities = self._conn.getCapabilities()
            arch, cpu_model = xml.parse_host_cpu(capabilities)
            return HostCapacity(
                hypervisor=self._conn.getType(),
                vcpus=int(cpus),
                memory_mib=int(memory_mib),
                storage_free_bytes=int(pool_info[3]),
                domain_types=xml.parse_guest_domain_types(capabilities),
                arch=arch,
                cpu_model=cpu_model,
            )

    def probe_kvm_boots(self, kernel: Path) -> bool:
        if urlparse(self.uri).hostname:
            # A remote host: its own KVM cannot be probed from here; trust what it offers.
            return True
        return kvm_boots_kernel(kernel)

    # --- storage ---------------------------------------------------------------------------

    def volume_info(self, name: str) -> VolumeInfo:
        vol = self._volume(name)
        if vol is None:
            raise NotFound(f"no volume named {name} in {self.uri} storage")
        return self._volume_info(name, vol)

    def _volume_info(self, name: str, vol: libvirt.virStorageVol) -> VolumeInfo:
        with self._translate(f"reading volume {name}"):
            _kind, capacity, allocation = vol.info()
            return VolumeInfo(
                name=name,
                path=vol.path(),
                capacity_bytes=int(capacity),
                allocation_bytes=int(allocation),
                backing_volume_path=xml.parse_backing_path(vol.XMLDesc(0)),
            )

    def list_volumes(self) -> list[str]:
        self._refresh_pool()
        with self._translate("listing volumes"):
            return sorted(self._pool.listVolumes())

    def delete_volume(self, name: str) -> None:
        with self._lock:
            self._overlays.forget(name)
            self._verified.forget(name)
            vol = self._volume(name)
            if vol is None:
                return
            with self._translate(f"deleting volume {name}"):
                try:
                    vol.delete(0)
                except libvirt.libvirtError as exc:
                    if error_code(exc) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                        raise

    # --- VMs -------------------------------------------------------------------------------

    def create_vm(self, spec: VmSpec) -> VmRecord:
        if spec.domain_type is DomainType.AUTO:
            raise InvalidInput("create_vm needs a resolved domain type, not 'auto'")
        if spec.clone_mode is CloneMode.INSTANT:
            return self._create_instant(spec)
        with self._lock:
            self._refuse_duplicate(spec)
            self._delete_leftover_volumes(spec.vm_id)
            base = self._volume(spec.base_volume)
            if base is None:
                raise NotFound(f"base volume {spec.base_volume} is not on host {self.uri}")
            try:
                definition = self._build_definition(spec, base)
                with self._translate(f"defining VM {spec.name}"):
                    self._conn.defineXML(definition.to_xml())
            except BaseException:
                self._remove_leftovers(spec.vm_id)
                raise
            # Just defined, from this spec: no need to ask libvirt what it is.
            return VmRecord(vm_id=spec.vm_id, name=spec.name, power_state=PowerState.SHUTOFF,
                            metadata=spec.metadata)

    def _delete_leftover_volumes(self, vm_id: uuid.UUID) -> None:
        """A crash's leftovers: no VM owns them (its id is not defined). Where this process
        sees the pool's directory, a name without a file there has no volume: no need to ask
        libvirt about each (three round trips on every create)."""
        local_dir = self._overlays.local_dir
        for name in owned_volume_names(vm_id):
            if local_dir is None or (local_dir / name).exists():
                self.delete_volume(name)

    def _refuse_duplicate(self, spec: VmSpec) -> None:
        for lookup, key in ((self._conn.lookupByUUIDString, str(spec.vm_id)),
                            (self._conn.lookupByName, spec.name)):
            try:
                lookup(key)
            except libvirt.libvirtError as exc:
                if error_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                raise self._failure(f"checking for VM {key}", exc) from exc
            raise Conflict(f"a VM with id or name {key!r} already exists on {self.uri}")

    def _build_definition(
        self, spec: VmSpec, base: libvirt.virStorageVol
    ) -> xml.DomainDefinition:
        root = self._create_root_volume(spec, base)
        seed = None
        if spec.seed_image is not None:
            seed = self.import_volume(seed_volume_name(spec.vm_id), spec.seed_image).path
        return self._definition(spec, root, seed)

    def _definition(self, spec: VmSpec, root: str, seed: str | None) -> xml.DomainDefinition:
        """The VM's libvirt definition over its root volume (and seed volume) at these paths."""
        disks = [xml.DiskDevice(path=root, target="vda")]
        if seed is not None:
            disks.append(xml.DiskDevice(path=seed, target="vdb", format="raw", readonly=True))
        if spec.layer_volume is not None:
            layer = self.volume_info(spec.layer_volume)  # NotFound: the caller makes it first
            disks.append(xml.DiskDevice(path=layer.path, target=f"vd{'bcd'[len(disks) - 1]}",
                                        serial=USER_LAYER_SERIAL))
            if spec.layer_base_volume is not None:
                old = self.volume_info(spec.layer_base_volume)
                disks.append(xml.DiskDevice(path=old.path, target=f"vd{'bcd'[len(disks) - 1]}",
                                            readonly=True, serial=LAYER_BASE_SERIAL))
        boot = None
        if spec.direct_boot is not None:
            boot = xml.DirectKernelBoot(
                kernel=self.volume_info(spec.direct_boot.kernel_volume).path,
                initrd=self.volume_info(spec.direct_boot.initrd_volume).path,
                cmdline=spec.direct_boot.cmdline,
            )
        return xml.DomainDefinition(
            domain_type="test" if self._is_test else spec.domain_type.value,
            name=spec.name,
            uuid=spec.vm_id,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            metadata=spec.metadata,
            disks=tuple(disks),
            interface=xml.NetworkInterface(mac=spec.mac, network=spec.network),
            direct_boot=boot,
            fwcfg_entries=xml.fwcfg_identity(spec.identity_text) if spec.identity_text else {},
            vnc_listen=spec.vnc_listen,
            on_reboot="destroy" if spec.reboot_ends_vm else "restart",
            spice_password=secrets.token_urlsafe(24),  # known to no one: see the contract
        )

    def clone_volume(self, base_volume: str, name: str, mode: CloneMode) -> None:
        """Only the disk step of ``create_vm``: a new volume ``name`` cloned from
        ``base_volume`` (an overlay on it if ``mode`` is linked, else a full copy). Raises
        ``NotFound`` for a missing base and ``Conflict`` for a taken name."""
        with self._lock:
            base = self._volume(base_volume)
            if base is None:
                raise NotFound(f"base volume {base_volume} is not on host {self.uri}")
            taken = (self._local_file_exists(name) if self._overlays.local_dir is not None
                     else self._volume(name) is not None)  # a dir pool's volumes are its files
            if taken:
                raise Conflict(f"a volume named {name} already exists on {self.uri}")
            self._clone(base, name, mode)

    def _create_root_volume(self, spec: VmSpec, base: libvirt.virStorageVol) -> str:
        """The VM's root volume, cloned from ``base``; returns its path."""
        return self._clone(base, root_volume_name(spec.vm_id), spec.clone_mode)

    def _clone(self, base: libvirt.virStorageVol, name: str, mode: CloneMode) -> str:
        with self._translate(f"creating {mode.value} clone {name}"):
            if mode in (CloneMode.LINKED, CloneMode.INSTANT):
                if not self._is_test:  # test:/// keeps no data to copy: let it "create" one
                    return self._overlays.create(name, base)
                _kind, capacity, _alloc = base.info()
                definition = xml.VolumeDefinition(
                    name=name, capacity_bytes=int(capacity), backing_path=base.path(),
                    backing_format=_volume_format(base),
                )
                return str(self._pool.createXML(definition.to_xml(), 0).path())
            _kind, capacity, _alloc = base.info()
            definition = xml.VolumeDefinition(name=name, capacity_bytes=int(capacity))
            return str(self._pool.createXMLFrom(definition.to_xml(), base, 0).path())

    def _remove_leftovers(self, vm_id: uuid.UUID) -> None:
        with suppress(VmNotFound, DriverError):
            dom = self._domain(vm_id)
            with suppress(libvirt.libvirtError):
                if dom.isActive():  # a restored instant clone runs (and may be transient)
                    dom.destroy()
            with suppress(libvirt.libvirtError):
                self._undefine(dom)
        for volume in owned_volume_names(vm_id):
            with suppress(DriverError):
                self.delete_volume(volume)

    def start_vm(self, vm_id: uuid.UUID) -> None:
        with self._lock:
            dom = self._own_domain(vm_id)
            with self._translate(f"starting VM {dom.name()}"):
                if not dom.isActive():
                    try:
                        dom.create()  # restores a managed save, maybe of a paused VM
                    except libvirt.libvirtError as exc:
                        # Started meanwhile by another client: a start asked by a broker that
                        # was then killed goes on in libvirtd, and the next broker's start
                        # meets it. Running is what was asked (QEMU says "operation not
                        # valid", the test driver "internal error": the VM's state decides).
                        if not dom.isActive():
                            raise exc
                if dom.state(0)[0] == libvirt.VIR_DOMAIN_PAUSED:
                    dom.resume()

    def stop_vm(self, vm_id: uuid.UUID, *, force: bool = False) -> None:
        with self._lock:
            dom = self._own_domain(vm_id)
            if not dom.isActive():
                return
            with self._translate(f"stopping VM {dom.name()}"):
                try:
                    dom.destroy() if force else dom.shutdown()
                except libvirt.libvirtError as exc:
                    if error_code(exc) != libvirt.VIR_ERR_OPERATION_INVALID:  # already off
                        raise

    def delete_vm(self, vm_id: uuid.UUID) -> None:
        with self._lock:
            try:
                dom = self._own_domain(vm_id)
            except VmNotFound:
                dom = None
            if dom is not None:
                with self._translate(f"deleting VM {vm_id}"):
                    try:
                        if dom.isActive():
                            dom.destroy()
                        self._undefine(dom)
                    except libvirt.libvirtError as exc:
                        # Undefined meanwhile by another client (on a shared daemon, another
                        # broker's step): gone, as asked; its volumes still go below.
                        if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                            raise
            self._refresh_pool()
            for volume in owned_volume_names(vm_id):
                self.delete_volume(volume)

    def _undefine(self, dom: libvirt.virDomain) -> None:
        """Undefine with its managed save and snapshot metadata (internal snapshots live in
        the root volume: they go with it). Raises ``libvirtError``."""
        # Drivers without the newer flags (test:/// lacks checkpoints and NVRAM) get fewer.
        for flags in (_UNDEFINE_FLAGS, _UNDEFINE_SAVE_AND_SNAPSHOTS):
            try:
                dom.undefineFlags(flags)
                return
            except libvirt.libvirtError as exc:
                if error_code(exc) not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG):
                    raise
        dom.undefine()

    def get_vm(self, vm_id: uuid.UUID) -> VmRecord:
        with self._lock:
            dom = self._domain(vm_id)
            with self._translate(f"reading VM {vm_id}"):
                return self._record(dom)

    def list_vms(self) -> list[VmRecord]:
        records = []
        with self._lock, self._translate("listing VMs"):
            for dom in self._conn.listAllDomains(0):
                try:
                    records.append(self._record(dom))
                except libvirt.libvirtError as exc:
                    # Undefined between the list and the read (on a shared daemon: another
                    # client's VM, another broker's delete): it is not there any more. Failing
                    # the whole list would make the host look silent to the reconciler.
                    if error_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
        return records

    def console_address(
        self, vm_id: uuid.UUID, protocol: ConsoleProtocol = ConsoleProtocol.VNC,
    ) -> ConsoleAddress:
        with self._lock:
            dom = self._domain(vm_id)
            with self._translate(f"reading console of VM {vm_id}"):
                live = dom.XMLDesc(0) if dom.isActive() else None
                # RDP is the guest's own server, on a port forwarded beside the displays.
                display = "vnc" if protocol is ConsoleProtocol.RDP else protocol.value
                shown = xml.parse_display(live, display) if live is not None else None
                if shown is not None and live is not None and protocol is ConsoleProtocol.RDP:
                    port = rdp_forward(dom, live, shown.host)
                    return ConsoleAddress(protocol=protocol.value, host=shown.host, port=port)
            if shown is None:
                raise DriverError(f"VM {vm_id} has no {protocol.value.upper()} console now "
                                  "(is it running?)")
            return ConsoleAddress(protocol=protocol.value, host=shown.host, port=shown.port)

    def set_console_password(
        self, vm_id: uuid.UUID, protocol: ConsoleProtocol, password: str, valid_until: datetime,
    ) -> None:
        valid_to = valid_until.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        with self._lock:
            dom = self._domain(vm_id)
            with self._translate(f"setting the {protocol.value} password of VM {vm_id}"):
                if not dom.isActive():
                    raise DriverError(f"VM {vm_id} is not running: its display has no "
                                      "password to set")
                changed = xml.graphics_with_password(
                    dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE), protocol.value, password,
                    valid_to)
                if changed is None:
                    raise DriverError(f"VM {vm_id} has no {protocol.value.upper()} display")
                dom.updateDeviceFlags(changed, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def agent_command(
        self, vm_id: uuid.UUID, command: str, arguments: dict[str, Any] | None = None,
        timeout_s: int = 5,
    ) -> Any:
        with self._lock:
            dom = self._domain(vm_id)
        payload: dict[str, Any] = {"execute": command}
        if arguments:
            payload["arguments"] = arguments
        try:
            # Outside the lock: an agent call may block for timeout_s.
            answer = libvirt_qemu.qemuAgentCommand(dom, json.dumps(payload), timeout_s, 0)
        except libvirt.libvirtError as exc:
            message = exc.get_error_message()
            if not self._alive():
                raise self._failure(f"guest agent command {command}", exc) from exc
            if error_code(exc) in _AGENT_SILENT:
                raise AgentUnavailable(
                    f"guest agent of VM {vm_id} not available: {message}"
                ) from exc
            raise DriverError(f"guest agent command {command} failed: {message}") from exc
        if answer is None:
            raise AgentUnavailable(f"guest agent of VM {vm_id} gave no answer to {command}")
        return json.loads(answer).get("return")

    def forget_storage_pool(self) -> None:
        """Stop and undefine this host's deskpool storage pool (its directory is left alone),
        for hosts or benchmarks that are done with it."""
        with self._lock, suppress(libvirt.libvirtError):
            if self._pool.isActive():
                self._pool.destroy()
            self._pool.undefine()

    def close(self) -> None:
        with self._lock:
            self._closed = True  # a step still holding this driver gets no new connection
            with suppress(libvirt.libvirtError):
                self._connection.close()


def _volume_format(vol: libvirt.virStorageVol) -> str:
    return xml.parse_volume_format(vol.XMLDesc(0))
