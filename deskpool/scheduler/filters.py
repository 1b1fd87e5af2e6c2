"""Filters: each removes the hosts that cannot take the desktop, and says why in a few words.

Like Nova's filter scheduler, a host is rejected by the first filter it fails (in the order of
``DEFAULT_FILTERS``), so the "no valid host" message counts every host once.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

from deskpool.domain.models import HostState
from deskpool.scheduler.facts import HostFacts, PlacementRequest

GIB = 1024**3


def format_number(x: float) -> str:
    """32.0 -> "32", 7.5 -> "7.5"."""
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def format_mib(mib: float) -> str:
    if mib >= 1024 or mib <= -1024:
        return f"{format_number(round(mib / 1024, 1))} GiB"
    return f"{format_number(mib)} MiB"


def format_bytes(n: int) -> str:
    return format_mib(n / 1024**2)


def vcpu_limit(host: HostFacts) -> float:
    return host.vcpus * host.cpu_overcommit


def memory_limit(host: HostFacts) -> float:
    return host.memory_mib * host.memory_overcommit


def room(host: HostFacts, request: PlacementRequest) -> int:
    """How many more desktops like ``request`` the host's capacity holds (filters aside)."""
    fits: list[int] = []
    if request.vcpus > 0:
        fits.append(_times(vcpu_limit(host) - host.used_vcpus, request.vcpus))
    if request.memory_mib > 0:
        fits.append(_times(memory_limit(host) - host.used_memory_mib, request.memory_mib))
    if request.storage_bytes > 0:
        spare = host.storage_free_bytes - host.pending_storage_bytes
        fits.append(_times(spare, request.storage_bytes))
    if host.max_desktops is not None:
        fits.append(max(0, host.max_desktops - host.desktops))
    return min(fits) if fits else 1_000_000


def _times(spare: float, each: int) -> int:
    # The small slack keeps float limits such as 7.5 vCPUs from losing one to rounding.
    return max(0, math.floor(spare / each + 1e-9))


class HostFilter(ABC):
    """``reject`` returns None when the host passes, else a short reason naming the host."""

    name: ClassVar[str]
    singular: ClassVar[str]  # "1 host <singular>", e.g. "lacks memory"
    plural: ClassVar[str]  # "3 hosts <plural>", e.g. "lack memory"

    @abstractmethod
    def reject(self, host: HostFacts, request: PlacementRequest) -> str | None: ...

    def __repr__(self) -> str:
        return f"<filter {self.name}>"


class StateFilter(HostFilter):
    name = "state"
    singular = "is not enabled"
    plural = "are not enabled"

    def reject(self, host: HostFacts, request: PlacementRequest) -> str | None:
        return None if host.state == HostState.ENABLED else f"{host.name} is {host.state}"


class ReachableFilter(HostFilter):
    name = "reachable"
    singular = "is unreachable"
    plural = "are unreachable"

    def reject(self, host: HostFacts, request: PlacementRequest) -> str | None:
        return None if host.reachable else f"{host.name} does not answer"


class AllowedHostsFilter(HostFilter):
    name = "allowed_hosts"
    singular = "is not among the pinned hosts"
    plural = "are not among the pinned hosts"

    def reject(self, host: HostFacts, request: PlacementRequest) -> str | None:
        allowed = request.allowed_hosts
        if allowed is None or host.id in allowed:
            return None
        n = len(allowed)
        if n == 0:
            return f"{request.what} is pinned to no host"
        hosts = "host" if n == 1 else "hosts"
        return f"{host.name} is not one of the {n} {hosts} {request.what} is pinned to"


class CompatibilityFilter(HostFilter):
    name = "compatibility"
    singular = "is incompatible"
    plural = "are incompatible"

    def reject(self, host: HostFacts, request: PlacementRequest) -> str | None:
        if request.hypervisors and host.hypervisor not in request.hypervisors:
            needs = " or ".join(sorted(request.hypervisors))
            return f"{host.name} runs {host.hypervisor}, the template needs {needs}"
        if request.arch is not None and host.arch != request.arch:
            return f"{host.name} is {host.arch}, the template needs {request.arch}"
        if request.cpu_models and host.cpu_model not in request.cpu_models:
            needs = " or ".join(sorted(request.cpu_models))
            model = host.cpu_model or "an unknown CPU"
            return f"{host.name} has {model}, the template needs {needs}"
        if not host.domain_types:
            return f"{host.name} offers no domain type"
        return None


class VcpuFilter(HostFilter):
    name = "vcpus"
    singular = "lacks vCPUs"
    plural = "lack vCPUs"

    def reject(self, host: HostFacts, request: PlacementRequest) -> str | None:
        limit = vcpu_limit(host)
        if host.used_vcpus + request.vcpus <= limit:
            return None
        return (f"{host.name}: {host.used_vcpus} of {format_number(limit)} vCPUs used, "
                f"{request.vcpus} asked")


class MemoryFilter(HostFilter):
    name = "memory"
    singular = "lacks memory"
    plural = "lack memory"

    def reject(self, host: HostFacts, request: PlacementRequest) -> str | None:
        limit = memory_limit(host)
        if host.used_memory_mib + request.memory_mib <= limit:
            return None
        return (f"{host.name}: {host.used_memory_mib} of {format_number(limit)} MiB used, "
                f"{request.memory_mib} asked")


class DesktopCountFilter(HostFilter):
    name = "desktops"
    singular = "is full"
    plural = "are full"

    def reject(self, host: HostFacts, request: PlacementRequest) -> str | None:
        if host.max_desktops is None or host.desktops < host.max_desktops:
            return None
        return f"{host.name} has {host.desktops} of {host.max_desktops} desktops"


class StorageFilter(HostFilter):
    name = "storage"
    singular = "lacks storage"
    plural = "lack storage"

    def reject(self, host: HostFacts, request: PlacementRequest) -> str | None:
        if host.pending_storage_bytes + request.storage_bytes <= host.storage_free_bytes:
            return None
        return (f"{host.name}: {format_bytes(host.storage_free_bytes)} free, "
                f"{format_bytes(host.pending_storage_bytes)} promised, "
                f"{format_bytes(request.storage_bytes)} asked")


DEFAULT_FILTERS: tuple[HostFilter, ...] = (
    StateFilter(),
    ReachableFilter(),
    AllowedHostsFilter(),
    CompatibilityFilter(),
    VcpuFilter(),
    MemoryFilter(),
    DesktopCountFilter(),
    StorageFilter(),
)


def first_rejection(
    host: HostFacts, request: PlacementRequest, filters: tuple[HostFilter, ...]
) -> tuple[HostFilter, str] | None:
    """The first filter that rejects the host and its reason, or None when the host passes."""
    for f in filters:
        reason = f.reject(host, request)
        if reason is not None:
            return f, reason
    return None
