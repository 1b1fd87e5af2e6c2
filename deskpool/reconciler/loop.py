"""The reconciler: one pass brings the database and the hypervisors back in line.

A pass (1) syncs every host: power state from the hypervisor (the authority), desktops whose VM
vanished, VMs whose QEMU died under a desktop (``crashes``), and deskpool VMs the database does
not know (left by a crash); (2) plans each pool
(rollout, maximum age, sizing); (3) runs at most one step per desktop, desktops in parallel:
finish provisioning, recycle, retire, delete, apply power policy, retry errors after their
backoff; (4) every balance interval, when balancing is on, moves running desktops live off
hosts under memory or CPU pressure (``balancing``). Each step has its own deadline (a guest
agent's readiness, a shutdown's grace); a looping reconciler waits at most one interval for
a pass's steps, and a step still running then goes on in the background while later passes
leave its desktop alone, so one desktop whose guest never answers holds up no other desktop
or pool. Everything it needs to resume is
in the database, so a killed process loses nothing: the next pass continues from the rows.
Which step a desktop needs is data (``planning.plan_desktop``); how each kind is carried out
is ``steps.RUNNERS``.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial

from deskpool.domain.errors import (
    DeskpoolError,
    DriverError,
    HostConnectionLost,
    LostRace,
    NotFound,
    TemporaryError,
    VmNotFound,
)
from deskpool.domain.models import HostState, PoolStatus, VmRecord
from deskpool.domain.pools import PoolKind
from deskpool.domain.states import (
    HAS_VM_STATES,
    TRANSITIONS,
    VM_REMADE_TASKS,
    DesktopState,
    DesktopTask,
    transition,
)
from deskpool.drivers.base import HypervisorDriver
from deskpool.reconciler import metrics
from deskpool.reconciler.balancing import Balancing
from deskpool.reconciler.crashes import (
    CRASH_WATCHED_STATES,
    crashed,
    death_of,
    reset_stateless,
    stopped_from_inside,
)
from deskpool.reconciler.ha import HaRestarts
from deskpool.reconciler.hosts import HostWatch
from deskpool.reconciler.maintenance import ProfileUpkeep
from deskpool.reconciler.moves import DrainMoves, adopt_moved
from deskpool.reconciler.planning import (
    MAX_BACKOFF,
    DesktopFacts,
    Step,
    backoff,
    plan_desktop,
    plan_pool,
)
from deskpool.reconciler.recovery import recover_leftovers
from deskpool.reconciler.report import Outcome, PassReport
from deskpool.reconciler.steps import StepRunner
from deskpool.scheduler.balancer import BalancePolicy
from deskpool.scheduler.placement import NoValidHost
from deskpool.services import template_faults
from deskpool.services.context import ServiceContext
from deskpool.services.factory import DesktopFactory
from deskpool.services.host_slots import HOLD_FOR, SlotKind, host_slot
from deskpool.services.placement import Placer
from deskpool.services.pool_admin import finish_deletion
from deskpool.services.pools import failed_rebases, insert_pool_desktop, pool_spec
from deskpool.services.renewal import renewed_while_running
from deskpool.store.db import DatabaseUnavailable, UnitOfWork
from deskpool.store.desktops import DesktopSummary
from deskpool.store.leases import Leased
from deskpool.store.models import Desktop, Host

# PassReport, backoff: where callers found them first
__all__ = ["MAX_BACKOFF", "PassReport", "Reconciler", "backoff"]

log = logging.getLogger(__name__)
S = DesktopState
# How soon a step cut short by a lost host connection is taken again.
HOST_RETRY = timedelta(seconds=5)

@contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic garbage collection while a pass reads the fleet: it allocates objects per
    desktop, and every full collection it would trigger scans the whole process heap (which
    grows with the fleet too), making a pass grow faster than the fleet. What the pass leaves
    behind is collected as usual afterwards. (Not around the actions: those may take minutes.)
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# The states a desktop may be in while a step that started in the key state still runs: a
# failure there is the step's. A desktop past them finished its step and is left alone.
_STEP_PATHS: dict[DesktopState, frozenset[DesktopState]] = {
    S.PROVISIONING: frozenset({S.PROVISIONING, S.CUSTOMIZING}),
    # A failed pool desktop being retired, or repaired (booted and confirmed again).
    S.ERROR: frozenset({S.ERROR, S.RETIRING, S.CUSTOMIZING}),
}


class Reconciler:
    """Timings left out come from the deployment's settings (``ctx.settings``)."""

    def __init__(
        self, ctx: ServiceContext, *, workers: int = 4, ready_timeout_s: float | None = None,
        provisioning_per_host: int = 2, clock: Callable[[], datetime] | None = None,
        host_down_after: timedelta | None = None, lease: timedelta | None = None,
        move_on_drain: bool | None = None, balance: BalancePolicy | None = None,
    ) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.workers = workers
        self.ready_timeout_s = (settings.ready_timeout_s if ready_timeout_s is None
                                else ready_timeout_s)
        self.provisioning_per_host = provisioning_per_host
        self.clock = clock or (lambda: datetime.now(UTC))
        self.factory = DesktopFactory(ctx, clock=self.clock)
        self.hosts = HostWatch(ctx, self.clock, down_after=host_down_after
                               or timedelta(seconds=settings.host_down_after_s),
                               move_on_drain=(settings.drain_by_migration
                                              if move_on_drain is None else move_on_drain))
        # Several brokers share the work through leases on pools and desktops, renewed while
        # a step runs (a live broker keeps its lease however long the step takes); the lease
        # time is how soon others take over the work of a broker that died.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = lease or timedelta(seconds=settings.lease_s)
        self.moves = DrainMoves(ctx, self.clock)
        # Desktops moved off hosts under load, every balance interval (``balance`` overrides
        # the settings' policy).
        self.balancing = Balancing(ctx, self.clock, policy=balance)
        self.ha = HaRestarts(ctx, self.clock, retry_after=timedelta(seconds=settings.ha_retry_s))
        self.steps = StepRunner(ctx, self.factory, slot=self._slot,
                                ready_timeout_s=self.ready_timeout_s)
        # Flatten, sweep and verify roaming profiles now and then, in the background.
        self.profile_upkeep = ProfileUpkeep(ctx, owner=self.owner, lease=self.lease,
                                            clock=self.clock)
        # Steps run on one pool of threads that outlives a pass, so a pass need not wait for
        # a slow one; ``_in_flight`` is each desktop whose step still runs.
        self._executor = ThreadPoolExecutor(max_workers=workers,
                                            thread_name_prefix="reconcile-step")
        self._in_flight: dict[uuid.UUID, Future[None]] = {}
        self._flight_lock = threading.Lock()
        # A reconciler dropped without close() does not keep its idle threads.
        weakref.finalize(self, self._executor.shutdown, wait=False)

    # --- the pass --------------------------------------------------------------------------

    def run_pass(self, *, wait_s: float | None = None) -> PassReport:
        """One pass. ``wait_s`` bounds how long it waits for its steps: a step still running
        then goes on in the background (under its own deadline and lease) and its desktop is
        left alone by later passes until it ends; what it reports after the pass is logged.
        ``None`` waits for every step (one-off passes, tests)."""
        report = PassReport()
        started = time.monotonic()
        try:
            with gc_paused():
                reachable, to_move = self._sync_hosts(report)
                self._plan_pools(report, reachable)
                steps = self._collect_steps(report, reachable)
            futures = [self._submit(step.desktop_id, partial(self.run_step, step, report),
                                    report)
                       for step in steps if not self.in_flight(step.desktop_id)]
            futures += [self._submit(d_id, partial(self.moves.move, d_id, report), report)
                        for d_id in to_move if not self.in_flight(d_id)]
            futures += [self._submit(m.desktop_id, partial(self.balancing.move, m, report),
                                     report)
                        for m in self.balancing.plan(reachable, report, self.in_flight)]
            futures += [self._submit(d_id, partial(self.ha.restart, d_id, reachable, report),
                                     report) for d_id in self.ha.plan(self.in_flight)]
            done, running = wait(futures, timeout=wait_s)
            report.steps_running = len(running)
            for future in done:  # what escaped a step (run_step keeps Exceptions) goes on up
                future.result()
            recover_leftovers(self.ctx, self.steps, report)
            self.profile_upkeep.tick(report, wait_s)
        except Exception:
            metrics.PASS_FAILURES.inc()
            raise
        finally:
            report.closed = True
            metrics.PASS_SECONDS.observe(time.monotonic() - started)
        metrics.PASS_ERRORS.inc(len(report.errors) - report.bugs)
        metrics.PASS_BUGS.inc(report.bugs)
        return report

    def run_forever(
        self, stop: threading.Event, interval_s: float = 10.0,
        on_report: Callable[[PassReport], None] | None = None,
    ) -> None:
        """Run passes until ``stop`` is set; ``on_report`` sees each pass's report."""
        while not stop.is_set():
            try:
                report = self.run_pass(wait_s=interval_s)
                if report.errors:
                    log.warning("reconcile pass: %s", "; ".join(report.errors))
                if on_report is not None:
                    on_report(report)
            except DatabaseUnavailable as exc:  # it comes back: the next pass goes on
                log.warning("reconcile pass stopped: %s", exc)
            except Exception:  # one bad pass must not end the loop
                log.exception("reconcile pass failed")
            stop.wait(interval_s)

    def in_flight(self, desktop_id: uuid.UUID) -> bool:
        """Whether a step of this reconciler still runs for ``desktop_id``."""
        with self._flight_lock:
            return desktop_id in self._in_flight

    def close(self) -> None:
        """Stop taking steps; steps already running end under their own deadlines."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.profile_upkeep.close()

    def _submit(self, desktop_id: uuid.UUID, job: Callable[[], None],
                report: PassReport) -> Future[None]:
        """Run ``job`` (a step, a move) for ``desktop_id`` on the reconciler's threads."""
        def run() -> None:
            errors = len(report.errors)
            try:
                job()
            finally:
                with self._flight_lock:
                    self._in_flight.pop(desktop_id, None)
                if report.closed and len(report.errors) > errors:  # its pass is long over
                    log.warning("reconcile step (after its pass): %s",
                                "; ".join(report.errors[errors:]))

        # The lock is held while submitting, so a step that ends at once cannot pop its
        # desktop before it was put in.
        with self._flight_lock:
            future = self._executor.submit(run)
            self._in_flight[desktop_id] = future
        return future

    # --- 1. hosts --------------------------------------------------------------------------

    def _sync_hosts(self, report: PassReport) -> tuple[set[uuid.UUID], list[uuid.UUID]]:
        """Ask every host what runs on it (a heartbeat too); returns the hosts that answered
        and the desktops in use on draining hosts to move live.

        A host that does not answer is left alone: nothing of it is deleted or repaired, and
        after the grace period it is marked down (``HostWatch``)."""
        reachable: set[uuid.UUID] = set()
        listed: dict[uuid.UUID, dict[uuid.UUID, VmRecord]] = {}  # by host, what runs there
        with self.ctx.uow(read_only=True) as uow:
            hosts = [(h.id, h.name) for h in uow.hosts.list()]
        for host_id, name in hosts:
            try:
                with self.ctx.uow(read_only=True) as uow:
                    driver = self.ctx.driver_for(uow.hosts.get(host_id))
                try:
                    found = driver.list_vms()
                except HostConnectionLost:  # its daemon restarted: the driver reconnects
                    found = driver.list_vms()
                records = {r.vm_id: r for r in found}
            except DatabaseUnavailable:
                raise  # the database is what failed, not the host: it is not silent
            except (TemporaryError, DriverError) as exc:  # did not answer, or not sanely
                report.error(f"host {name}: {exc}")
                self.hosts.silent(host_id, str(exc))
                continue
            self.hosts.answered(host_id)
            reachable.add(host_id)
            listed[host_id] = records
        # A VM found on another host than its row names was moved there live (its broker
        # died before writing it down): adopted first, so it is neither "vanished" from
        # the row's host nor an orphan here.
        elsewhere = adopt_moved(self.ctx, listed, self.clock(), report)
        self.ha.forget_stale(listed, report)  # after an HA restart, the old host's definition
        to_move: list[uuid.UUID] = []
        for host_id, on_host in listed.items():
            with self.ctx.uow(read_only=True) as uow:
                host = uow.hosts.get(host_id)
                desktops = {d.id: d for d in uow.desktops.summaries(host_id=host_id)}
                self._sync_one_host(host, desktops, on_host, report, elsewhere)
                draining = host.state is HostState.DRAINING
            if draining:
                to_move += self.hosts.drain(host_id)
        return reachable, to_move

    def _sync_one_host(self, host: Host, desktops: dict[uuid.UUID, DesktopSummary],
                       records: dict[uuid.UUID, VmRecord], report: PassReport,
                       elsewhere: set[uuid.UUID]) -> None:
        driver = self.ctx.driver_for(host)
        ours = self.ctx.installation_id
        for vm_id, record in records.items():
            meta = record.metadata
            if (meta is not None and meta.installation_id in (ours, None)
                    and vm_id not in desktops and vm_id not in elsewhere):
                # Ours (our deployment's metadata; or a VM made before deployments were told
                # apart) but no row claims it: a crash's leftover. Another deployment's VMs
                # on a shared host are theirs to look after.
                driver.delete_vm(vm_id)
                report.count(Outcome.ORPHAN_REMOVED)
        for desktop in desktops.values():
            found = records.get(desktop.id)
            if found is None:
                if (desktop.state in HAS_VM_STATES and desktop.id not in elsewhere
                        and desktop.task not in VM_REMADE_TASKS  # made again by its step
                        and not self._vm_exists(driver, desktop.id)):
                    self._fail(desktop.id, desktop.state,
                               f"its VM vanished from host {host.name}")
                    report.count(Outcome.VANISHED)
                continue
            crash = death_of(found, desktop.power_state, host.name)
            if (crash is not None and desktop.state in CRASH_WATCHED_STATES
                    and crashed(self.ctx, desktop.id, desktop.state, crash, self.clock())):
                report.count(Outcome.CRASHED)
            elif (desktop.state in CRASH_WATCHED_STATES
                  and stopped_from_inside(found, desktop.power_state)
                  and reset_stateless(self.ctx, desktop.id, desktop.state, self.clock())):
                report.count(Outcome.RESET)
            observed = found.power_state
            if observed != desktop.power_state:
                with self.ctx.uow() as uow:
                    if uow.desktops.compare_and_set_power(desktop.id, desktop.power_state,
                                                          observed):
                        report.count(Outcome.POWER_CHANGED)
                    uow.commit()

    @staticmethod
    def _vm_exists(driver: HypervisorDriver, vm_id: uuid.UUID) -> bool:
        """Asked again, after the rows were read: a VM missing from the list taken before
        may have been made since (by another broker, whose row already says customizing)."""
        try:
            driver.get_vm(vm_id)
        except VmNotFound:
            return False
        except (TemporaryError, DriverError):
            return True  # cannot tell now: not called vanished
        return True

    # --- 2. pools --------------------------------------------------------------------------

    def _plan_pools(self, report: PassReport, reachable: set[uuid.UUID]) -> None:
        now = self.clock()
        with self.ctx.uow() as uow:
            pool_ids = [p.id for p in uow.pools.list()]
        for pool_id in pool_ids:
            with self._leased(Leased.POOL, pool_id) as mine:
                if mine:  # else another broker plans this pool now
                    self._plan_pool(pool_id, now, report, reachable)

    def _plan_pool(self, pool_id: uuid.UUID, now: datetime, report: PassReport,
                   reachable: set[uuid.UUID]) -> None:
        with self.ctx.uow() as uow:
            pool = uow.pools.find(pool_id)
            if pool is None:
                return  # deleted meanwhile (by another broker's pass)
            if finish_deletion(uow, pool):
                uow.commit()
                return
            desktops = uow.desktops.summaries(pool_id=pool.id)
            facts = [DesktopFacts(d.id, d.state, d.template_version_id,
                                  d.assigned_user is not None, d.created_at)
                     for d in desktops]
            spec = pool_spec(pool)
            if pool.status is PoolStatus.DELETING:
                # Sized to nothing: its free desktops retire now, held ones as users leave.
                spec = replace(spec, min_size=0, spare=0, max_size=0, canary=0)
            plan = plan_pool(spec, pool.current_version_id, facts, now,
                             rebase_failed=failed_rebases(uow, pool))
            if pool.status is PoolStatus.DELETING and pool.kind is not PoolKind.STATEFUL:
                # A dedicated desktop waiting, ready, for its user holds nothing of theirs
                # in a stateless pool: it goes too (a stateful one keeps it for them).
                plan.retire += [d.id for d in facts if d.state is S.READY and d.assigned
                                and d.id not in plan.retire]
            # A broken template (missing or corrupt disk): no new desktop but one try per
            # backoff, so it is not failed again for every desktop in every pass.
            allowed, note = template_faults.creation_allowance(uow, pool, now)
            if allowed is not None and plan.create:
                plan.create = min(plan.create, allowed)
                plan.reasons.append(note)
            report.notes += [f"{pool.name}: {r}" for r in plan.reasons]
            for desktop_id in plan.retire:
                try:
                    transition(uow.desktops, desktop_id, S.READY, S.RETIRING,
                               task=DesktopTask.RETIRE)
                except LostRace:
                    continue  # claimed by a user meanwhile: it stays
            for desktop_id in plan.rebase:
                try:
                    transition(uow.desktops, desktop_id, S.READY, S.RECYCLING,
                               task=DesktopTask.REBASE)
                except LostRace:
                    continue  # claimed by its user meanwhile: rebased at their logoff
            taken_macs = uow.desktops.macs() if plan.create else set()
            placer = Placer(uow, reachable=reachable) if plan.create else None
            for _ in range(plan.create):
                try:
                    insert_pool_desktop(uow, self.factory, pool, taken_macs, placer=placer)
                except NoValidHost as exc:
                    report.error(str(exc))
                    break
                report.count(Outcome.CREATED)
            uow.commit()

    # --- 3. desktop steps -------------------------------------------------------------------

    def _collect_steps(self, report: PassReport, reachable: set[uuid.UUID]) -> list[Step]:
        now = self.clock()
        steps: list[Step] = []
        with self.ctx.uow(read_only=True) as uow:
            pools = {p.id: p for p in uow.pools.list()}
            for desktop in uow.desktops.summaries():
                if desktop.host_id not in reachable:
                    continue  # its host is away: nothing can be done, nothing is deleted
                pool = pools.get(desktop.pool_id) if desktop.pool_id else None
                step = plan_desktop(desktop, pool.power_policy if pool else None, now,
                                    stateful=pool is not None and pool.kind is PoolKind.STATEFUL)
                if step is not None:
                    steps.append(step)
        return steps

    def run_step(self, step: Step, report: PassReport) -> None:
        """Run one desktop's step under this broker's lease on it (another broker's live
        lease means it is working on it: skip). What the step raises says what follows:

        * ``LostRace``: another actor moved the desktop on first; it is theirs, nothing is
          written.
        * ``HostConnectionLost``: the host's daemon went away mid-step (restarted, killed).
          Not the desktop's failure: it keeps its state and waits ``HOST_RETRY``; the same
          step is taken again from the row (each step finishes or clears what an interrupted
          try left: ``provision`` removes a half-made VM first, ``make_ready`` boots or waits
          for the VM there), so the desktop is neither thrown away nor made twice.
        * another ``DeskpoolError``: the desktop goes to ``error`` with the reason and a
          backoff (a ``TemporaryError``'s own ``delay`` when it gives one).
        * anything else is a bug in deskpool, not the desktop's failure: logged with its trace
          and counted; the desktop keeps its state and only waits a backoff, so the pass does
          not retry it in a hot loop.
        * ``DatabaseUnavailable`` is no one's failure: nothing is written (the database is
          away); the desktop stays in the state its last write left, and a pass after the
          database is back plans its step again from that row.
        """
        try:
            self._run_leased_step(step, report)
        except DatabaseUnavailable as exc:
            report.error(f"desktop {step.desktop_id}: {step.kind} step interrupted: {exc}")

    def _run_leased_step(self, step: Step, report: PassReport) -> None:
        desktop_id = step.desktop_id
        with self._leased(Leased.DESKTOP, desktop_id) as mine:
            if not mine:
                return
            try:
                with self.ctx.uow(read_only=True) as uow:
                    current = uow.desktops.find(desktop_id)
                    if current is None or current.state is not step.state:
                        return  # another broker did this step after we looked: nothing to do
                self.steps.run(step, report)
            except LostRace as exc:
                log.debug("desktop %s: %s step lost a race: %s", desktop_id, step.kind, exc)
            except DatabaseUnavailable:
                raise  # not the desktop's failure (see run_step)
            except HostConnectionLost as exc:
                report.error(f"desktop {desktop_id}: {exc}")
                self._back_off(desktop_id, step.state, str(exc))
            except TemporaryError as exc:
                report.error(f"desktop {desktop_id}: {exc}")
                delay = None if exc.delay is None else timedelta(seconds=exc.delay)
                self._fail(desktop_id, step.state, str(exc), delay=delay)
            except DeskpoolError as exc:
                report.error(f"desktop {desktop_id}: {exc}")
                self._fail(desktop_id, step.state, str(exc))
            except Exception as exc:  # a bug: never stop the pass, never blame the desktop
                log.exception("desktop %s: %s step failed on a programming error",
                              desktop_id, step.kind)
                report.bug(f"desktop {desktop_id}: {step.kind} step hit a bug: "
                           f"{type(exc).__name__}: {exc}")
                self._back_off(desktop_id, step.state)

    @contextmanager
    def _leased(self, kind: Leased, row_id: uuid.UUID) -> Iterator[bool]:
        """Whether this broker got the row's lease (no one else holds a live one); if so it
        is renewed while the block runs and given back after."""
        now = self.clock()
        with self.ctx.uow() as uow:
            mine = uow.leases.take(kind, row_id, self.owner, now + self.lease, now)
            uow.commit()
        if not mine:
            yield False
            return

        def renew() -> bool:
            with self.ctx.uow() as uow:
                kept = uow.leases.renew(kind, row_id, self.owner, self.clock() + self.lease)
                uow.commit()
            return kept

        try:
            with renewed_while_running(renew, self.lease.total_seconds() / 3,
                                       f"lease on {kind.value} {row_id}"):
                yield True
        finally:
            try:
                with self.ctx.uow() as uow:
                    uow.leases.release(kind, row_id, self.owner)
                    uow.commit()
            except DatabaseUnavailable as exc:  # the lease runs out by itself
                log.warning("could not give back the lease on %s %s: %s", kind.value, row_id,
                            exc)

    def _fail(self, desktop_id: uuid.UUID, state: DesktopState, reason: str, *,
              delay: timedelta | None = None) -> None:
        """The step that started in ``state`` failed: the desktop goes to ``error`` with the
        reason and waits ``delay`` (else the backoff for its retries) before the next try."""
        with self.ctx.uow() as uow:
            desktop = self._still_the_steps(uow, desktop_id, state, reason)
            if desktop is None:
                return
            current = desktop.state
            if current is not S.ERROR and S.ERROR in TRANSITIONS[current]:
                try:
                    transition(uow.desktops, desktop_id, current, S.ERROR, last_error=reason)
                except LostRace:
                    return  # moved on meanwhile: not ours to fail
                desktop = uow.desktops.get(desktop_id)
            # (A retired desktop cannot be in error: it keeps its state and waits too.)
            desktop.retry_count += 1
            desktop.last_error = reason
            wait = backoff(desktop.retry_count) if delay is None else delay
            desktop.next_attempt_at = self.clock() + wait
            uow.commit()

    def _back_off(self, desktop_id: uuid.UUID, state: DesktopState,
                  host_error: str | None = None) -> None:
        """A bug stopped the step that started in ``state``: the desktop keeps its state and
        its ``last_error`` (the failure is deskpool's, not the desktop's) and only waits.

        With ``host_error`` the host's connection broke: the desktop keeps its state, the
        error is its ``last_error`` and it waits ``HOST_RETRY``, not a growing backoff: its
        failures are not counted, and a host that stays away is the host watch's to handle
        (its desktops are left alone meanwhile)."""
        with self.ctx.uow() as uow:
            desktop = self._still_the_steps(uow, desktop_id, state,
                                            host_error or "a bug stopped its step")
            if desktop is None:
                return
            if host_error is not None:
                desktop.last_error = host_error
                desktop.next_attempt_at = self.clock() + HOST_RETRY
            else:
                desktop.retry_count += 1
                desktop.next_attempt_at = self.clock() + backoff(desktop.retry_count)
            uow.commit()

    @staticmethod
    def _still_the_steps(uow: UnitOfWork, desktop_id: uuid.UUID, state: DesktopState,
                         reason: str) -> Desktop | None:
        """The desktop, if a failure of the step that started in ``state`` is still its:
        None when it is gone, or when the step got it past the step's own states before it
        failed (e.g. at giving back its host slot), where a user may hold it now."""
        try:
            desktop = uow.desktops.get(desktop_id)
        except NotFound:
            return None
        current = desktop.state
        if current is not S.ERROR and current not in _STEP_PATHS.get(state, {state}):
            log.warning("desktop %s: %s after it went on to %s", desktop_id, reason,
                        current.value)
            return None
        return desktop

    def _slot(self, host_id: uuid.UUID) -> AbstractContextManager[int]:
        """Desktops made at once on one host, by all brokers: the host's own limit
        (``max_provisioning``, read each time, so a change applies at once), else the
        reconciler's default. A dead broker's slot frees itself no later than its leases do,
        so the brokers left take over its work without waiting for its slots."""
        with self.ctx.uow(read_only=True) as uow:
            limit = uow.hosts.get(host_id).max_provisioning or self.provisioning_per_host
        return host_slot(self.ctx, host_id, SlotKind.PROVISIONING, limit, holder=self.owner,
                         hold_for=min(HOLD_FOR, self.lease), clock=self.clock)
