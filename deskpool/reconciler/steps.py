"""How the reconciler carries out each kind of desktop step.

``planning.plan_desktop`` decides *what* a desktop needs (a ``Step``, data); ``RUNNERS`` maps
each ``StepKind`` to the method here that does it. The reconciler runs a step under its lease on
the desktop and turns what the step raises into the desktop's error state, a backoff, or
nothing (``Reconciler.run_step``); the methods here only do the work and count it.

A power step is over only when the VM is in its new power state: a claim skips a desktop only
while a reconciler holds its lease, so a step that gave the lease back while the VM was still
going down would let a user be handed a desktop that powers off under them. ``suspend_vm``
returns once the memory is saved; a graceful ``stop_vm`` only asks the guest, so ``shut_off``
waits for the VM to read off (forcing it after ``SHUTDOWN_GRACE_S``) while the lease is renewed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager

from deskpool.domain.models import PowerState
from deskpool.domain.pools import Assignment, RevertBy
from deskpool.domain.states import DesktopState, DesktopTask, transition
from deskpool.drivers.base import stop_gracefully
from deskpool.reconciler.planning import Step, StepKind
from deskpool.reconciler.report import Outcome, PassReport
from deskpool.services.context import ServiceContext
from deskpool.services.factory import FACTORY_SNAPSHOT, DesktopFactory
from deskpool.services.fileshare import FileShares
from deskpool.services.layer_usage import try_measure_layer
from deskpool.services.profile_desktops import ProfileDesktops

S = DesktopState
HostSlot = Callable[[uuid.UUID], AbstractContextManager[int]]
# A free desktop holds no one's work, so one whose guest does not shut down in this time (no
# ACPI handling, a hung guest) is forced off rather than left running against the policy.
SHUTDOWN_GRACE_S = 120.0
SHUTDOWN_POLL_S = 0.5


class StepRunner:
    """``slot(host_id)`` holds one of the host's provisioning slots while a desktop is made."""

    def __init__(self, ctx: ServiceContext, factory: DesktopFactory, *, slot: HostSlot,
                 ready_timeout_s: float, shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self.ctx = ctx
        self.factory = factory
        self.slot = slot
        self.ready_timeout_s = ready_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self.profiles = ProfileDesktops(ctx)
        self.shares = FileShares(ctx)

    def run(self, step: Step, report: PassReport) -> None:
        RUNNERS[step.kind](self, step, report)

    def provision(self, step: Step, report: PassReport) -> None:
        with self.slot(step.host_id):
            # A leftover of an interrupted run is cleared first (the contract replaces crash
            # leftovers), then the clone is made again from the row.
            self.factory.provision(step.desktop_id)
            self.factory.make_ready(step.desktop_id, timeout_s=self.ready_timeout_s)
        report.count(Outcome.READIED)

    def make_ready(self, step: Step, report: PassReport) -> None:
        with self.slot(step.host_id):
            self.factory.make_ready(step.desktop_id, timeout_s=self.ready_timeout_s)
        report.count(Outcome.READIED)

    def recycle(self, step: Step, report: PassReport) -> None:
        desktop_id = step.desktop_id
        # The user's roaming profile first: unmounted in the guest, detached, committed (or
        # set aside, the desktop powered off) before the revert throws the guest away.
        self.profiles.close(desktop_id)
        # Then the redirected folders: unmounted, and the session's share password revoked.
        self.shares.close(desktop_id)
        booted = step.task is DesktopTask.REVERT and self._reverts_by_boot(desktop_id)
        if step.task is DesktopTask.REBASE:
            # Its user layer onto the pool's version, or (failed) back on its own version:
            # either way booted, confirmed and its user's again. Safe to run again from the
            # row after a crash at any point.
            self.factory.rebase(desktop_id, timeout_s=self.ready_timeout_s)
        elif booted:  # a fresh overlay on the master, booted (no snapshot of its own)
            self.factory.revert_by_boot(desktop_id, timeout_s=self.ready_timeout_s)
        elif step.task is DesktopTask.REVERT:
            self.factory.driver_of(desktop_id).revert_to_snapshot(desktop_id, FACTORY_SNAPSHOT)
            self.factory.confirm_running(desktop_id, timeout_s=self.ready_timeout_s)
        elif step.task is DesktopTask.KEEP:
            self._measure_layer(desktop_id)
        with self.ctx.uow() as uow:
            transition(uow.desktops, desktop_id, S.RECYCLING, S.READY)
            desktop = uow.desktops.get(desktop_id)
            pool = uow.pools.get(desktop.pool_id) if desktop.pool_id else None
            if pool is None or pool.assignment is not Assignment.DEDICATED:
                desktop.assigned_user = None  # floating: back to anyone
            if step.task in (DesktopTask.REVERT, DesktopTask.REBASE):
                # Confirmed running just now: a desktop reverted after its guest shut down
                # must not read off until the next pass looks.
                desktop.power_state = PowerState.RUNNING
            if booted or step.task is DesktopTask.REBASE:  # a VM made anew: no snapshot
                desktop.has_factory_snapshot = False
            desktop.retry_count = 0
            desktop.next_attempt_at = None
            uow.commit()
        report.count(Outcome.RECYCLED)

    def _measure_layer(self, desktop_id: uuid.UUID) -> None:
        """A layered desktop kept at logoff: how full its user layer is, asked of its guest
        (nothing when the guest does not answer)."""
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            pool = uow.pools.find(desktop.pool_id) if desktop.pool_id else None
            if pool is None or not pool.user_layer_mib:
                return
            version = desktop.template_version.number
        try_measure_layer(self.ctx, self.factory.driver_of(desktop_id), desktop_id, version)

    def _reverts_by_boot(self, desktop_id: uuid.UUID) -> bool:
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            pool = uow.pools.find(desktop.pool_id) if desktop.pool_id else None
            return pool is not None and pool.revert_by == RevertBy.BOOT

    def remove(self, step: Step, report: PassReport) -> None:
        """Retiring: the VM goes, then the row says retired; retired (a crash between the
        two) or deleting: VM and row go."""
        desktop_id = step.desktop_id
        if step.state is S.RETIRING:
            self.profiles.close(desktop_id)  # as at a recycle: before the VM goes
            self.shares.close(desktop_id)
            self.factory.driver_of(desktop_id).delete_vm(desktop_id)
            with self.ctx.uow() as uow:
                transition(uow.desktops, desktop_id, S.RETIRING, S.RETIRED)
                uow.commit()
        report.count(Outcome.DELETED if step.state is S.DELETING else Outcome.RETIRED)
        self.factory.discard(desktop_id)  # VM (idempotent) and row

    def retire_failed(self, step: Step, report: PassReport) -> None:
        with self.ctx.uow() as uow:
            transition(uow.desktops, step.desktop_id, S.ERROR, S.RETIRING,
                       task=DesktopTask.RETIRE)
            uow.commit()
        self.remove(Step(StepKind.REMOVE, step.desktop_id, step.host_id, S.RETIRING,
                         DesktopTask.RETIRE), report)

    def repair(self, step: Step, report: PassReport) -> None:
        """A failed desktop holding its user's state: booted (if off) and its identity
        confirmed again; a failure puts it back in error for a later try, never away."""
        with self.ctx.uow() as uow:
            transition(uow.desktops, step.desktop_id, S.ERROR, S.CUSTOMIZING,
                       task=DesktopTask.BOOT)
            uow.commit()
        self.make_ready(step, report)

    def suspend(self, step: Step, report: PassReport) -> None:
        self.factory.driver_of(step.desktop_id).suspend_vm(step.desktop_id)
        report.count(Outcome.POWER_CHANGED)

    def shut_off(self, step: Step, report: PassReport) -> None:
        """ACPI shutdown, then wait until the VM reads off before the step (and with it the
        lease) ends; see the module's docstring. If this process dies while waiting, its lease
        expires within one lease time, by which a shutting-down guest is normally off; the
        next pass's sync records whatever power state the VM is in then."""
        desktop_id = step.desktop_id
        driver = self.factory.driver_of(desktop_id)
        stop_gracefully(driver, desktop_id, grace_s=self.shutdown_grace_s,
                        poll_s=SHUTDOWN_POLL_S)
        with self.ctx.uow() as uow:  # the row says off before the lease goes back
            uow.desktops.compare_and_set_power(desktop_id, PowerState.RUNNING,
                                               PowerState.SHUTOFF)
            uow.commit()
        report.count(Outcome.POWER_CHANGED)

    def start(self, step: Step, report: PassReport) -> None:
        self.factory.driver_of(step.desktop_id).start_vm(step.desktop_id)
        report.count(Outcome.POWER_CHANGED)


RUNNERS: dict[StepKind, Callable[[StepRunner, Step, PassReport], None]] = {
    StepKind.PROVISION: StepRunner.provision,
    StepKind.MAKE_READY: StepRunner.make_ready,
    StepKind.RECYCLE: StepRunner.recycle,
    StepKind.REMOVE: StepRunner.remove,
    StepKind.RETIRE_FAILED: StepRunner.retire_failed,
    StepKind.REPAIR: StepRunner.repair,
    StepKind.SUSPEND: StepRunner.suspend,
    StepKind.SHUT_OFF: StepRunner.shut_off,
    StepKind.START: StepRunner.start,
}
