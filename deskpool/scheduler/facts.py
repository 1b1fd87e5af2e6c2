"""What placement decides from: facts about hosts and one request."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum


class Strategy(StrEnum):
    SPREAD = "spread"  # the emptiest host first: fewer desktops lost when a host fails
    PACK = "pack"  # the fullest host that still fits: whole hosts stay free for maintenance


@dataclass(frozen=True)
class HostFacts:
    """One host as placement sees it: capacity read from the hypervisor, the admin's limits,
    what is already placed on it (counting desktops being made), and whether it answers."""

    id: uuid.UUID
    name: str
    state: str  # HostState value: enabled / draining / maintenance / down
    reachable: bool
    hypervisor: str  # libvirt's driver type, e.g. "QEMU", "TEST"
    arch: str  # e.g. "x86_64"
    cpu_model: str  # the host CPU model name (a CPU generation), "" when unknown
    domain_types: tuple[str, ...]  # e.g. ("qemu",) or ("qemu", "kvm")
    vcpus: int
    memory_mib: int
    storage_free_bytes: int
    cpu_overcommit: float  # vCPUs that may be given per physical CPU
    memory_overcommit: float  # MiB of guest memory per MiB of host memory
    max_desktops: int | None  # None: no limit besides capacity
    used_vcpus: int
    used_memory_mib: int
    desktops: int
    # Storage still to be taken by desktops placed but not yet created (linked clones take
    # little, full clones a whole image).
    pending_storage_bytes: int = 0


@dataclass(frozen=True)
class PlacementRequest:
    """One new desktop: what it needs and where it may go."""

    what: str  # for messages, e.g. "pool 'lab'"
    vcpus: int
    memory_mib: int
    storage_bytes: int
    # What the template version can run on; empty means "anything".
    hypervisors: frozenset[str] = field(default_factory=frozenset)
    arch: str | None = None
    cpu_models: frozenset[str] = field(default_factory=frozenset)
    allowed_hosts: frozenset[uuid.UUID] | None = None  # a pool pinned to these hosts
    strategy: Strategy = Strategy.SPREAD
    # Hosts holding the user's latest profile generation (roaming profiles): preferred
    # among otherwise equal hosts, so a logon there copies no layer.
    preferred_hosts: frozenset[uuid.UUID] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Placement:
    host_id: uuid.UUID
    host: str
    reason: str  # one sentence, recorded on the desktop: why this host
