"""The one desktop state table.

A desktop's *state* is deskpool's lifecycle position. It is kept apart from the *task* in
flight (what a step is doing to it) and from the *power state* the hypervisor reports, as Nova
keeps vm_state, task_state and power_state apart. Every write goes through ``transition``: a
check against this table, then a compare-and-swap ``UPDATE ... WHERE state = expected`` in the
database, so two brokers (or a broker and its reconciler) can never both win a change. The
broker's claim is one too (``DesktopRepository.claim_free``), checked against the same table.
"""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Protocol

from deskpool.domain.errors import InvalidTransition, LostRace


class DesktopState(StrEnum):
    PROVISIONING = "provisioning"  # row exists; disk and VM being created
    CUSTOMIZING = "customizing"  # VM defined and booting; identity not confirmed yet
    READY = "ready"  # identity confirmed by the guest agent; waiting for a user
    RESERVED = "reserved"  # held for one user, not connected yet
    IN_USE = "in_use"  # a user is connected
    IDLE = "idle"  # user session idle past its timer
    RECYCLING = "recycling"  # reverted, kept as is, or its user layer rebased (``task``)
    RETIRING = "retiring"  # leaving service; VM and disks being removed
    RETIRED = "retired"  # gone from the hypervisor, row kept for history
    DELETING = "deleting"  # removed on an admin's request
    CHECKED_OUT = "checked_out"  # offline on a laptop; the server's copy is frozen (issue 15)
    ERROR = "error"  # a step failed; ``last_error`` says why


class DesktopTask(StrEnum):
    """What the step in flight does to a desktop (``None``: nothing)."""

    CLONE = "clone"  # provisioning: the disk and VM are being made
    BOOT = "boot"  # customizing: booting until the guest confirms its identity
    REVERT = "revert"  # recycling back to the factory snapshot
    KEEP = "as-is"  # recycling as it is (kiosks, stateful desktops)
    # recycling onto its pool's current template version: a layered desktop's user layer
    # rebased by a boot of the new version (``services.layer_rebase_boot``)
    REBASE = "rebase"
    RETIRE = "retire"  # retiring: replaced (rollout, maximum age, sizing, a failure)
    DRAIN = "drain"  # retiring: its host is draining
    HOST_DOWN = "host-down"  # retiring: its host is down
    DELETE = "delete"  # deleting on an administrator's request


S = DesktopState

TRANSITIONS: dict[DesktopState, frozenset[DesktopState]] = {
    S.PROVISIONING: frozenset({S.CUSTOMIZING, S.ERROR, S.DELETING}),
    S.CUSTOMIZING: frozenset({S.READY, S.ERROR, S.DELETING}),
    S.READY: frozenset({S.RESERVED, S.RECYCLING, S.RETIRING, S.ERROR, S.DELETING,
                        S.CHECKED_OUT}),
    S.RESERVED: frozenset({S.IN_USE, S.READY, S.RECYCLING, S.RETIRING, S.ERROR, S.DELETING}),
    S.IN_USE: frozenset({S.IDLE, S.RECYCLING, S.RETIRING, S.ERROR, S.DELETING}),
    S.IDLE: frozenset({S.IN_USE, S.RECYCLING, S.RETIRING, S.ERROR, S.DELETING}),
    S.RECYCLING: frozenset({S.READY, S.ERROR, S.DELETING}),
    S.RETIRING: frozenset({S.RETIRED, S.ERROR}),
    S.RETIRED: frozenset(),
    S.DELETING: frozenset({S.ERROR}),
    S.ERROR: frozenset({S.PROVISIONING, S.CUSTOMIZING, S.RECYCLING, S.RETIRING, S.DELETING}),
    # A state, not a side lock, so the one table and its compare-and-swap guard it like any
    # other: every broker and reconciler path that acts on a desktop names the states it acts
    # on, and none names this one. Only check-in, rollback or an administrator's forced
    # check-in (``deskpool.services.offline``) leave it, back to ready. Not even to error:
    # the laptop holds the user's newest work, and a failure here (a cut check-in) must
    # keep the lock, never hand the desktop to a repair or retire path.
    S.CHECKED_OUT: frozenset({S.READY}),
}


# Groups of states other layers reason about, kept beside the table they come from. The store
# derives its SQL (the held-desktop index, ``IN`` lists) from these sets.
HELD_STATES = frozenset({S.RESERVED, S.IN_USE, S.IDLE})  # a user has it
HAS_VM_STATES = frozenset({S.CUSTOMIZING, S.READY, S.RECYCLING}) | HELD_STATES
NOT_LIVE_STATES = frozenset({S.RETIRING, S.RETIRED, S.DELETING, S.ERROR})
PREPARING_STATES = frozenset({S.PROVISIONING, S.CUSTOMIZING, S.RECYCLING})  # on its way to ready
# Tasks during which the desktop's VM is deleted and made again (from the row, so a crash may
# leave it missing until the step runs again): no VM on its host is no vanished VM then.
VM_REMADE_TASKS = frozenset({DesktopTask.REBASE})


def check_transition(old: DesktopState, new: DesktopState) -> None:
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"a desktop cannot go from {old.value} to {new.value}")


class StateWriter(Protocol):
    """What ``transition`` needs from the store: one compare-and-swap UPDATE."""

    def compare_and_set_state(
        self, desktop_id: uuid.UUID, expected: DesktopState, new: DesktopState, *,
        task: DesktopTask | None = None, last_error: str | None = None,
    ) -> bool: ...


def transition(
    writer: StateWriter, desktop_id: uuid.UUID, old: DesktopState, new: DesktopState, *,
    task: DesktopTask | None = None, last_error: str | None = None,
) -> None:
    """Move a desktop from ``old`` to ``new``.

    Raises ``InvalidTransition`` when the table forbids the move, and ``LostRace`` when the
    row is no longer in ``old`` (someone else moved it first): the loser never overwrites the
    winner.
    """
    check_transition(old, new)
    if not writer.compare_and_set_state(desktop_id, old, new, task=task, last_error=last_error):
        raise LostRace(
            f"desktop {desktop_id} is no longer {old.value}; another actor changed it first"
        )
