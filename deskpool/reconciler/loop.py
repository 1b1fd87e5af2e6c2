"""The reconciler: one pass brings the database and the hypervisors back in line.

A pass (1) syncs every host: power state from the hypervisor (the authority), desktops whose VM
vanished, and deskpool VMs the database does not know (left by a crash); (2) plans each pool
(rollout, maximum age, sizing); (3) runs at most one action per desktop, desktops in parallel:
finish provisioning, recycle, retire, delete, apply power policy, retry errors after their
backoff. Everything it needs to resume is in the database, so a killed process loses nothing:
the next pass continues from the rows.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from deskpool.domain.errors import DeskpoolError, NotFound, VmNotFound
from deskpool.domain.models import HostState, PowerState, VmRecord
from deskpool.domain.pools import Assignment, PowerPolicy
from deskpool.domain.states import HAS_VM_STATES, DesktopState, DesktopTask, transition
from deskpool.drivers.base import HypervisorDriver
from deskpool.reconciler.hosts import HostWatch
from deskpool.reconciler.planning import DesktopFacts, plan_pool
from deskpool.scheduler.placement import NoValidHost
from deskpool.services.context import ServiceContext
from deskpool.services.factory import FACTORY_SNAPSHOT, DesktopFactory
from deskpool.services.host_slots import HOLD_FOR, SlotKind, host_slot
from deskpool.services.placement import Placer
from deskpool.services.pools import insert_pool_desktop, pool_spec
from deskpool.services.renewal import renewed_while_running
from deskpool.store.desktops import DesktopSummary
from deskpool.store.models import Desktop, Host, Pool
from deskpool.store.repositories import (
    release_lease,
    renew_lease,
    take_lease,
)

log = logging.getLogger(__name__)
S = DesktopState
MAX_BACKOFF = timedelta(minutes=10)


def backoff(retries: int) -> timedelta:
    return min(timedelta(seconds=5 * 2 ** max(retries - 1, 0)), MAX_BACKOFF)


@dataclass
class PassReport:
    created: int = 0
    readied: int = 0
    recycled: int = 0
    retired: int = 0
    deleted: int = 0
    power_changes: int = 0
    vanished: int = 0
    orphans_removed: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)


Action = Callable[[], None]


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
    S.ERROR: frozenset({S.ERROR, S.RETIRING}),  # a failed pool desktop being retired
}


class Reconciler:
    """Timings left out come from the deployment's settings (``ctx.settings``)."""

    def __init__(
        self, ctx: ServiceContext, *, workers: int = 4, ready_timeout_s: float | None = None,
        provisioning_per_host: int = 2, clock: Callable[[], datetime] | None = None,
        host_down_after: timedelta | None = None, lease: timedelta | None = None,
    ) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.factory = DesktopFactory(ctx)
        self.workers = workers
        self.ready_timeout_s = (settings.ready_timeout_s if ready_timeout_s is None
                                else ready_timeout_s)
        self.provisioning_per_host = provisioning_per_host
        self.clock = clock or (lambda: datetime.now(UTC))
        self.hosts = HostWatch(ctx, self.clock, down_after=host_down_after
                               or timedelta(seconds=settings.host_down_after_s))
        # Several brokers share the work through leases on pools and desktops, renewed while
        # a step runs (a live broker keeps its lease however long the step takes); the lease
        # time is how soon others take over the work of a broker that died.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = lease or timedelta(seconds=settings.lease_s)

    # --- the pass --------------------------------------------------------------------------

    def run_pass(self) -> PassReport:
        report = PassReport()
        with gc_paused():
            reachable = self._sync_hosts(report)
            self._plan_pools(report, reachable)
            actions = self._collect_actions(report, reachable)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            list(pool.map(lambda act: act(), actions))
        return report

    def run_forever(
        self, stop: threading.Event, interval_s: float = 10.0,
        on_report: Callable[[PassReport], None] | None = None,
    ) -> None:
        """Run passes until ``stop`` is set; ``on_report`` sees each pass's report."""
        while not stop.is_set():
            try:
                report = self.run_pass()
                if report.errors:
                    log.warning("reconcile pass: %s", "; ".join(report.errors))
                if on_report is not None:
                    on_report(report)
            except Exception:  # one bad pass must not end the loop
                log.exception("reconcile pass failed")
            stop.wait(interval_s)

    # --- 1. hosts --------------------------------------------------------------------------

    def _sync_hosts(self, report: PassReport) -> set[uuid.UUID]:
        """Ask every host what runs on it (a heartbeat too); returns the hosts that answered.

        A host that does not answer is left alone: nothing of it is deleted or repaired, and
        after the grace period it is marked down (``HostWatch``)."""
        reachable: set[uuid.UUID] = set()
        with self.ctx.uow(read_only=True) as uow:
            hosts = [(h.id, h.name) for h in uow.hosts.list()]
        for host_id, name in hosts:
            try:
                with self.ctx.uow(read_only=True) as uow:
                    driver = self.ctx.driver_for(uow.hosts.get(host_id))
                records = {r.vm_id: r for r in driver.list_vms()}
            except DeskpoolError as exc:
                report.error(f"host {name}: {exc}")
                self.hosts.silent(host_id, str(exc))
                continue
            self.hosts.answered(host_id)
            reachable.add(host_id)
            with self.ctx.uow(read_only=True) as uow:
                host = uow.hosts.get(host_id)
                desktops = {d.id: d for d in uow.desktops.summaries(host_id=host_id)}
                self._sync_one_host(host, desktops, records, report)
                draining = host.state is HostState.DRAINING
            if draining:
                self.hosts.drain(host_id)
        return reachable

    def _sync_one_host(self, host: Host, desktops: dict[uuid.UUID, DesktopSummary],
                       records: dict[uuid.UUID, VmRecord], report: PassReport) -> None:
        driver = self.ctx.driver_for(host)
        ours = self.ctx.installation_id
        for vm_id, record in records.items():
            meta = record.metadata
            if (meta is not None and meta.installation_id in (ours, None)
                    and vm_id not in desktops):
                # Ours (our deployment's metadata; or a VM made before deployments were told
                # apart) but no row claims it: a crash's leftover. Another deployment's VMs
                # on a shared host are theirs to look after.
                driver.delete_vm(vm_id)
                report.count("orphans_removed")
        for desktop in desktops.values():
            found = records.get(desktop.id)
            if found is None:
                if desktop.state in HAS_VM_STATES and not self._vm_exists(driver, desktop.id):
                    self._fail(desktop.id, S(desktop.state),
                               f"its VM vanished from host {host.name}")
                    report.count("vanished")
                continue
            observed = found.power_state
            if observed != desktop.power_state:
                with self.ctx.uow() as uow:
                    if uow.desktops.compare_and_set_power(desktop.id, desktop.power_state,
                                                          observed):
                        report.count("power_changes")
                    uow.commit()

    @staticmethod
    def _vm_exists(driver: HypervisorDriver, vm_id: uuid.UUID) -> bool:
        """Asked again, after the rows were read: a VM missing from the list taken before
        may have been made since (by another broker, whose row already says customizing)."""
        try:
            driver.get_vm(vm_id)
        except VmNotFound:
            return False
        except DeskpoolError:
            return True  # cannot tell now: not called vanished
        return True

    # --- 2. pools --------------------------------------------------------------------------

    def _plan_pools(self, report: PassReport, reachable: set[uuid.UUID]) -> None:
        now = self.clock()
        with self.ctx.uow() as uow:
            pool_ids = [p.id for p in uow.pools.list()]
        for pool_id in pool_ids:
            with self._leased(Pool, pool_id) as mine:
                if mine:  # else another broker plans this pool now
                    self._plan_pool(pool_id, now, report, reachable)

    def _plan_pool(self, pool_id: uuid.UUID, now: datetime, report: PassReport,
                   reachable: set[uuid.UUID]) -> None:
        with self.ctx.uow() as uow:
            pool = uow.pools.get(pool_id)
            desktops = uow.desktops.summaries(pool_id=pool.id)
            facts = [DesktopFacts(d.id, d.state, d.template_version_id,
                                  d.assigned_user is not None, d.created_at)
                     for d in desktops]
            plan = plan_pool(pool_spec(pool), pool.current_version_id, facts, now)
            report.notes += [f"{pool.name}: {r}" for r in plan.reasons]
            for desktop_id in plan.retire:
                try:
                    transition(uow.desktops, desktop_id, S.READY, S.RETIRING,
                               task=DesktopTask.RETIRE)
                except DeskpoolError:
                    continue  # claimed by a user meanwhile: it stays
            taken_macs = uow.desktops.macs() if plan.create else set()
            placer = Placer(uow, reachable=reachable) if plan.create else None
            for _ in range(plan.create):
                try:
                    insert_pool_desktop(uow, self.factory, pool, taken_macs, placer=placer)
                except NoValidHost as exc:
                    report.error(str(exc))
                    break
                report.count("created")
            uow.commit()

    # --- 3. actions ------------------------------------------------------------------------

    def _collect_actions(self, report: PassReport, reachable: set[uuid.UUID]) -> list[Action]:
        now = self.clock()
        actions: list[Action] = []
        with self.ctx.uow(read_only=True) as uow:
            pools = {p.id: p.power_policy for p in uow.pools.list()}
            drivers = {h.id: self.ctx.driver_for(h) for h in uow.hosts.list()
                       if h.id in reachable}
            for desktop in uow.desktops.summaries():
                if desktop.host_id not in reachable:
                    continue  # its host is away: nothing can be done, nothing is deleted
                if desktop.next_attempt_at is not None and desktop.next_attempt_at > now:
                    continue  # backing off after a failure
                policy = pools.get(desktop.pool_id) if desktop.pool_id else None
                action = self._action_for(desktop, policy, drivers[desktop.host_id], report)
                if action is not None:
                    actions.append(action)
        return actions

    def _action_for(self, desktop: DesktopSummary, policy: PowerPolicy | None,
                    driver: HypervisorDriver, report: PassReport) -> Action | None:
        d_id, host_id, state = desktop.id, desktop.host_id, desktop.state
        if state == S.PROVISIONING.value:
            return lambda: self._guard(d_id, S.PROVISIONING, report,
                                       lambda: self._provision(d_id, host_id, report))
        if state == S.CUSTOMIZING.value:
            return lambda: self._guard(d_id, S.CUSTOMIZING, report,
                                       lambda: self._ready(d_id, host_id, report))
        if state == S.RECYCLING.value:
            task = desktop.task
            return lambda: self._guard(d_id, S.RECYCLING, report,
                                       lambda: self._recycle(d_id, task, report))
        if state in (S.RETIRING.value, S.RETIRED.value, S.DELETING.value):
            return lambda: self._guard(d_id, S(state), report,
                                       lambda: self._remove(d_id, S(state), report))
        if state == S.ERROR.value and desktop.pool_id is not None:
            # A pool desktop that failed is replaced rather than repaired.
            return lambda: self._guard(d_id, S.ERROR, report,
                                       lambda: self._retire_failed(d_id, report))
        if (state == S.READY.value and desktop.assigned_user is None and policy is not None):
            return self._power_action(d_id, desktop.power_state, policy, driver, report)
        return None

    def _guard(self, desktop_id: uuid.UUID, state: DesktopState, report: PassReport,
               work: Action) -> None:
        """Run one desktop's step under this broker's lease on it (another broker's live
        lease means it is working on it: skip); a failure is recorded with a backoff."""
        with self._leased(Desktop, desktop_id) as mine:
            if not mine:
                return
            try:
                with self.ctx.uow(read_only=True) as uow:
                    current = uow.desktops.find(desktop_id)
                    if current is None or current.state != state.value:
                        return  # another broker did this step after we looked: nothing to do
                work()
            except Exception as exc:  # any failure: record it, never stop the pass
                report.error(f"desktop {desktop_id}: {exc}")
                self._fail(desktop_id, state, str(exc))

    @contextmanager
    def _leased(self, model: type[Desktop] | type[Pool], row_id: uuid.UUID) -> Iterator[bool]:
        """Whether this broker got the row's lease (no one else holds a live one); if so it
        is renewed while the block runs and given back after."""
        now = self.clock()
        with self.ctx.uow() as uow:
            mine = take_lease(uow.session, model, row_id, self.owner, now + self.lease, now)
            uow.commit()
        if not mine:
            yield False
            return

        def renew() -> bool:
            with self.ctx.uow() as uow:
                kept = renew_lease(uow.session, model, row_id, self.owner,
                                   self.clock() + self.lease)
                uow.commit()
            return kept

        try:
            with renewed_while_running(renew, self.lease.total_seconds() / 3,
                                       f"lease on {model.__tablename__} {row_id}"):
                yield True
        finally:
            with self.ctx.uow() as uow:
                release_lease(uow.session, model, row_id, self.owner)
                uow.commit()

    def _fail(self, desktop_id: uuid.UUID, state: DesktopState, reason: str) -> None:
        with self.ctx.uow() as uow:
            try:
                desktop = uow.desktops.get(desktop_id)
            except NotFound:
                return
            current = S(desktop.state)
            if current is not S.ERROR and current not in _STEP_PATHS.get(state, {state}):
                # The step got the desktop past its own states before it failed (e.g. at
                # giving back its host slot): a user may hold it now. Not ours to fail.
                log.warning("desktop %s: %s after it went on to %s", desktop_id, reason,
                            current.value)
                return
            if current is not S.ERROR:
                try:
                    transition(uow.desktops, desktop_id, current, S.ERROR, last_error=reason)
                except DeskpoolError:
                    return  # moved on meanwhile: not ours to fail
            desktop = uow.desktops.get(desktop_id)
            desktop.retry_count += 1
            desktop.last_error = reason
            desktop.next_attempt_at = self.clock() + backoff(desktop.retry_count)
            uow.commit()

    def _slot(self, host_id: uuid.UUID) -> AbstractContextManager[int]:
        """Desktops made at once on one host, by all brokers: the host's own limit
        (``max_provisioning``, read each time, so a change applies at once), else the
        reconciler's default. A dead broker's slot frees itself no later than its leases do,
        so the brokers left take over its work without waiting for its slots."""
        with self.ctx.uow(read_only=True) as uow:
            limit = uow.hosts.get(host_id).max_provisioning or self.provisioning_per_host
        return host_slot(self.ctx, host_id, SlotKind.PROVISIONING, limit, holder=self.owner,
                         hold_for=min(HOLD_FOR, self.lease), clock=self.clock)

    def _provision(self, desktop_id: uuid.UUID, host_id: uuid.UUID,
                   report: PassReport) -> None:
        with self._slot(host_id):
            # A leftover of an interrupted run is cleared first (the contract replaces crash
            # leftovers), then the clone is made again from the row.
            self.factory.provision(desktop_id)
            self.factory.make_ready(desktop_id, timeout_s=self.ready_timeout_s)
        report.count("readied")

    def _ready(self, desktop_id: uuid.UUID, host_id: uuid.UUID, report: PassReport) -> None:
        with self._slot(host_id):
            self.factory.make_ready(desktop_id, timeout_s=self.ready_timeout_s)
        report.count("readied")

    def _recycle(self, desktop_id: uuid.UUID, task: str | None, report: PassReport) -> None:
        driver = self.factory.driver_of(desktop_id)
        if task is DesktopTask.REVERT:
            driver.revert_to_snapshot(desktop_id, FACTORY_SNAPSHOT)
            self.factory.confirm_running(desktop_id, timeout_s=self.ready_timeout_s)
        with self.ctx.uow() as uow:
            transition(uow.desktops, desktop_id, S.RECYCLING, S.READY)
            desktop = uow.desktops.get(desktop_id)
            pool = uow.pools.get(desktop.pool_id) if desktop.pool_id else None
            if pool is None or pool.assignment is not Assignment.DEDICATED:
                desktop.assigned_user = None  # floating: back to anyone
            desktop.retry_count = 0
            desktop.next_attempt_at = None
            uow.commit()
        report.count("recycled")

    def _remove(self, desktop_id: uuid.UUID, state: DesktopState, report: PassReport) -> None:
        if state is S.RETIRING:
            self.factory.driver_of(desktop_id).delete_vm(desktop_id)
            with self.ctx.uow() as uow:
                transition(uow.desktops, desktop_id, S.RETIRING, S.RETIRED)
                uow.commit()
            report.count("retired")
        else:
            report.count("deleted" if state is S.DELETING else "retired")
        self.factory.discard(desktop_id)  # VM (idempotent) and row

    def _retire_failed(self, desktop_id: uuid.UUID, report: PassReport) -> None:
        with self.ctx.uow() as uow:
            transition(uow.desktops, desktop_id, S.ERROR, S.RETIRING, task=DesktopTask.RETIRE)
            uow.commit()
        self._remove(desktop_id, S.RETIRING, report)

    def _power_action(self, desktop_id: uuid.UUID, power: PowerState, policy: PowerPolicy,
                      driver: HypervisorDriver, report: PassReport) -> Action | None:
        def act(do: Callable[[uuid.UUID], None]) -> Action:
            def run() -> None:
                do(desktop_id)
                report.count("power_changes")
            return lambda: self._guard(desktop_id, S.READY, report, run)

        if policy is PowerPolicy.SUSPEND and power is PowerState.RUNNING:
            return act(driver.suspend_vm)
        if policy is PowerPolicy.SHUTOFF and power is PowerState.RUNNING:
            return act(lambda vm_id: driver.stop_vm(vm_id))
        if policy is PowerPolicy.RUNNING and power in (PowerState.SHUTOFF, PowerState.SAVED):
            return act(driver.start_vm)
        return None
