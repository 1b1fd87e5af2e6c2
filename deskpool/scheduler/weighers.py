"""Weighers rank the hosts that passed the filters, the way Nova's filter scheduler does.

Each weigher gives every candidate a raw value (higher is better). The raw values are normalized
to 0..1 over the candidate set (all 0 when they are all equal) and multiplied by the weigher's
multiplier; the host with the highest sum wins, ties going to the first host by name.

The strategy weigher's multiplier is larger than the others' together, so it decides whenever the
candidates' used fractions differ: PACK keeps filling the host it started on until it is full, and
SPREAD picks a host whose used fraction is within ``(sum of other multipliers) / strategy
multiplier`` of the candidates' range above the least used one. Free memory and load only decide
among hosts the strategy cannot tell apart (e.g. all empty: the biggest host is started first).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from deskpool.scheduler.facts import HostFacts, PlacementRequest, Strategy
from deskpool.scheduler.filters import format_mib, memory_limit, room, vcpu_limit


def normalize(values: Sequence[float]) -> list[float]:
    """Nova's normalization: min -> 0, max -> 1; all 0 when every value is the same."""
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.0] * len(values)
    span = hi - lo
    return [(v - lo) / span for v in values]


def used_fraction(host: HostFacts, request: PlacementRequest) -> float:
    """How full the host is in the resource that limits desktops like ``request``: the largest
    of used/limit over the resources the request asks for, and the desktop count limit."""
    parts = [0.0]
    if request.vcpus > 0:
        parts.append(_fraction(host.used_vcpus, vcpu_limit(host)))
    if request.memory_mib > 0:
        parts.append(_fraction(host.used_memory_mib, memory_limit(host)))
    if request.storage_bytes > 0:
        parts.append(_fraction(host.pending_storage_bytes, host.storage_free_bytes))
    if host.max_desktops is not None:
        parts.append(_fraction(host.desktops, host.max_desktops))
    return max(parts)


def _fraction(used: float, limit: float) -> float:
    return used / limit if limit > 0 else 1.0


def desktop_limit(host: HostFacts, request: PlacementRequest) -> int:
    """The admin's limit, or else how many desktops like ``request`` the host holds in all."""
    if host.max_desktops is not None:
        return host.max_desktops
    return host.desktops + room(host, request)


class Weigher(ABC):
    name: ClassVar[str]

    def __init__(self, multiplier: float = 1.0) -> None:
        self.multiplier = multiplier

    @abstractmethod
    def raw(self, host: HostFacts, request: PlacementRequest) -> float:
        """Higher is better, in any unit: only the order and spacing among candidates count."""

    @abstractmethod
    def describe(self, host: HostFacts, request: PlacementRequest, best: bool) -> str:
        """A few words for the placement reason; ``best``: this host has the top raw value."""

    def __repr__(self) -> str:
        return f"<weigher {self.name} x{self.multiplier}>"


class FreeMemoryWeigher(Weigher):
    """Most free memory (after overcommit) first, in absolute MiB: big hosts take more."""

    name = "free_memory"

    def raw(self, host: HostFacts, request: PlacementRequest) -> float:
        return memory_limit(host) - host.used_memory_mib

    def describe(self, host: HostFacts, request: PlacementRequest, best: bool) -> str:
        free, limit = format_mib(self.raw(host, request)), format_mib(memory_limit(host))
        return f"most free memory ({free} of {limit})" if best else f"{free} of {limit} free"


class LoadWeigher(Weigher):
    """Fewest desktops relative to the host's desktop limit first."""

    name = "load"

    def raw(self, host: HostFacts, request: PlacementRequest) -> float:
        limit = desktop_limit(host, request)
        return -(host.desktops / limit) if limit > 0 else -1.0

    def describe(self, host: HostFacts, request: PlacementRequest, best: bool) -> str:
        if host.max_desktops is not None:
            return f"{host.desktops} of {host.max_desktops} desktops"
        return f"{host.desktops} desktops, room for {room(host, request)} more"


class StrategyWeigher(Weigher):
    """SPREAD: the least used host (by fraction of its own capacity, so a big host takes
    proportionally more desktops). PACK: the most used host that still fits."""

    name = "strategy"

    def raw(self, host: HostFacts, request: PlacementRequest) -> float:
        used = used_fraction(host, request)
        return used if request.strategy == Strategy.PACK else -used

    def describe(self, host: HostFacts, request: PlacementRequest, best: bool) -> str:
        return f"{request.strategy.value} ({used_fraction(host, request):.0%} used)"


class ProfileHolderWeigher(Weigher):
    """A host holding the user's latest profile generation (``preferred_hosts``) first: a
    logon there copies no profile layer. Its multiplier is below each other's, so it
    decides among hosts the others cannot tell apart, or that they split evenly."""

    name = "profile_holder"

    def raw(self, host: HostFacts, request: PlacementRequest) -> float:
        return 1.0 if host.id in request.preferred_hosts else 0.0

    def describe(self, host: HostFacts, request: PlacementRequest, best: bool) -> str:
        return ("holds the user's profile" if host.id in request.preferred_hosts
                else "would copy the user's profile")


STRATEGY_MULTIPLIER = 10.0

DEFAULT_WEIGHERS: tuple[Weigher, ...] = (
    FreeMemoryWeigher(1.0),
    LoadWeigher(1.0),
    StrategyWeigher(STRATEGY_MULTIPLIER),
)
# For a desktop made for a user whose roaming profile some hosts hold. Only then: a weigher
# that adds nothing still loosens SPREAD's bound (tests/unit/test_scheduler_scale.py).
PROFILE_WEIGHERS: tuple[Weigher, ...] = (*DEFAULT_WEIGHERS[:2], ProfileHolderWeigher(0.5),
                                          DEFAULT_WEIGHERS[2])


def weighers_for(request: PlacementRequest) -> tuple[Weigher, ...]:
    """The weighers a request is ranked by: the profile holder's only when it prefers."""
    return PROFILE_WEIGHERS if request.preferred_hosts else DEFAULT_WEIGHERS
