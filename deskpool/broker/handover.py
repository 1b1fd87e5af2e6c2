"""The broker: a user asks for a desktop of a pool and gets one, running and answering.

``connect`` is one logon. Its phases, each timed and stored as a ``Logon`` row:

* **queue**: from the request's arrival to the broker starting on it;
* **claim**: one transaction reuses the user's reservation (reconnect) or takes a ready
  desktop with a compare-and-swap UPDATE; a unique index on (pool, user) over held desktops
  makes the database refuse a second desktop for one user even across brokers;
* **power_on**: start (or resume from saved memory) a desktop the power policy put to sleep;
* **ready**: its guest agent answers and its display listens;
* **session**: on images with the session hook (the desktop flavor), the user's account is
  made and their own graphical session started and seen running (``desktop_session``),
  within the pool's ``session_start_timeout_s``.

A desktop that fails its readiness check (its agent silent, its session not started in
time) goes to ``error`` with an ``error`` event (the reconciler replaces it) and the broker
tries one more; a user whose every try failed is told why for each, and nothing stays
reserved for them. A user who
cannot have a Linux account (``AccountRefused``) is told so and the desktop, not at fault, is
given back. When no desktop
is ready and the pool may grow, a desktop is made for the user and the answer says so.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from deskpool.broker.desktop_session import SessionDidNotStart, SessionStarter
from deskpool.broker.entitlements import entitled_pool_names
from deskpool.broker.profile_logon import ProfileLogon, ProfileUnavailable
from deskpool.broker.records import RecordWriter
from deskpool.broker.share_logon import ShareLogon
from deskpool.domain.accounts import AccountRefused
from deskpool.domain.errors import (
    AgentUnavailable,
    Conflict,
    DeskpoolError,
    Forbidden,
    HostConnectionLost,
    HypervisorUnreachable,
    LostRace,
    NotFound,
    PoolExhausted,
    Unavailable,
)
from deskpool.domain.models import HostState, PoolStatus, PowerState
from deskpool.domain.offline import CheckedOut
from deskpool.domain.profile_merge import ProfilePolicy, SecondSession, refusal
from deskpool.domain.profiles import ALWAYS_EXCLUDED
from deskpool.domain.states import HELD_STATES, PREPARING_STATES, DesktopState
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.factory import DesktopFactory
from deskpool.services.offline_views import checked_out_refusal
from deskpool.services.pools import exclusion_list, insert_pool_desktop
from deskpool.services.profile_copies import holder_hosts
from deskpool.store.access_models import Event, Logon
from deskpool.store.db import DatabaseUnavailable, UnitOfWork
from deskpool.store.models import utcnow
from deskpool.store.repositories import ClaimTarget

S = DesktopState
ATTEMPTS = 2  # desktops tried per logon when one fails its readiness check
CLAIM_RETRIES = 6
SESSION_AGENT_TIMEOUT_S = 30


HandoverStatus = Literal["ready", "pending"]


@dataclass(frozen=True)
class Handover:
    """The answer to a connect: ``ready`` (use ``desktop_id`` now) or ``pending``."""

    status: HandoverStatus
    pool: str
    message: str
    logon_id: uuid.UUID
    desktop_id: uuid.UUID | None = None
    desktop: str | None = None
    hostname: str | None = None
    reconnect: bool = False
    phases_ms: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Claim:
    desktop_id: uuid.UUID | None
    desktop: str | None
    hostname: str | None
    reconnect: bool
    pending_message: str | None = None
    own: bool = False  # the user's already (held, or a dedicated one): never failed for a blip
    host_id: uuid.UUID | None = None
    version_id: uuid.UUID | None = None
    stateful: bool = False  # its pool keeps its users' changes
    session_timeout_s: float | None = None  # the pool's; None: the session starter's own
    roaming_profiles: bool = False  # the user's home is their profile disk
    profile_policy: ProfilePolicy = field(default_factory=ProfilePolicy)  # 2nd session, exclusions
    redirect_folders: tuple[str, ...] = ()  # put on the user's file share


@dataclass(frozen=True)
class _Look:
    """What a reservation needs, read before the write transaction."""

    pool_id: uuid.UUID
    pool: str
    version_id: uuid.UUID
    own_ready: uuid.UUID | None  # the user's own ready desktop (dedicated, or made for them)
    stateful: bool
    session_timeout_s: float
    roaming_profiles: bool
    profile_policy: ProfilePolicy
    redirect_folders: tuple[str, ...] = ()


def _policy_of(pool: ClaimTarget) -> ProfilePolicy:
    """The pool's profile settings; ~/.cache is the hook's own, always kept out."""
    return ProfilePolicy(SecondSession(pool.second_session), tuple(
        path for path in exclusion_list(pool.profile_exclusions)
        if path not in ALWAYS_EXCLUDED))


def _why_for_user(claim: _Claim, exc: DeskpoolError) -> str:
    """What went wrong with one desktop, in words a user can act on (the event has the
    rest)."""
    if isinstance(exc, AgentUnavailable):
        why = "it did not answer"
    elif isinstance(exc, SessionDidNotStart):
        why = "your session did not start in time"
    else:
        why = "it failed to start your session" if "session" in str(exc) else "it failed"
    return f"{claim.desktop}: {why}"


class _Timer:
    def __init__(self) -> None:
        self.phases: dict[str, int] = {}
        self._mark = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0) + round((now - self._mark) * 1000)
        self._mark = now


class Broker:
    def __init__(self, ctx: ServiceContext, *, ready_timeout_s: float = 60.0,
                 records: RecordWriter | None = None,
                 sessions: SessionStarter | None = None,
                 profiles: ProfileLogon | None = None,
                 shares: ShareLogon | None = None) -> None:
        self.ctx = ctx
        self.sessions = sessions or SessionStarter(ctx)
        self.profiles = profiles or ProfileLogon(ctx)
        self.shares = shares or ShareLogon(ctx)
        self.factory = DesktopFactory(ctx)
        self.ready_timeout_s = ready_timeout_s
        self.records = records or RecordWriter(ctx)
        self._agent_by_version: dict[uuid.UUID, bool] = {}

    def connect(self, identity: Identity, pool_name: str, *,
                received_at: float | None = None) -> Handover:
        """Hand ``identity`` a running desktop of ``pool_name`` (see the module docstring).

        ``received_at`` is the ``time.monotonic()`` at which the request arrived. Raises
        ``NotFound`` (no such pool), ``Forbidden`` (not entitled), ``PoolExhausted`` (every
        desktop taken), ``Unavailable`` (no desktop passed its readiness check, or its host
        does not answer); each is also an admin event.
        """
        requested_at = utcnow()
        timer = _Timer()
        if received_at is not None:
            timer.phases["queue"] = max(0, round((time.monotonic() - received_at) * 1000))
        failures: list[str] = []
        try:
            for _attempt in range(ATTEMPTS):
                claim = self._claim(identity, pool_name)
                timer.lap("claim")
                if claim.desktop_id is None:
                    return self._finish(identity, pool_name, requested_at, timer, claim,
                                        "pending", claim.pending_message or "")
                note = ""
                try:
                    agent = self._ensure_running(claim, timer)
                    if agent is not None:
                        note = self._start_session(identity, agent, claim, timer)
                except (AccountRefused, ProfileUnavailable) as exc:
                    self._give_back(identity, pool_name, claim, exc)
                    raise
                except DatabaseUnavailable:
                    raise  # the desktop is not at fault: it stays the user's, to reconnect to
                except DeskpoolError as exc:
                    if claim.own and isinstance(exc, HypervisorUnreachable | HostConnectionLost):
                        # Its host is silent (not yet marked down) or its daemon restarting:
                        # the desktop, and the user's work on it, are kept.
                        raise Unavailable(
                            f"your desktop {claim.desktop} cannot be reached right now ({exc}); "
                            "it is kept for you, please try again shortly") from exc
                    self._fail_readiness(identity, pool_name, claim, exc)
                    failures.append(_why_for_user(claim, exc))
                    continue
                return self._finish(identity, pool_name, requested_at, timer, claim, "ready",
                                    f"desktop {claim.desktop} is ready{note}")
            raise Unavailable(f"no desktop of pool {pool_name!r} passed its readiness check "
                              f"({'; '.join(failures)}); the administrator has been told, "
                              "please try again shortly")
        except DeskpoolError as exc:
            self._refused(identity, pool_name, requested_at, timer, exc)
            raise

    # --- claim ---------------------------------------------------------------------------

    def _claim(self, identity: Identity, pool_name: str) -> _Claim:
        """Look first (a read: no write lock, so logons look in parallel), then reserve in
        a short write transaction: usually one UPDATE ... RETURNING."""
        for retry in range(CLAIM_RETRIES):
            try:
                with self.ctx.uow(read_only=True) as uow:
                    look = self._look(uow, identity, pool_name)
                if isinstance(look, _Claim):
                    return look
                with self.ctx.uow() as uow:
                    claim = self._reserve(uow, identity, look)
                    uow.commit()
                if claim.desktop_id is not None:
                    self.records.add(Event(
                        kind="reserved", message=f"{identity.name} reserved {claim.desktop}",
                        user_name=identity.name, pool_name=look.pool,
                        desktop_id=claim.desktop_id, desktop_name=claim.desktop))
                return claim
            except CheckedOut:
                raise  # a refusal to give the user, not a race to retry
            except Conflict:
                # Another broker won the desktop (LostRace), or this user's other request did
                # (the held-desktop index), or the database broke a deadlock between two
                # claims (LostRace): look again after a short, random pause so racing brokers
                # fall out of step.
                time.sleep(random.uniform(0, 0.02 * (retry + 1)))
        raise Unavailable(f"pool {pool_name!r} is too busy right now; please try again")

    def _look(self, uow: UnitOfWork, identity: Identity, pool_name: str) -> _Claim | _Look:
        """What the user may and already has in the pool: a reconnect or a pending answer
        right away, else what to reserve. Refusals are raised here."""
        pool = uow.pools.claim_target(pool_name)
        if pool is None:
            raise NotFound(f"there is no pool named {pool_name!r}")
        if pool_name not in entitled_pool_names(uow, identity):
            raise Forbidden(f"you are not entitled to pool {pool_name!r}; ask your "
                            "administrator for access")
        mine = uow.desktops.of_user_in_pool(pool.pool_id, identity.name)
        for d in mine:
            if d.state is S.CHECKED_OUT:  # offline on a laptop: its work is there, not here
                raise CheckedOut(checked_out_refusal(uow, d.id, d.name))
            if d.state is S.ERROR:
                raise Unavailable(
                    f"your desktop {d.name} failed and is being repaired, with your files "
                    "kept; please try again in a few minutes" if pool.stateful else
                    f"your desktop {d.name} failed and is being replaced; please try again "
                    "in a minute")
            if d.host_state in (HostState.DOWN, HostState.MAINTENANCE) or (
                    d.host_state is HostState.DRAINING and d.state not in HELD_STATES):
                raise Unavailable(
                    f"your desktop {d.name} is on host {d.host}, which is "
                    f"{d.host_state.value}; it comes back when the host does")
            if d.state in HELD_STATES:
                return _Claim(d.id, d.name, d.hostname, reconnect=True, own=True,
                              host_id=d.host_id, version_id=d.template_version_id,
                              stateful=pool.stateful,
                              session_timeout_s=pool.session_start_timeout_s,
                              roaming_profiles=pool.roaming_profiles,
                              profile_policy=_policy_of(pool),
                              redirect_folders=exclusion_list(pool.redirect_folders))
        if pool.status is not PoolStatus.ENABLED:  # a held desktop is still reconnected to
            raise Forbidden(f"pool {pool_name!r} is "
                            + ("being deleted" if pool.status is PoolStatus.DELETING
                               else "disabled by the administrator")
                            + " and takes no new sessions")
        own_ready = next((d.id for d in mine if d.state is S.READY), None)
        if own_ready is None and any(d.state in PREPARING_STATES for d in mine):
            return _Claim(None, None, None, False, pending_message=(
                "your desktop is being prepared; connect again in a moment"))
        policy = _policy_of(pool)
        # Only a refusing pool asks where the profile is open: no query on other logons.
        if pool.roaming_profiles and policy.second_session is SecondSession.REFUSE:
            refused = refusal(policy.second_session, uow.profiles.open_on(identity.name))
            if refused is not None:  # before anything is reserved for them
                raise Unavailable(refused)
        return _Look(pool.pool_id, pool_name, pool.version_id, own_ready, pool.stateful,
                     pool.session_start_timeout_s, pool.roaming_profiles, policy,
                     exclusion_list(pool.redirect_folders))

    def _reserve(self, uow: UnitOfWork, identity: Identity, look: _Look) -> _Claim:
        if look.own_ready is not None:  # made for this user, or a dedicated one
            if not uow.desktops.reserve(look.own_ready, identity.name):
                raise LostRace(f"desktop {look.own_ready} is no longer ready")
            d = uow.desktops.get(look.own_ready)
            return _Claim(d.id, d.name, d.hostname, reconnect=False, own=True,
                          host_id=d.host_id, version_id=d.template_version_id,
                          stateful=look.stateful, session_timeout_s=look.session_timeout_s,
                          roaming_profiles=look.roaming_profiles,
                          profile_policy=look.profile_policy,
                          redirect_folders=look.redirect_folders)
        now = utcnow()
        # Roaming profiles: a desktop on a host holding the user's latest generation first.
        prefer = holder_hosts(uow, identity.name) if look.roaming_profiles else frozenset()
        free = uow.desktops.claim_free(look.pool_id, look.version_id, identity.name, now,
                                       prefer_hosts=prefer)
        if free is not None:
            return _Claim(free.id, free.name, free.hostname, reconnect=False,
                          host_id=free.host_id, version_id=free.template_version_id,
                          stateful=look.stateful, session_timeout_s=look.session_timeout_s,
                          roaming_profiles=look.roaming_profiles,
                          profile_policy=look.profile_policy,
                          redirect_folders=look.redirect_folders)
        pool = uow.pools.get(look.pool_id)
        # The pool's row lock before its seats are counted: a reconciler's sizing or another
        # broker's logon adding a desktop meanwhile is seen, so max_size holds on PostgreSQL.
        uow.pools.lock(pool.id)
        seats = uow.desktops.seats(pool.id)
        if len(seats) >= pool.max_size:
            # An unassigned ready seat that claim_free passed over is leased, or row-locked
            # by another broker's claim on PostgreSQL (skip locked): it may come free.
            if any(seat.assigned_user is None
                   and (seat.state in PREPARING_STATES or seat.state is S.READY)
                   for seat in seats):
                return _Claim(None, None, None, False, pending_message=(
                    "every desktop is taken or still being prepared; connect again in a "
                    "moment"))
            raise PoolExhausted(f"pool {look.pool!r} is exhausted: all {pool.max_size} "
                                "desktops are in use; please try again later")
        made = insert_pool_desktop(uow, self.factory, pool, uow.desktops.macs(),
                                   assigned_user=identity.name, prefer=prefer)
        made.reserved_at = now
        record_event(uow, "provisioning-for-user",
                     f"no ready desktop in {pool.name}: making {made.name} for {identity.name}",
                     user=identity.name, pool=pool.name, desktop_id=made.id, desktop=made.name)
        return _Claim(None, None, None, False, pending_message=(
            f"no desktop was ready, so {made.name} is being made for you; connect again "
            "in a minute"))

    # --- power on and readiness ----------------------------------------------------------

    def _ensure_running(self, claim: _Claim, timer: _Timer) -> GuestAgent | None:
        """Power on and wait for readiness; the guest agent when the desktop has one."""
        desktop_id = claim.desktop_id
        assert desktop_id is not None and claim.host_id is not None
        assert claim.version_id is not None
        driver = self.ctx.driver_for_id(claim.host_id)
        agent_expected = self._agent_expected(claim.version_id)
        started = driver.get_vm(desktop_id).power_state is not PowerState.RUNNING
        if started:
            driver.start_vm(desktop_id)  # boots, or resumes saved memory
            with self.ctx.uow() as uow:
                desktop = uow.desktops.get(desktop_id)
                uow.desktops.compare_and_set_power(desktop_id, desktop.power_state,
                                                   PowerState.RUNNING)
                uow.commit()
        timer.lap("power_on")
        agent = None
        if agent_expected:
            agent = GuestAgent(driver, desktop_id)
            agent.wait_until_ready(self.ready_timeout_s, poll_s=0.1)
            if started:
                agent.set_time()  # a resumed guest's clock stood still while it slept
        driver.console_address(desktop_id)  # the display listens
        timer.lap("ready")
        return agent

    def _start_session(self, identity: Identity, agent: GuestAgent, claim: _Claim,
                       timer: _Timer) -> str:
        """Sign the user in to their own graphical session, on images that can; what the
        user is told besides "ready" (a temporary home), else ``""``."""
        assert claim.version_id is not None
        if not self.sessions.has_hook(agent, claim.version_id):
            return ""
        account, uid = self.sessions.account_for(identity)
        serial, note = None, ""
        if claim.roaming_profiles:
            assert claim.desktop is not None and claim.desktop_id is not None
            desktop_id = claim.desktop_id
            try:
                serial = self.profiles.attach(identity.name, uid, claim.desktop, agent.driver,
                                              claim.desktop_id,
                                              claim.profile_policy.second_session)
            except ProfileUnavailable:
                # A floating desktop is reverted at logoff: a temporary home there loses
                # nothing that was kept. A stateful one would keep a local home beside the
                # profile, so its user is refused (and the desktop given back).
                if claim.stateful:
                    raise
                self.profiles.tell_temporary(identity.name, claim.desktop)
                note = (", with a temporary home: your roaming profile could not be loaded "
                        "and nothing saved in this session is kept")
        # A guest starting its session is busy: give each agent command more time.
        slow = GuestAgent(agent.driver, agent.vm_id, command_timeout_s=SESSION_AGENT_TIMEOUT_S)
        share = None
        try:
            # A reconnect keeps the share its session mounted (a new password would break
            # it). Inside the try: a guest gone silent here ends the profile session too.
            if claim.redirect_folders and not claim.reconnect:
                share = self.shares.open(identity.name, account, uid, claim.desktop or "",
                                         slow, claim.redirect_folders)
            problem = self.sessions.sign_in(
                slow, identity, account, uid, timeout_s=claim.session_timeout_s,
                profile_serial=serial, profile_exclusions=claim.profile_policy.exclusions,
                share=tuple(share.hook_arguments(account)) if share else ())
        except DeskpoolError:
            if serial is not None and not claim.reconnect:
                self.profiles.abandon(desktop_id)
            if share is not None:
                self.shares.abandon(identity.name, uid, claim.desktop or "")
            raise
        if claim.redirect_folders and not claim.reconnect:
            note += self.shares.settle(identity.name, uid, claim.desktop or "",
                                       claim.redirect_folders, opened=share is not None,
                                       problem=problem)
        timer.lap("session")
        return note

    def _agent_expected(self, version_id: uuid.UUID) -> bool:
        """Whether desktops of this template version run deskpool's guest agent (versions
        never change once published, so the answer is kept)."""
        known = self._agent_by_version.get(version_id)
        if known is None:
            with self.ctx.uow(read_only=True) as uow:
                known = uow.versions.get(version_id).customization.value != "none"
            self._agent_by_version[version_id] = known
        return known

    def _fail_readiness(self, identity: Identity, pool_name: str, claim: _Claim,
                        exc: DeskpoolError) -> None:
        assert claim.desktop_id is not None
        reason = f"failed its readiness check at hand-over: {exc}"
        with self.ctx.uow() as uow:
            desktop = uow.desktops.get(claim.desktop_id)
            # A lost race leaves it to whoever moved it on meanwhile (e.g. released). A
            # stateful desktop stays its user's, with their changes, and is repaired; any
            # other is given back and replaced.
            if claim.stateful and desktop.assigned_user is not None:
                uow.desktops.compare_and_set_state(claim.desktop_id, desktop.state, S.ERROR,
                                                   last_error=reason)
            else:
                uow.desktops.fail_and_unassign(claim.desktop_id, desktop.state, reason)
            record_event(uow, "readiness-failed", f"{claim.desktop} {reason}",
                         severity="error", user=identity.name, pool=pool_name,
                         desktop_id=claim.desktop_id, desktop=claim.desktop)
            uow.commit()

    def _give_back(self, identity: Identity, pool_name: str, claim: _Claim,
                   exc: DeskpoolError) -> None:
        """The user cannot sign in to this (healthy) desktop: back to ready, theirs no more
        unless it was theirs before (dedicated), and an error event for the admin."""
        assert claim.desktop_id is not None
        with self.ctx.uow() as uow:
            if not claim.reconnect:
                uow.desktops.give_back(claim.desktop_id, keep_user=claim.own)
            kind, why = (("profile-refused", exc.detail) if isinstance(exc, ProfileUnavailable)
                         else ("account-refused", str(exc)))
            record_event(uow, kind, f"{identity.name} -> {claim.desktop}: {why}",
                         severity="error", user=identity.name, pool=pool_name,
                         desktop_id=claim.desktop_id, desktop=claim.desktop)
            uow.commit()

    # --- bookkeeping ---------------------------------------------------------------------

    def _finish(self, identity: Identity, pool_name: str, requested_at: datetime,
                timer: _Timer, claim: _Claim, status: HandoverStatus,
                message: str) -> Handover:
        logon_id = uuid.uuid4()
        self.records.add(Logon(
            id=logon_id, user_name=identity.name, pool_name=pool_name,
            desktop_id=claim.desktop_id, desktop_name=claim.desktop,
            requested_at=requested_at, reconnect=claim.reconnect, outcome=status,
            handed_over_at=utcnow() if status == "ready" else None, message=message,
            **{f"{k}_ms": v for k, v in timer.phases.items()}))
        return Handover(status=status, pool=pool_name, message=message, logon_id=logon_id,
                        desktop_id=claim.desktop_id, desktop=claim.desktop,
                        hostname=claim.hostname, reconnect=claim.reconnect,
                        phases_ms=dict(timer.phases))

    def _refused(self, identity: Identity, pool_name: str, requested_at: datetime,
                 timer: _Timer, exc: DeskpoolError) -> None:
        outcome = "refused" if isinstance(exc, NotFound | Forbidden) else "failed"
        self.records.add(
            Logon(user_name=identity.name, pool_name=pool_name, requested_at=requested_at,
                  outcome=outcome, message=str(exc),
                  **{f"{k}_ms": v for k, v in timer.phases.items()}),
            Event(kind=f"logon-{outcome}", message=f"{identity.name} -> {pool_name}: {exc}",
                  severity="warning", user_name=identity.name, pool_name=pool_name))

