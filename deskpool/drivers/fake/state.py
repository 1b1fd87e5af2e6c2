"""The fake hypervisor's records (volumes, VMs, saved guest states) and the checks it shares
with real hypervisors (what a definition may contain, how big an image is). Split from
``fake.py``; only the fake driver uses it."""

from __future__ import annotations

import hashlib
import re
import struct
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

from deskpool.domain.errors import DriverError, HypervisorUnreachable, InvalidInput, NotFound
from deskpool.domain.models import (
    ConsoleProtocol,
    PowerState,
    StopReason,
    VmRecord,
    VmSpec,
    VolumeInfo,
)
from deskpool.drivers.fake.guest import FakeGuest

_QCOW2_MAGIC = b"QFI\xfb"
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


@dataclass
class FakeVolume:
    name: str
    path: str
    capacity: int
    allocation: int
    backing: str | None = None
    sha256: str | None = None  # of an imported image's bytes (changed by ``tamper_volume``)
    # What ``read_volume`` gives: the bytes a ``receive_volume`` wrote, or the file an
    # import came from (the fake keeps metadata only; other volumes have no bytes to read).
    data: bytes | None = None
    source: str | None = None

    def info(self) -> VolumeInfo:
        return VolumeInfo(self.name, self.path, self.capacity, self.allocation, self.backing)


@dataclass(frozen=True)
class SavedGuest:
    """A guest frozen in time: a snapshot, a managed save or a captured memory state."""

    power: PowerState  # SHUTOFF for a snapshot of a VM that was off
    files: dict[str, bytes]
    had_guest: bool  # an OS was running (a VM without one restores without an agent)


@dataclass
class FakeVm:
    vm_id: uuid.UUID
    spec: VmSpec | None  # None for a VM deskpool did not create
    name: str
    power: PowerState = PowerState.SHUTOFF
    vnc_port: int | None = None  # the SPICE display listens on the port after it
    # Display passwords and their expiry, set per hand-over (lost when QEMU stops).
    console_passwords: dict[ConsoleProtocol, tuple[str, datetime]] = field(default_factory=dict)
    guest: FakeGuest | None = None  # a booted guest OS, only while active
    files: dict[str, bytes] = field(default_factory=dict)  # the guest's disk, kept across boots
    shutdown_in: int | None = None  # graceful shutdown: observations left before it is off
    saved: SavedGuest | None = None  # managed save, while power is SAVED
    snapshots: dict[str, SavedGuest] = field(default_factory=dict)
    disks: dict[str, str] = field(default_factory=dict)  # hot-plugged: serial -> file, live only
    holds_disks: bool = False  # a guest that ignores unplug requests (test control)
    stop_reason: StopReason = StopReason.OTHER  # why it last stopped (reported while off)
    # Its measured load (``load.py``): memory in use (None: its spec's), CPUs busy, and the
    # CPU time it used since its QEMU started.
    load_memory_mib: float | None = None
    load_cpus_busy: float = 0.0
    cpu_time_ns: int = 0

    def record(self) -> VmRecord:
        metadata = self.spec.metadata if self.spec is not None else None
        off = self.power in (PowerState.SHUTOFF, PowerState.CRASHED, PowerState.SAVED)
        return VmRecord(self.vm_id, self.name, self.power, metadata,
                        self.stop_reason if off else None)


def read_source(source: Path) -> tuple[int, int, str]:
    """(file size, virtual size, sha256) of a local image; qcow2 reports its virtual size."""
    digest = hashlib.sha256()
    try:
        with source.open("rb") as fh:
            head = fh.read(32)
            digest.update(head)
            size = len(head)
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise NotFound(f"image file {source} does not exist") from None
    except OSError as exc:
        raise DriverError(f"cannot read image file {source}: {exc.strerror}") from exc
    capacity = size
    if len(head) == 32 and head[:4] == _QCOW2_MAGIC:
        (capacity,) = struct.unpack(">Q", head[24:32])
    return size, capacity, digest.hexdigest()


def check_definition(spec: VmSpec) -> None:
    """What libvirt's XML validation rejects when the VM is defined."""
    problem = None
    if not spec.name or "/" in spec.name or "\n" in spec.name:
        problem = f"name {spec.name!r} is empty or contains '/' or a newline"
    elif not _MAC_RE.match(spec.mac):
        problem = f"unable to parse mac address {spec.mac!r}"
    elif spec.vcpus < 1 or spec.memory_mib < 1:
        problem = "a VM needs at least one vCPU and some memory"
    if problem:
        raise DriverError(f"defining VM {spec.name!r} failed: XML error: {problem}")


@dataclass(frozen=True)
class FakeShape:
    """A fake host's size and kind, from its URI's query, e.g.
    ``fake://h?vcpus=16&memory_mib=65536&storage_gib=500&hypervisor=FAKE&arch=x86_64
    &cpu_model=Skylake&agent_delay_polls=2`` (placement tests of mixed hosts);
    ``shared_storage=NAME`` for hosts on one shared storage (``shared.py``)."""

    vcpus: int
    memory_mib: int
    storage_bytes: int
    agent_delay_polls: int
    hypervisor: str = "FAKE"
    arch: str = "x86_64"
    cpu_model: str = ""
    shared_storage: str = ""  # hosts naming the same one see one set of volumes

    @classmethod
    def parse(cls, uri: str, *, vcpus: int, memory_mib: int, storage_bytes: int,
              agent_delay_polls: int) -> FakeShape:
        if not uri.startswith("fake://"):
            raise HypervisorUnreachable(f"{uri!r} is not a fake:// URI")
        query = dict(parse_qsl(urlparse(uri).query))
        try:
            shape = cls(
                vcpus=int(query.get("vcpus", vcpus)),
                memory_mib=int(query.get("memory_mib", memory_mib)),
                storage_bytes=(int(query["storage_gib"]) * 1024**3 if "storage_gib" in query
                               else storage_bytes),
                agent_delay_polls=int(query.get("agent_delay_polls", agent_delay_polls)),
                hypervisor=query.get("hypervisor", "FAKE"), arch=query.get("arch", "x86_64"),
                cpu_model=query.get("cpu_model", ""),
                shared_storage=query.get("shared_storage", ""))
        except ValueError as exc:
            raise HypervisorUnreachable(f"{uri!r}: bad fake host shape ({exc})") from None
        if shape.agent_delay_polls < 0:
            raise InvalidInput("agent_delay_polls must be 0 or more")
        return shape
