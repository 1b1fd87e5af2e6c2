"""Sessions: what happens to a reserved desktop after hand-over.

Events come from the console proxy (connect / disconnect) and from the guest. On desktops
with the session hook (the desktop flavor) the guest's truth is its graphical session, from
``session-hook status`` (``deskpool.broker.desktop_session``): logind's sessions of the
desktop's users (a session seen makes the login, its end, e.g. "Log Out" in the desktop's
own menu, the logout) and the X server's input idle time; the lock state is logind's
LockedHint. Elsewhere (the console flavor) the guest agent's ``guest-get-users`` and
``who -u`` are asked. Timers, run by ``SessionService.run_timers`` on every broker tick:

* a reservation never connected to within the pool's ``reservation_timeout_s`` is released
  untouched (the desktop was never used, so it goes straight back to ``ready``);
* a disconnected session (``idle``: no console open) can be resumed until the pool's
  ``disconnect_timeout_s``; then the user is logged off;
* a session idle in the guest past ``idle_timeout_s`` is logged off.

Logging off applies the pool's on-logout policy (recycle or retire) through the state table.
For pools with roaming profiles, the reconciler's recycle (or retire) then ends the user's
profile first: unmounted in the guest, detached and committed, or set aside
(``deskpool.services.profile_desktops``).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from deskpool.broker.desktop_session import GuestSession, SessionStarter
from deskpool.domain.errors import DeskpoolError, Forbidden, InvalidInput
from deskpool.domain.pools import Assignment
from deskpool.domain.states import HELD_STATES, DesktopState, transition
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.pools import logout_outcome
from deskpool.store.db import UnitOfWork
from deskpool.store.models import utcnow

log = logging.getLogger(__name__)
S = DesktopState


@dataclass(frozen=True)
class _PoolTimers:
    name: str
    dedicated: bool
    reservation_timeout_s: int
    idle_timeout_s: int | None
    disconnect_timeout_s: int | None


@dataclass
class TimerReport:
    reservations_expired: list[str] = field(default_factory=list)
    logged_off: list[str] = field(default_factory=list)
    guest_logins: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _clear_session(uow: UnitOfWork, desktop_id: uuid.UUID, *, unassign: bool) -> None:
    uow.desktop_sessions.clear(desktop_id, unassign=unassign)
    # Console tickets end with the session: one never used must not open the next session
    # on this desktop (the same user's included).
    uow.console_tickets.expire_unused(desktop_id, utcnow())


class SessionService:
    def __init__(self, ctx: ServiceContext, *, guest_poll_s: float = 0.0,
                 starter: SessionStarter | None = None) -> None:
        self.ctx = ctx
        # Knows which template versions carry the session hook, and asks it.
        self.starter = starter or SessionStarter(ctx)
        self._locked: dict[uuid.UUID, bool] = {}  # last LockedHint seen, per desktop
        # Each guest is asked about its users at most this often (the broker's loop ticks
        # faster than guests need asking).
        self.guest_poll_s = guest_poll_s
        self._polled: dict[uuid.UUID, float] = {}

    def _due(self, desktop_id: uuid.UUID) -> bool:
        now = time.monotonic()
        if now - self._polled.get(desktop_id, -1e9) < self.guest_poll_s:
            return False
        self._polled[desktop_id] = now
        return True

    # --- console proxy events -------------------------------------------------------------

    def console_connected(self, desktop_id: uuid.UUID, user: str) -> None:
        now = utcnow()
        with self.ctx.uow() as uow:
            desktop = uow.desktops.get(desktop_id)
            if desktop.state in (S.RESERVED.value, S.IDLE.value):
                transition(uow.desktops, desktop_id, S(desktop.state), S.IN_USE)
            uow.desktop_sessions.console_opened(desktop_id)
            logon = uow.logons.latest_waiting_for_console(desktop_id)
            if logon is not None and logon.handed_over_at is not None:
                logon.connect_ms = round((now - logon.handed_over_at).total_seconds() * 1000)
            record_event(uow, "console-connected", f"{user} opened the console of "
                         f"{desktop.name}", user=user, desktop_id=desktop_id,
                         desktop=desktop.name)
            uow.commit()

    def console_disconnected(self, desktop_id: uuid.UUID, user: str) -> None:
        with self.ctx.uow() as uow:
            desktop = uow.desktops.get(desktop_id)
            remaining = max(desktop.console_connections - 1, 0)
            disconnected_at = None
            if remaining == 0 and desktop.state == S.IN_USE.value:
                transition(uow.desktops, desktop_id, S.IN_USE, S.IDLE)
                disconnected_at = utcnow()
            uow.desktop_sessions.console_closed(desktop_id, remaining,
                                                disconnected_at=disconnected_at)
            record_event(uow, "console-disconnected", f"{user} closed the console of "
                         f"{desktop.name}", user=user, desktop_id=desktop_id,
                         desktop=desktop.name)
            uow.commit()

    # --- log off --------------------------------------------------------------------------

    def log_off(self, desktop_id: uuid.UUID, *, by: Identity | None, reason: str) -> str:
        """End the session on ``desktop_id`` and apply its pool's on-logout policy; returns
        the desktop's new state. ``by`` is the user asking (an admin may log anyone off);
        ``None`` is the broker itself (a timer, the guest)."""
        with self.ctx.uow() as uow:
            desktop = uow.desktops.get(desktop_id)
            if by is not None and not by.is_admin and desktop.assigned_user != by.name:
                raise Forbidden("that desktop is not yours")
            if desktop.state not in HELD_STATES:
                raise InvalidInput(f"desktop {desktop.name!r} has no session to log off "
                                   f"(it is {desktop.state})")
            if desktop.pool_id is None:
                raise InvalidInput(f"desktop {desktop.name!r} is not in a pool")
            pool = uow.pools.get(desktop.pool_id)
            new, task = logout_outcome(pool, desktop)
            user = desktop.assigned_user
            transition(uow.desktops, desktop_id, S(desktop.state), new, task=task)
            _clear_session(uow, desktop_id,
                           unassign=pool.assignment is not Assignment.DEDICATED)
            uow.desktop_sessions.count_session_served(desktop_id)
            record_event(uow, "logged-off", f"{user} logged off {desktop.name}: {reason}",
                         user=user, pool=pool.name, desktop_id=desktop_id,
                         desktop=desktop.name)
            uow.commit()
            return new.value

    # --- timers and guest polling -----------------------------------------------------------

    def run_timers(self, now: datetime | None = None, *, poll_guests: bool = True
                   ) -> TimerReport:
        now = now or utcnow()
        report = TimerReport()
        self._drain_deadlines(report, now)
        with self.ctx.uow(read_only=True) as uow:
            pools = {p.id: _PoolTimers(p.name, p.assignment is Assignment.DEDICATED,
                                       p.reservation_timeout_s, p.idle_timeout_s,
                                       p.disconnect_timeout_s) for p in uow.pools.list()}
            held = [(d.id, d.name, d.state, d.pool_id, d.reserved_at, d.disconnected_at,
                     d.idle_since, d.console_connections, d.assigned_user, d.guest_user)
                    for d in uow.desktop_sessions.timed()]
        for (d_id, name, state, pool_id, reserved_at, disconnected_at, idle_since,
             connections, user, guest_user) in held:
            pool = pools.get(pool_id) if pool_id else None
            if pool is None:
                continue
            try:
                self._timers_of(report, pool, d_id, name, state, reserved_at, disconnected_at,
                                idle_since, connections, user, guest_user, now, poll_guests)
            except DeskpoolError as exc:
                report.errors.append(f"{name}: {exc}")
        return report

    def _drain_deadlines(self, report: TimerReport, now: datetime) -> None:
        """Sessions on a draining host whose deadline passed are logged off."""
        with self.ctx.uow(read_only=True) as uow:
            due = [(d.desktop_id, d.desktop, d.host)
                   for d in uow.desktop_sessions.due_on_drained_hosts(now)]
        for d_id, name, host in due:
            try:
                self.log_off(d_id, by=None, reason=f"host {host} is going into maintenance")
                report.logged_off.append(name)
            except DeskpoolError as exc:
                report.errors.append(f"{name}: {exc}")

    def _timers_of(self, report: TimerReport, pool: _PoolTimers, d_id: uuid.UUID, name: str,
                   state: str, reserved_at: datetime | None, disconnected_at: datetime | None,
                   idle_since: datetime | None, connections: int, user: str | None,
                   guest_user: str | None, now: datetime, poll_guests: bool) -> None:
        expired = reserved_at is not None and reserved_at + timedelta(
            seconds=pool.reservation_timeout_s) <= now
        if state == S.READY.value and expired:
            # Made for a user who never came back: free it for anyone (a dedicated one stays).
            if not pool.dedicated:
                with self.ctx.uow() as uow:
                    _clear_session(uow, d_id, unassign=True)
                    uow.commit()
            return
        if state == S.RESERVED.value and expired and connections == 0:
            with self.ctx.uow(read_only=True) as uow:
                signed_in = reserved_at is not None and uow.logons.signed_in_since(
                    d_id, reserved_at)
            if signed_in:
                # Single sign-on started the user's session at hand-over: their account and
                # files are on the desktop now, so it goes through the pool's on-logout
                # policy (a recycle reverts it), never back to ready as it is.
                self.log_off(d_id, by=None, reason=f"{user} never connected within "
                             f"{pool.reservation_timeout_s} s; their session is ended")
                report.reservations_expired.append(name)
                return
            with self.ctx.uow() as uow:
                transition(uow.desktops, d_id, S.RESERVED, S.READY)
                _clear_session(uow, d_id, unassign=not pool.dedicated)
                record_event(uow, "reservation-expired", f"{user} never connected to {name} "
                             f"within {pool.reservation_timeout_s} s; released",
                             user=user, pool=pool.name, desktop_id=d_id, desktop=name)
                uow.commit()
            report.reservations_expired.append(name)
            return
        if (state == S.IDLE.value and disconnected_at is not None
                and pool.disconnect_timeout_s is not None
                and disconnected_at + timedelta(seconds=pool.disconnect_timeout_s) <= now):
            self.log_off(d_id, by=None, reason=f"disconnected for more than "
                         f"{pool.disconnect_timeout_s} s")
            report.logged_off.append(name)
            return
        if (idle_since is not None and pool.idle_timeout_s is not None
                and idle_since + timedelta(seconds=pool.idle_timeout_s) <= now):
            self.log_off(d_id, by=None, reason=f"idle for more than {pool.idle_timeout_s} s")
            report.logged_off.append(name)
            return
        if poll_guests and state in (S.IN_USE.value, S.IDLE.value) and self._due(d_id):
            self._poll_guest(report, d_id, name, guest_user, now=now,
                             watch_idle=pool.idle_timeout_s is not None,
                             idle_since=idle_since)

    def _poll_guest(self, report: TimerReport, d_id: uuid.UUID, name: str,
                    guest_user: str | None, *, now: datetime, watch_idle: bool,
                    idle_since: datetime | None) -> None:
        """Login and logout from ``guest-get-users``; for pools with an idle timeout, how
        long the session has had no input (``who -u`` in the guest) sets ``idle_since``.
        Desktops with the session hook are asked it instead (``_poll_session``)."""
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(d_id)
            driver = self.ctx.driver_for(desktop.host)
            version_id = desktop.template_version_id
        agent = GuestAgent(driver, d_id, command_timeout_s=2)
        if version_id is not None and self.starter.has_hook(agent, version_id):
            self._poll_session(report, agent, d_id, name, guest_user, now=now,
                               idle_since=idle_since)
            return
        users = agent.users()
        if users and watch_idle:
            self._note_idle(d_id, agent.idle_seconds() or 0, idle_since, now)
        if users and users[0] != guest_user:
            with self.ctx.uow() as uow:
                uow.desktop_sessions.set_guest_user(d_id, users[0])
                record_event(uow, "guest-login", f"{users[0]} logged in to {name}",
                             user=users[0], desktop_id=d_id, desktop=name)
                uow.commit()
            report.guest_logins.append(name)
        elif not users and guest_user is not None:
            self.log_off(d_id, by=None, reason=f"{guest_user} logged out in the guest")
            report.logged_off.append(name)

    def _poll_session(self, report: TimerReport, agent: GuestAgent, d_id: uuid.UUID,
                      name: str, guest_user: str | None, *, now: datetime,
                      idle_since: datetime | None) -> None:
        """The graphical session's truth from ``session-hook status``. The login is the
        first live session of a user seen; until then nothing is logged off, since right
        after hand-over the session may still be starting (LightDM's autologin restarts
        it). Once seen, no live session of that user left is the logout."""
        sessions = [s for s in self.starter.status(agent) if s.live]
        if guest_user is not None and not any(s.user == guest_user for s in sessions):
            self._locked.pop(d_id, None)
            self.log_off(d_id, by=None, reason=f"{guest_user} logged out of their desktop")
            report.logged_off.append(name)
            return
        if guest_user is None:
            if not sessions:
                return  # not started yet, or not this user's: the timers decide
            first = min(sessions, key=lambda s: (not s.graphical, not s.active, s.id))
            guest_user = first.user
            with self.ctx.uow() as uow:
                uow.desktop_sessions.set_guest_user(d_id, guest_user)
                record_event(uow, "guest-login", f"{guest_user} logged in to {name} "
                             f"({first.type} session {first.id}"
                             + (f" on display {first.display})" if first.display else ")"),
                             user=guest_user, desktop_id=d_id, desktop=name)
                uow.commit()
            report.guest_logins.append(name)
        own = [s for s in sessions if s.user == guest_user]
        self._note_idle(d_id, _idle_seconds(own, now), idle_since, now)
        self._note_lock(d_id, name, guest_user, any(s.locked for s in own))

    def _note_idle(self, d_id: uuid.UUID, idle_s: float, idle_since: datetime | None,
                   now: datetime) -> None:
        """``idle_since`` follows the guest: set after a minute without input, cleared on
        input; rewritten only when it moved by more than the poll's own jitter."""
        since = now - timedelta(seconds=idle_s) if idle_s >= 60 else None
        if (since is None) != (idle_since is None) or (
                since and idle_since and abs((since - idle_since).total_seconds()) > 90):
            with self.ctx.uow() as uow:
                uow.desktop_sessions.set_idle_since(d_id, since)
                uow.commit()

    def _note_lock(self, d_id: uuid.UUID, name: str, user: str, locked: bool) -> None:
        """A lock or unlock of the session is an event (remembered per broker process)."""
        if self._locked.get(d_id, False) == locked:
            self._locked[d_id] = locked
            return
        self._locked[d_id] = locked
        with self.ctx.uow() as uow:
            record_event(uow, "guest-locked" if locked else "guest-unlocked",
                         f"{user} {'locked' if locked else 'unlocked'} their session on {name}",
                         user=user, desktop_id=d_id, desktop=name)
            uow.commit()


def _idle_seconds(sessions: list[GuestSession], now: datetime) -> float:
    """How long the least idle of the user's sessions has had no input: the X server's own
    count where it could be read, else logind's idle hint (set by a screen saver)."""
    idles: list[float] = []
    for s in sessions:
        if s.x_idle_ms is not None:
            idles.append(s.x_idle_ms / 1000)
        elif s.idle_hint and s.idle_since_us > 0:
            idles.append(max(0.0, now.timestamp() - s.idle_since_us / 1e6))
        else:
            idles.append(0.0)
    return min(idles) if idles else 0.0
