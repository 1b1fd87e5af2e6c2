"""Single sign-on at hand-over: the user's own graphical session on a desktop-flavor desktop.

Images that can do it carry ``SESSION_HOOK`` (the desktop flavor's guest files); the broker
looks for it through the guest agent once per template version (versions never change once
published) and keeps the answer. For those desktops, after the agent answers:

1. the user's Linux account name comes from the rule in ``deskpool.domain.accounts`` and
   their uid from the database (allocated once, the same on every desktop), or from the
   directory's uidNumber / gidNumber when their LDAP entry has them (recorded the same way);
2. ``session-hook start`` makes the account and restarts LightDM with a one-shot autologin
   (it answers ``running`` and does nothing when the user's session already runs: a
   reconnect);
3. ``session-hook wait`` answers once the session runs (logind: x11, active; Xfce's panel
   and desktop running as the user), asking inside the guest, and drops the one-shot
   autologin; images whose hook predates ``wait`` have ``check`` polled through the agent.

Desktops without the hook (the console flavor) are handed over exactly as before.

Afterwards ``session-hook status`` is the broker's view into the desktop (``status``): the
logind sessions of its users (LightDM's greeter, a system user, left out) and the X
server's own input idle time; ``deskpool.broker.sessions`` turns it into login, logout and
idle.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deskpool.domain.accounts import AccountRefused, linux_account_name
from deskpool.domain.errors import AgentUnavailable, DriverError, Unavailable, VmNotFound
from deskpool.domain.users import Identity
from deskpool.drivers.agent import GuestAgent
from deskpool.services.context import ServiceContext
from deskpool.services.profile_desktops import SESSION_HOOK

__all__ = ["SESSION_HOOK", "GuestSession", "SessionDidNotStart", "SessionStarter",
           "parse_status"]

GRAPHICAL_TYPES = frozenset({"x11", "wayland"})


class SessionDidNotStart(Unavailable):
    """The user's graphical session was not seen running within the pool's timeout."""


@dataclass(frozen=True)
class GuestSession:
    """One logind session of a (non-system) user in the guest, as ``session-hook status``
    reports it."""

    id: str
    user: str
    uid: int
    type: str  # x11, wayland, tty, unspecified (e.g. an xrdp session's PAM)
    state: str  # active, online, closing
    active: bool  # the seat's foreground session
    display: str  # ":0" for LightDM's; "" when none
    locked: bool  # logind's LockedHint (no screen locker in the image: stays False)
    idle_hint: bool
    idle_since_us: int  # logind's IdleSinceHint, µs since the epoch (0: never idle)
    x_idle_ms: int | None  # the X server's input idle time; None when it could not be read

    @property
    def live(self) -> bool:
        """Still the user's: a session ``closing`` is over (a process it left behind may
        keep it listed for a while)."""
        return self.state != "closing"

    @property
    def graphical(self) -> bool:
        return self.type in GRAPHICAL_TYPES


def parse_status(text: str) -> list[GuestSession]:
    """The sessions in ``session-hook status``'s one line of JSON; ``DriverError`` naming
    what is wrong when it is not that."""
    try:
        doc = json.loads(text)
        rows = doc["sessions"]
        if not isinstance(rows, list):
            raise TypeError("sessions is not a list")
        return [_session(row) for row in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise DriverError(f"session-hook status gave an unreadable answer ({exc}): "
                          f"{text.strip()[:200]!r}") from None


def _session(row: Any) -> GuestSession:
    def typed(key: str, kind: type[Any]) -> Any:
        value = row[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"{key} is not {kind.__name__}: {value!r}")
        return value

    x_idle = row.get("x_idle_ms")
    if x_idle is not None and (not isinstance(x_idle, int) or isinstance(x_idle, bool)):
        raise TypeError(f"x_idle_ms is not an int: {x_idle!r}")
    return GuestSession(
        id=typed("id", str), user=typed("user", str), uid=typed("uid", int),
        type=typed("type", str), state=typed("state", str), active=typed("active", bool),
        display=typed("display", str), locked=typed("locked", bool),
        idle_hint=typed("idle_hint", bool), idle_since_us=typed("idle_since_us", int),
        x_idle_ms=x_idle)


class SessionStarter:
    def __init__(self, ctx: ServiceContext, *, timeout_s: float = 150.0, poll_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._clock = clock
        self._sleep = sleep
        self._hook_by_version: dict[uuid.UUID, bool] = {}

    def has_hook(self, agent: GuestAgent, version_id: uuid.UUID) -> bool:
        """Whether desktops of this version carry the session hook (asked once per version;
        a silent agent is not an answer and raises ``AgentUnavailable``)."""
        known = self._hook_by_version.get(version_id)
        if known is None:
            try:
                agent.read_file(SESSION_HOOK, max_bytes=1 << 20)
                known = True
            except AgentUnavailable:
                raise
            except DriverError:  # the agent answered: no such file
                known = False
            self._hook_by_version[version_id] = known
        return known

    def status(self, agent: GuestAgent) -> list[GuestSession]:
        """The guest's user sessions now (``session-hook status``); ``AgentUnavailable``
        when the agent is silent, ``DriverError`` when the hook fails or answers nonsense."""
        code, out, err = agent.exec_capture(["/bin/sh", SESSION_HOOK, "status"],
                                            timeout_s=30.0)
        if code != 0:
            raise DriverError(f"session-hook status failed ({code}): {err.strip()[:300]}")
        return parse_status(out)

    def account_for(self, identity: Identity) -> tuple[str, int]:
        """The user's (account, uid): the directory's uidNumber (and gidNumber) when the
        identity carries them, else allocated on first use; ``AccountRefused`` when the name
        cannot be mapped, another user already has the account or the uid, or the directory's
        numbers are a system account's."""
        account = linux_account_name(identity.name)
        with self.ctx.uow() as uow:
            found = uow.linux_accounts.get_or_allocate(identity.name, account,
                                                       uid=identity.uid, gid=identity.gid)
            uow.commit()
        return found

    def _wait_in_guest(self, agent: GuestAgent, account: str, limit: float) -> bool | None:
        """``session-hook wait``: one agent command that answers when the session runs
        (True) or ``limit`` has passed (False). None when this image's hook has no ``wait``
        (it answers 2, usage) or the agent did not answer in time: poll ``check`` then."""
        try:
            code, _out, err = agent.exec_capture(
                ["/bin/sh", SESSION_HOOK, "wait", account, str(max(1, math.ceil(limit)))],
                timeout_s=limit + 30.0)
        except VmNotFound:
            raise
        except DriverError:
            return None
        if code in (0, 1):
            return code == 0
        if code == 2:
            return None
        raise Unavailable(f"could not wait for {account}'s session: the session hook failed "
                          f"({code}): {err.strip()[:300]}")

    def sign_in(self, agent: GuestAgent, identity: Identity, account: str, uid: int, *,
                timeout_s: float | None = None, profile_serial: str | None = None,
                profile_exclusions: tuple[str, ...] = (), share: tuple[str, ...] = ()
                ) -> str | None:
        """Start the user's session and wait until it runs; ``Unavailable`` when the hook
        fails or the session does not run within ``timeout_s`` (the pool's; by default this
        starter's); ``AccountRefused`` when the account is one of the guest's system
        accounts. ``profile_serial``: the user's roaming profile disk, which the hook mounts
        on their home before the session starts, keeping ``profile_exclusions`` (paths
        inside the home, besides ~/.cache) on the desktop's own disk. ``share``: the hook's
        options mounting the user's file share and redirecting folders to it
        (``ShareGrant.hook_arguments``). Returns why the share could not be mounted in the
        guest (the session starts with local folders then), else None."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        with self.ctx.uow(read_only=True) as uow:
            gid = uow.linux_accounts.gid_of(identity.name)
        # A primary group other than the user's private one (a directory's gidNumber) goes
        # as a 4th argument; without it the hook uses gid = uid, as images before it did.
        extra = [str(gid)] if gid is not None and gid != uid else []
        # The option comes first, so images without profiles keep their call form.
        profile = ["--profile", profile_serial] if profile_serial else []
        for path in profile_exclusions if profile_serial else ():
            profile += ["--exclude", path]
        def start(options: list[str]) -> tuple[int, str, str]:
            return agent.exec_capture(
                ["/bin/sh", SESSION_HOOK, "start", *options, account, str(uid),
                 identity.display_name or identity.name, *extra],
                # Mounting the profile waits for the hot-plugged disk (up to 60 s in the
                # guest), the share for the server (up to 30 s).
                timeout_s=min(limit, 90.0) + (60.0 if profile else 0.0)
                + (30.0 if share else 0.0))

        share_problem = None
        code, out, err = start([*profile, *share])
        if code == 2 and share:
            # An image whose hook predates folder redirection (or refuses these options):
            # local folders, not a failed desktop.
            share_problem = ("this desktop's session hook cannot mount file shares: "
                             + err.strip()[:200])
            code, out, err = start(profile)
        if code == 2 and profile:
            raise Unavailable(f"could not sign {account} in: this desktop's image cannot "
                              "mount roaming profiles (its session hook is older); "
                              f"{err.strip()[:200]}")
        if code == 4:  # the guest's own system account: the user's name, not the desktop
            raise AccountRefused(f"user {identity.name!r} cannot have a Linux account on a "
                                 f"desktop: {account!r} is a system account there; ask your "
                                 "administrator to rename the user")
        if code != 0:
            raise Unavailable(f"could not sign {account} in: the session hook failed "
                              f"({code}): {err.strip()[:300]}")
        lines = out.strip().splitlines() or [""]
        for line in lines[1:]:  # the hook's report on the share, after its first line
            if line.startswith("share-failed:"):
                share_problem = line.removeprefix("share-failed:").strip()[:300]
        if lines[0] == "running":
            return share_problem
        deadline = self._clock() + limit
        waited = self._wait_in_guest(agent, account, limit)
        if waited:
            return share_problem
        if waited is False:
            raise SessionDidNotStart(
                f"{account}'s graphical session did not start within {limit:g} s")
        while True:  # an image whose hook cannot wait, or an agent too busy to say: poll
            try:
                code, _out, err = agent.exec_capture(
                    ["/bin/sh", SESSION_HOOK, "check", account], timeout_s=30.0)
            except VmNotFound:
                raise
            except DriverError as exc:
                # A guest busy starting Xorg and Xfce (one vCPU, TCG) may answer late: not
                # yet, until the deadline.
                code, err = 1, str(exc)
            if code == 0:
                return share_problem
            if code != 1:
                raise Unavailable(f"could not check {account}'s session: the session hook "
                                  f"failed ({code}): {err.strip()[:300]}")
            if self._clock() >= deadline:
                raise SessionDidNotStart(
                    f"{account}'s graphical session did not start within {limit:g} s"
                    + (f" ({err.strip()[:300]})" if err.strip() else ""))
            self._sleep(self.poll_s)
