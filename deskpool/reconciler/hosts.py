"""The reconciler's view of hosts: heartbeat, failure and drain.

* A host that answers gets its capacity refreshed and ``last_seen_at`` stamped; a host that
  was ``down`` and answers again is ``enabled`` again.
* A host that stops answering is marked ``down`` once it has been silent for the grace
  period. Its stateless pool desktops go to ``retiring`` and lose their users, so the pool
  refills on other hosts and users reconnect to a new desktop; their VMs are removed only
  when the host answers again. Stateful desktops stay as they are, with their data, and come
  back with the host; their users are told so. (A VM that did not survive, the host having
  been lost whole, is started again there: ``crashes``.) Nothing is deleted on a host because
  it was unreachable.
* A ``draining`` host's free desktops are retired (placement replaces them elsewhere), its
  desktops in use move live to other hosts (``moves.py``), and the users of those that cannot
  move see a notice saying why (the broker logs them off at the deadline); once no session
  is left the host enters ``maintenance``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from deskpool.domain.errors import DeskpoolError, LostRace
from deskpool.domain.models import HostState
from deskpool.domain.pools import PoolKind
from deskpool.domain.states import HELD_STATES, TRANSITIONS, DesktopState, DesktopTask, transition
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.hosts import drain_notice, record_capacity
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Host

log = logging.getLogger(__name__)
S = DesktopState
FREE_STATES = (S.PROVISIONING.value, S.CUSTOMIZING.value, S.READY.value)
IN_FLIGHT_STATES = (S.PROVISIONING.value, S.CUSTOMIZING.value, S.RECYCLING.value)


class HostWatch:
    def __init__(self, ctx: ServiceContext, clock: Callable[[], datetime], *,
                 down_after: timedelta = timedelta(seconds=60),
                 move_on_drain: bool = True) -> None:
        self.ctx = ctx
        self.clock = clock
        self.down_after = down_after
        # Desktops in use on a draining host move live to other hosts where they can; the
        # notice-and-logoff is for those that cannot.
        self.move_on_drain = move_on_drain

    def answered(self, host_id: uuid.UUID) -> None:
        """The host answered: refresh its capacity; a down host comes back."""
        driver = None
        with self.ctx.uow(read_only=True) as uow:
            driver = self.ctx.driver_for(uow.hosts.get(host_id))
        try:
            capacity = driver.capacity()
        except DeskpoolError:
            capacity = None
        with self.ctx.uow() as uow:
            host = uow.hosts.get(host_id)
            if capacity is not None:
                record_capacity(host, capacity)
            host.last_seen_at, host.unreachable_since, host.last_error = (self.clock(), None,
                                                                          None)
            if host.state is HostState.DOWN:
                host.state = HostState.ENABLED
                record_event(uow, "host-up", f"host {host.name} answers again and is back "
                             "in service")
            uow.commit()

    def silent(self, host_id: uuid.UUID, error: str) -> None:
        """The host did not answer; after the grace period it is down."""
        now = self.clock()
        self.ctx.forget_driver(host_id)  # a reconnect next time, not a dead connection
        with self.ctx.uow() as uow:
            host = uow.hosts.get(host_id)
            host.last_error = error
            if host.unreachable_since is None:
                host.unreachable_since = now
            if host.state is not HostState.DOWN and now - host.unreachable_since >= \
                    self.down_after:
                host.state = HostState.DOWN
                record_event(uow, "host-down", f"host {host.name} has not answered since "
                             f"{host.unreachable_since:%H:%M:%S}: marked down ({error})",
                             severity="error")
                self._abandon_stateless(uow, host)
                self._tell_stateful_users(uow, host)
            uow.commit()

    @staticmethod
    def _abandon_stateless(uow: UnitOfWork, host: Host) -> None:
        """Stateless pool desktops of a down host leave service (their VMs are removed when
        the host answers again); their users may connect to a new one at once."""
        rows = uow.desktop_sessions.on_host(
            host.id, pool_kind=PoolKind.STATELESS,
            states=[*FREE_STATES, *HELD_STATES, S.RECYCLING.value])
        for d in rows:
            d_id, name, state, user, pool = d.id, d.name, d.state, d.assigned_user, d.pool
            if S.RETIRING not in TRANSITIONS[S(state)]:
                # Being made or recycled: its step cannot finish, and error is the way out.
                transition(uow.desktops, d_id, S(state), S.ERROR,
                           last_error=f"host {host.name} is down")
                state = S.ERROR.value
            transition(uow.desktops, d_id, S(state), S.RETIRING, task=DesktopTask.HOST_DOWN)
            uow.desktop_sessions.release_from_lost_host(d_id)
            if user:
                record_event(uow, "desktop-lost", f"{name} of {user} was on host {host.name}, "
                             "which is down; connecting again gives a new desktop",
                             severity="warning", user=user, pool=pool, desktop_id=d_id,
                             desktop=name)

    @staticmethod
    def _tell_stateful_users(uow: UnitOfWork, host: Host) -> None:
        """The users of a down host's stateful desktops are told, on their portal page, that
        their desktop and its files wait for the host (nothing of them is touched)."""
        rows = uow.desktop_sessions.on_host(
            host.id, pool_kind=PoolKind.STATEFUL,
            states=[*FREE_STATES, *HELD_STATES, S.RECYCLING.value, S.ERROR.value])
        # On shared storage it is started again on another host (``ha.py``).
        back = ("it is being started again on another host" if host.shared_storage else
                "it comes back when the host does")
        for d in rows:
            if d.assigned_user:
                record_event(uow, "desktop-lost", f"your desktop {d.name} is on host "
                             f"{host.name}, which is down; your files are kept on it, and "
                             f"{back}", severity="warning",
                             user=d.assigned_user, pool=d.pool, desktop_id=d.id,
                             desktop=d.name)

    def drain(self, host_id: uuid.UUID) -> list[uuid.UUID]:
        """One look at a draining host; returns the desktops in use there to move live
        (``reconciler/moves.py``), which get no notice unless their move fails."""
        to_move: list[uuid.UUID] = []
        with self.ctx.uow() as uow:
            host = uow.hosts.get(host_id)
            if host.state is not HostState.DRAINING:
                return to_move
            deadline = host.drain_deadline or self.clock()
            desktops = uow.desktop_sessions.on_host(host.id)
            held = 0
            for d in desktops:
                d_id, name, state, user, notice, kind = (d.id, d.name, d.state,
                                                         d.assigned_user, d.notice, d.pool_kind)
                if state in HELD_STATES:
                    held += 1
                    if notice is None and self.move_on_drain and d.movable:
                        to_move.append(d_id)
                    elif notice is None:
                        uow.desktop_sessions.set_notice(d_id, drain_notice(deadline))
                        record_event(uow, "drain-warning", f"{user} on {name} warned: host "
                                     f"{host.name} drains by {deadline:%H:%M} UTC",
                                     user=user, desktop_id=d_id, desktop=name)
                elif (state == S.READY.value and user is None
                      and kind is not PoolKind.STATEFUL and kind is not None):
                    try:
                        transition(uow.desktops, d_id, S.READY, S.RETIRING,
                                   task=DesktopTask.DRAIN)
                    except LostRace:  # a user claimed it meanwhile: a session, not empty
                        held += 1
                elif state in IN_FLIGHT_STATES:
                    # Becomes ready (and is retired above) or held: not empty yet, else a
                    # desktop recycled after its user's logoff would stay ready here and
                    # count as its pool's spare on a host that takes no sessions.
                    held += 1
            if held == 0:
                host.state = HostState.MAINTENANCE
                record_event(uow, "host-maintenance", f"host {host.name} has no sessions "
                             "left and is in maintenance")
            uow.commit()
        return to_move
