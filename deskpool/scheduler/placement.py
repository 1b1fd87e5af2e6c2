"""Placement: filter the hosts, weigh the rest, take the best, and say why in one sentence.

``place`` places one desktop; ``place_many`` places several one after another, each seeing the
desktops placed before it. Both go through ``_Board``, which filters and weighs every host once
and afterwards only re-checks the host that was just chosen (the only one that changed), so a
pick costs a few cheap passes of arithmetic over the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from deskpool.domain.errors import Conflict, InvalidInput
from deskpool.scheduler.facts import HostFacts, Placement, PlacementRequest
from deskpool.scheduler.filters import DEFAULT_FILTERS, HostFilter, first_rejection
from deskpool.scheduler.weighers import Weigher, weighers_for


class NoValidHost(Conflict):
    """No host passes the filters. ``rejected`` counts the hosts each filter rejected (filter
    name -> count, in filter order); ``placed`` holds what ``place_many`` placed before."""

    def __init__(self, message: str, rejected: dict[str, int],
                 placed: Sequence[Placement] = ()) -> None:
        super().__init__(message)
        self.rejected = rejected
        self.placed = tuple(placed)


def consume(host: HostFacts, request: PlacementRequest) -> HostFacts:
    """The host with one more desktop like ``request`` placed on it."""
    return replace(
        host,
        used_vcpus=host.used_vcpus + request.vcpus,
        used_memory_mib=host.used_memory_mib + request.memory_mib,
        desktops=host.desktops + 1,
        pending_storage_bytes=host.pending_storage_bytes + request.storage_bytes,
    )


def place(
    request: PlacementRequest,
    hosts: Sequence[HostFacts],
    *,
    filters: tuple[HostFilter, ...] = DEFAULT_FILTERS,
    weighers: tuple[Weigher, ...] | None = None,
) -> Placement:
    """The best host for one desktop; raises NoValidHost when no host passes the filters."""
    board = _Board(request, hosts, filters, weighers or weighers_for(request))
    return board.placement(board.pick())


def place_many(
    request: PlacementRequest,
    hosts: Sequence[HostFacts],
    count: int,
    *,
    filters: tuple[HostFilter, ...] = DEFAULT_FILTERS,
    weighers: tuple[Weigher, ...] | None = None,
) -> list[Placement]:
    """Places ``count`` desktops one by one, each pick seeing the ones before it (the same
    answers as calling ``place`` ``count`` times, consuming the chosen host in between).
    Raises NoValidHost, with the placements made so far in ``placed``, when the hosts fill up."""
    if count < 0:
        raise InvalidInput(f"cannot place {count} desktops")
    board = _Board(request, hosts, filters, weighers or weighers_for(request))
    placed: list[Placement] = []
    for _ in range(count):
        try:
            pos = board.pick()
        except NoValidHost as exc:
            raise NoValidHost(
                f"{exc} (after placing {len(placed)} of {count} desktops)",
                exc.rejected, placed,
            ) from None
        placed.append(board.placement(pos))
        board.take(pos)
    return placed


class _Board:
    """The hosts during one placement run, sorted by name (ties go to the first): which pass,
    each candidate's raw weight per weigher, and why each other host was rejected."""

    def __init__(self, request: PlacementRequest, hosts: Sequence[HostFacts],
                 filters: tuple[HostFilter, ...], weighers: tuple[Weigher, ...]) -> None:
        self.request = request
        self.filters = filters
        self.weighers = weighers
        self.hosts = sorted(hosts, key=lambda h: (h.name, str(h.id)))
        self.rejected: dict[int, tuple[HostFilter, str]] = {}  # host index -> filter, reason
        self.candidates: list[int] = []  # host indexes, in name order
        self.raws: list[list[float]] = [[] for _ in weighers]  # [weigher][candidate position]
        self.best_raw: list[float] = [0.0] * len(weighers)  # set by pick()
        for i, host in enumerate(self.hosts):
            rejection = first_rejection(host, request, filters)
            if rejection is not None:
                self.rejected[i] = rejection
                continue
            self.candidates.append(i)
            for raws, weigher in zip(self.raws, weighers, strict=True):
                raws.append(weigher.raw(host, request))

    def pick(self) -> int:
        """The position (in ``candidates``) of the best candidate."""
        n = len(self.candidates)
        if n == 0:
            raise self._no_valid_host()
        scores = [0.0] * n
        for j, (raws, weigher) in enumerate(zip(self.raws, self.weighers, strict=True)):
            lo, hi = min(raws), max(raws)
            self.best_raw[j] = hi
            if hi > lo:  # all equal: every candidate gets 0 from this weigher
                k = weigher.multiplier / (hi - lo)
                scores = [s + (v - lo) * k for s, v in zip(scores, raws, strict=True)]
        return max(range(n), key=scores.__getitem__)  # the first maximum: by name

    def placement(self, pos: int) -> Placement:
        host = self.hosts[self.candidates[pos]]
        parts = [
            weigher.describe(host, self.request, self.raws[j][pos] >= self.best_raw[j])
            for j, weigher in enumerate(self.weighers)
        ]
        fit = len(self.candidates)
        if fit == 1:
            parts.append("the only host that fits")
        else:
            parts.append(f"{fit} of {len(self.hosts)} hosts fit")
        return Placement(host.id, host.name, f"host {host.name}: {', '.join(parts)}")

    def take(self, pos: int) -> None:
        """Places one desktop on the candidate at ``pos`` and re-checks that host alone."""
        i = self.candidates[pos]
        host = self.hosts[i] = consume(self.hosts[i], self.request)
        rejection = first_rejection(host, self.request, self.filters)
        if rejection is None:
            for raws, weigher in zip(self.raws, self.weighers, strict=True):
                raws[pos] = weigher.raw(host, self.request)
            return
        self.rejected[i] = rejection
        del self.candidates[pos]
        for raws in self.raws:
            del raws[pos]

    def _no_valid_host(self) -> NoValidHost:
        parts: list[str] = []
        counts: dict[str, int] = {}
        for f in self.filters:
            reasons = [self.rejected[i][1] for i in sorted(self.rejected)
                       if self.rejected[i][0] is f]
            if not reasons:
                continue
            n = len(reasons)
            counts[f.name] = n
            verb = f.singular if n == 1 else f.plural
            noun = "" if parts else (" host" if n == 1 else " hosts")
            parts.append(f"{n}{noun} {verb} ({reasons[0]})")
        detail = ", ".join(parts) if parts else "there are no hosts"
        return NoValidHost(f"no host can take a desktop for {self.request.what}: {detail}",
                           counts)
