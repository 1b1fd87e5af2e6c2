"""What one reconcile pass did: counts by outcome, and the problems it met.

Steps run in parallel threads, so every write goes through the report's lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    """Something a pass did to one desktop or VM, counted in its report."""

    CREATED = "created"  # a pool desktop's row written (provisioning)
    READIED = "readied"  # provisioned or booted until its identity was confirmed
    RECYCLED = "recycled"
    RETIRED = "retired"
    DELETED = "deleted"  # removed on an administrator's request
    POWER_CHANGED = "power changed"  # seen changed on the hypervisor, or changed by policy
    VANISHED = "vanished"  # its VM disappeared behind deskpool's back
    CRASHED = "crashed"  # its VM's QEMU ended without being asked to (marked error)
    RESET = "reset"  # a stateless desktop whose guest stopped from inside (reverted)
    MIGRATED = "migrated"  # moved live to another host (a draining host's)
    BALANCED = "balanced"  # moved live off a host under memory or CPU pressure
    ADOPTED = "adopted"  # its VM found on another host after an interrupted live migration
    HA_RESTARTED = "HA restarted"  # a down host's stateful desktop started on a host sharing
    #                                its storage
    HA_FORGOTTEN = "HA forgotten"  # such a desktop's stale definition removed from its old host
    ORPHAN_REMOVED = "orphan removed"  # a deskpool VM without a row: a crash's leftover


@dataclass
class PassReport:
    counts: Counter[Outcome] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Programming errors (anything not a ``DeskpoolError``) a step raised; their messages are
    # in ``errors`` too, their traces in the log.
    bugs: int = 0
    # Steps still running when the pass stopped waiting (they go on in the background), and
    # whether the pass is over (what such a step reports later is logged, not returned).
    steps_running: int = 0
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, outcome: Outcome) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def bug(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)
            self.bugs += 1

    # The counts by the names the CLI and the tests read.
    @property
    def created(self) -> int:
        return self.counts[Outcome.CREATED]

    @property
    def readied(self) -> int:
        return self.counts[Outcome.READIED]

    @property
    def recycled(self) -> int:
        return self.counts[Outcome.RECYCLED]

    @property
    def retired(self) -> int:
        return self.counts[Outcome.RETIRED]

    @property
    def deleted(self) -> int:
        return self.counts[Outcome.DELETED]

    @property
    def power_changes(self) -> int:
        return self.counts[Outcome.POWER_CHANGED]

    @property
    def vanished(self) -> int:
        return self.counts[Outcome.VANISHED]

    @property
    def orphans_removed(self) -> int:
        return self.counts[Outcome.ORPHAN_REMOVED]
