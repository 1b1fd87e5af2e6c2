"""Placement from the database: host facts (capacity, limits, what is already there) are read
once per unit of work, each pick goes through the scheduler's filters and weighers, and the
chosen host's usage is updated in memory so the next pick in the same pass sees it. Picks for
the same request in a row reuse the scheduler's board (the hosts filtered and weighed once,
then only the chosen host re-checked), as ``place_many`` does: the same answers, without
weighing every host again for each of thousands of desktops."""

from __future__ import annotations

import uuid

from deskpool.domain.models import CloneMode
from deskpool.scheduler.facts import HostFacts, Placement, PlacementRequest, Strategy
from deskpool.scheduler.filters import DEFAULT_FILTERS
from deskpool.scheduler.placement import _Board
from deskpool.scheduler.weighers import weighers_for
from deskpool.services.hosts import LIVE_STATES, incompatibility
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Host, TemplateVersion

# What a linked or instant clone takes on its host's storage at first (its overlay grows).
OVERLAY_BYTES = 256 * 1024 * 1024


def storage_need(version: TemplateVersion, clone_mode: CloneMode) -> int:
    return version.image_size_bytes if clone_mode is CloneMode.FULL else OVERLAY_BYTES


class Placer:
    def __init__(self, uow: UnitOfWork, *, reachable: set[uuid.UUID] | None = None) -> None:
        self.uow = uow
        usage = uow.host_usage.usage(LIVE_STATES)
        self.hosts: dict[uuid.UUID, Host] = {h.id: h for h in uow.hosts.list()}
        self.facts: dict[uuid.UUID, HostFacts] = {}
        for host in self.hosts.values():
            vcpus, memory, count = usage.get(host.id, (0, 0, 0))
            self.facts[host.id] = HostFacts(
                id=host.id, name=host.name, state=host.state.value,
                reachable=reachable is None or host.id in reachable,
                hypervisor=host.hypervisor.upper(), arch=host.arch, cpu_model=host.cpu_model,
                domain_types=tuple(t for t in host.domain_types.split(",") if t),
                vcpus=host.vcpus, memory_mib=host.memory_mib,
                storage_free_bytes=host.storage_free_bytes,
                cpu_overcommit=host.cpu_overcommit, memory_overcommit=host.memory_overcommit,
                max_desktops=host.max_desktops, used_vcpus=int(vcpus),
                used_memory_mib=int(memory), desktops=int(count))
        self._board: tuple[PlacementRequest, _Board] | None = None  # the last request's

    def place(self, version: TemplateVersion, clone_mode: CloneMode, *, what: str,
              allowed: set[uuid.UUID] | None = None,
              strategy: Strategy = Strategy.SPREAD,
              prefer: frozenset[uuid.UUID] = frozenset()) -> tuple[Host, Placement]:
        """The host for one new desktop, and why; ``NoValidHost`` (a ``Conflict``) naming
        what ruled each host out. ``prefer``: hosts holding the profile of the user it is
        for, preferred among otherwise equal ones (``ProfileHolderWeigher``)."""
        runs_on = frozenset(t.strip().upper() for t in version.runs_on.split(",")
                            if t.strip())
        request = PlacementRequest(
            what=what, vcpus=version.vcpus, memory_mib=version.memory_mib,
            storage_bytes=storage_need(version, clone_mode),
            hypervisors=runs_on, arch=version.arch or None,
            allowed_hosts=frozenset(allowed) if allowed else None, strategy=strategy,
            preferred_hosts=prefer)
        if self._board is None or self._board[0] != request:
            self._board = (request, _Board(request, list(self.facts.values()),
                                           DEFAULT_FILTERS, weighers_for(request)))
        board = self._board[1]
        pos = board.pick()
        chosen, i = board.placement(pos), board.candidates[pos]
        board.take(pos)  # the chosen host with this desktop on it, re-checked
        self.facts[chosen.host_id] = board.hosts[i]
        return self.hosts[chosen.host_id], chosen


__all__ = ["Placer", "incompatibility", "storage_need"]
