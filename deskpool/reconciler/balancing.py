"""Load balancing on the reconciler's schedule: the planner (``scheduler.balancer``) fed
with measured load, and its moves run as live migrations.

Every ``balance_interval_s`` of the reconciler's clock, when ``balance_enabled``, a pass:

1. samples every reachable host (``HypervisorDriver.load_sample``); a host that cannot be
   sampled is neither source nor target this time. CPU loads come from this sample and the
   one before it (kept in memory), so the first pass after a start balances memory only;
2. builds each host's facts as placement sees them, each running desktop's load, and the
   moves of the last hours from the ``desktop-migrated`` events (every broker's, so caps and
   cooldowns hold across brokers and restarts);
3. submits each planned move as a job on the reconciler's threads. A move another broker
   holds (``LostRace``) is skipped quietly; any other failure leaves the desktop where it
   was (the driver's promise) with a note in the pass report and a warning event.

A hot host the plan leaves hot gets one warning event when it starts being left hot, not
one per pass; once it is relieved (or no longer hot) it may be reported again later.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from deskpool.config import Settings
from deskpool.domain.errors import DeskpoolError, HostConnectionLost, LostRace
from deskpool.domain.models import LoadSample, moves_live
from deskpool.domain.states import DesktopState
from deskpool.reconciler.report import Outcome, PassReport
from deskpool.scheduler.balancer import (
    HOUR,
    BalancePolicy,
    DesktopLoad,
    HostLoad,
    PlannedMove,
    Watermarks,
    plan_moves,
)
from deskpool.scheduler.facts import PlacementRequest
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.migration import MOVABLE_STATES, MigrationService, past_moves
from deskpool.services.placement import OVERLAY_BYTES, Placer
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Desktop

log = logging.getLogger(__name__)


def policy_from(settings: Settings) -> BalancePolicy:
    """The deployment's balancing policy; ``InvalidInput`` naming the settings when the
    watermarks do not make a band (low below high)."""
    try:
        memory = Watermarks(high=settings.balance_memory_high, low=settings.balance_memory_low)
        cpu = Watermarks(high=settings.balance_cpu_high, low=settings.balance_cpu_low)
    except DeskpoolError as exc:
        raise type(exc)(f"settings balance_memory_high/low and balance_cpu_high/low: "
                        f"{exc}") from exc
    return BalancePolicy(
        enabled=settings.balance_enabled, memory=memory, cpu=cpu,
        max_moves_per_host_per_hour=settings.balance_max_moves_per_host_per_hour,
        max_concurrent_moves=settings.balance_max_concurrent_moves,
        min_benefit=settings.balance_min_benefit,
        desktop_cooldown=timedelta(seconds=settings.balance_cooldown_s))


class Balancing:
    def __init__(self, ctx: ServiceContext, clock: Callable[[], datetime], *,
                 policy: BalancePolicy | None = None) -> None:
        self.ctx = ctx
        self.clock = clock
        self.policy = policy_from(ctx.settings) if policy is None else policy
        self.interval = timedelta(seconds=ctx.settings.balance_interval_s)
        self._last_pass: datetime | None = None
        self._samples: dict[uuid.UUID, LoadSample] = {}  # each host's latest, for CPU loads
        self._lock = threading.Lock()
        self._moving: dict[uuid.UUID, uuid.UUID] = {}  # this broker's moves: desktop -> host
        self._left_hot: set[uuid.UUID] = set()  # hosts reported left hot, until relieved

    def due(self) -> bool:
        if not self.policy.enabled:
            return False
        return self._last_pass is None or self.clock() - self._last_pass >= self.interval

    def plan(self, reachable: set[uuid.UUID], report: PassReport,
             busy: Callable[[uuid.UUID], bool] = lambda _: False) -> list[PlannedMove]:
        """This pass's moves (none when it is not due); each is then run by ``move``.
        ``busy`` says which desktops have a step of this broker's running: they stay.
        Nothing it meets (a host that cannot be sampled, the database away) leaves it but
        as an error in ``report``."""
        if not self.due():
            return []
        now = self.clock()
        self._last_pass = now
        try:
            return self._plan(reachable, now, report, busy)
        except DeskpoolError as exc:
            report.error(f"balancing: {exc}")
        except Exception as exc:  # a bug: never out of the pass, which has more to do
            log.exception("balancing pass failed on a programming error")
            report.bug(f"balancing: planning hit a bug: {type(exc).__name__}: {exc}")
        return []

    def _plan(self, reachable: set[uuid.UUID], now: datetime, report: PassReport,
              busy: Callable[[uuid.UUID], bool]) -> list[PlannedMove]:
        samples = self._sample(reachable, report)
        with self.ctx.uow(read_only=True) as uow:
            hosts = self._host_loads(uow, samples)
            desktops = self._desktop_loads(uow, samples, now, busy)
        history = past_moves(self.ctx, now - max(HOUR, self.policy.desktop_cooldown))
        plan = plan_moves(hosts, desktops, history, self.policy, now)
        self._report_left_hot(plan.unresolved, hosts, report)
        with self._lock:
            for move in plan.moves:
                self._moving[move.desktop_id] = move.target_id
        report.notes += [f"balancing: {move.reason}" for move in plan.moves]
        return list(plan.moves)

    def _sample(self, reachable: set[uuid.UUID],
                report: PassReport) -> dict[uuid.UUID, tuple[LoadSample, LoadSample | None]]:
        """Each reachable host's sample now and the one before it (None after a start)."""
        with self.ctx.uow(read_only=True) as uow:
            drivers = {h.id: (h.name, self.ctx.driver_for(h)) for h in uow.hosts.list()
                       if h.id in reachable}
        found: dict[uuid.UUID, tuple[LoadSample, LoadSample | None]] = {}
        for host_id, (name, driver) in sorted(drivers.items(), key=lambda i: i[1][0]):
            try:
                sample = driver.load_sample()
            except DeskpoolError as exc:
                # Not a failure of the pass: the host sits this balancing out.
                report.notes.append(f"balancing: host {name} left out, its load could not "
                                    f"be read: {exc}")
                continue
            found[host_id] = (sample, self._samples.get(host_id))
            self._samples[host_id] = sample
        return found

    @staticmethod
    def _host_loads(uow: UnitOfWork, samples: dict[uuid.UUID, tuple[LoadSample,
                                                                    LoadSample | None]],
                    ) -> list[HostLoad]:
        facts = Placer(uow, reachable=set(samples)).facts
        host_sets = {h.id: h.host_set for h in uow.hosts.list()}
        balanced_sets = uow.host_sets.balanced()
        loads = []
        for host_id, (sample, before) in samples.items():
            cpu = sample.cpu_load_since(before) if before is not None else None
            host_set = host_sets.get(host_id)
            loads.append(HostLoad(facts[host_id], memory_used_mib=sample.memory_used_mib,
                                  cpu_load=0.0 if cpu is None else cpu, host_set=host_set,
                                  set_balances=host_set in balanced_sets))
        return loads

    def _desktop_loads(self, uow: UnitOfWork,
                       samples: dict[uuid.UUID, tuple[LoadSample, LoadSample | None]],
                       now: datetime, busy: Callable[[uuid.UUID], bool]) -> list[DesktopLoad]:
        pools = uow.pools.list()
        balanced_pools = {p.id for p in pools if p.balance}
        layered_pools = {p.id for p in pools if p.user_layer_mib}
        with self._lock:
            moving = dict(self._moving)
        loads = []
        for host_id, (sample, before) in samples.items():
            for d in uow.desktops.by_host(host_id):
                measured = sample.vms.get(d.id)
                target = moving.get(d.id)
                if measured is None or (target is None
                                        and not _movable(d, d.pool_id in layered_pools)):
                    continue
                cpus = sample.vm_cpus_since(before, d.id) if before is not None else None
                loads.append(DesktopLoad(
                    id=d.id, name=d.name, host_id=host_id, request=_request(uow, d),
                    memory_used_mib=measured.memory_used_mib,
                    cpu_used=0.0 if cpus is None else cpus,
                    pool_balances=d.pool_id in balanced_pools,
                    in_logon=target is None and (_in_logon(d, now) or busy(d.id)),
                    moving_to=target))
        return loads

    def _report_left_hot(self, unresolved: tuple[str, ...], hosts: list[HostLoad],
                         report: PassReport) -> None:
        """One warning event per host the plan leaves hot, when it starts being so."""
        by_host: dict[uuid.UUID, str] = {}
        for why in unresolved:
            for load in hosts:  # the planner's sentences start "host NAME "
                if why.startswith(f"host {load.facts.name} "):
                    by_host.setdefault(load.facts.id, why)
        report.notes += [f"balancing: {why}" for why in by_host.values()]
        new = {h: why for h, why in by_host.items() if h not in self._left_hot}
        self._left_hot = set(by_host)
        if not new:
            return
        with self.ctx.uow() as uow:
            for why in new.values():
                record_event(uow, "balance-unresolved", f"load balancing leaves {why}",
                             severity="warning")
            uow.commit()

    def move(self, planned: PlannedMove, report: PassReport) -> None:
        """Run one planned move (a job on the reconciler's threads). Never raises: what goes
        wrong is the pass report's and the event log's."""
        try:
            MigrationService(self.ctx, self.clock).migrate(
                str(planned.desktop_id), target=planned.target,
                reason=f"load balancing: {planned.reason}")
            report.count(Outcome.BALANCED)
        except LostRace:
            pass  # another broker works on it (or moves it): its turn, not a failure
        except HostConnectionLost as exc:
            # Not "stays where it was": it may have moved; the next pass lists the hosts.
            report.notes.append(f"balancing: {planned.desktop}: {exc}")
        except DeskpoolError as exc:
            report.notes.append(f"balancing: {planned.desktop} was not moved to "
                                f"{planned.target}: {exc}")
            self._warn(planned, exc)
        except Exception as exc:  # a bug: never out of the pass
            log.exception("balancing move of %s failed on a programming error",
                          planned.desktop)
            report.bug(f"balancing: moving {planned.desktop} hit a bug: "
                       f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._moving.pop(planned.desktop_id, None)

    def _warn(self, planned: PlannedMove, why: DeskpoolError) -> None:
        try:
            with self.ctx.uow() as uow:
                record_event(uow, "balance-move-failed",
                             f"{planned.desktop} could not move from host {planned.source} "
                             f"to {planned.target} to relieve it, and stays where it was: "
                             f"{why}", severity="warning", desktop_id=planned.desktop_id,
                             desktop=planned.desktop)
                uow.commit()
        except DeskpoolError as exc:  # the database is away: the pass report has it
            log.warning("could not record the failed move of %s: %s", planned.desktop, exc)


def _movable(d: Desktop, user_layer: bool) -> bool:
    return d.state in MOVABLE_STATES and moves_live(d.clone_mode, d.power_state,
                                                    user_layer=user_layer)


def _in_logon(d: Desktop, now: datetime) -> bool:
    """Reserved (handed over, its user's console not connected yet), or leased: a broker
    works on it now (a hand-over step, a move)."""
    return d.state == DesktopState.RESERVED or (d.lease_until is not None
                                                and d.lease_until > now)


def _request(uow: UnitOfWork, d: Desktop) -> PlacementRequest:
    """What the desktop needs of a target: its template version's shape, its pool's pins;
    a linked clone takes a new overlay there."""
    version = d.template_version
    runs_on = frozenset(t.strip().upper() for t in version.runs_on.split(",") if t.strip())
    pinned = uow.pool_hosts.pinned(d.pool_id) if d.pool_id is not None else set()
    return PlacementRequest(
        what=f"desktop {d.name}", vcpus=version.vcpus, memory_mib=version.memory_mib,
        storage_bytes=OVERLAY_BYTES, hypervisors=runs_on, arch=version.arch or None,
        allowed_hosts=frozenset(pinned) if pinned else None)
