"""The user's roaming profile at hand-over, for pools with ``roaming_profiles``.

Before ``session-hook start``, the user's session layer is plugged into the desktop
(``ProfileDesktops.open``: a reconnect finds the one still plugged in) and its serial goes
to the hook, which mounts it on their home before their session starts. When the session
then fails to start, the layer is ended at once (unmounted, detached, committed or set
aside) rather than left on a desktop that is about to be failed and replaced. Logoff is
the reconciler's (``ProfileDesktops.close`` before a recycle or retire).

A profile that cannot be plugged in (its store full, a committed layer missing or damaged,
a layer the desktop's host lacks that no host holding it can send, the attach refused) is
``ProfileUnavailable``, with an error event for the admin naming why; the desktop is not at
fault. The broker then gives a floating pool's user a temporary home
(:meth:`ProfileLogon.tell_temporary`: their portal says so) and refuses a stateful pool's
user, whose desktop would keep a local home beside the profile.
"""

from __future__ import annotations

import logging
import time
import uuid

from deskpool.domain.errors import (
    AgentUnavailable,
    DeskpoolError,
    HostConnectionLost,
    HypervisorUnreachable,
    Unavailable,
    VmNotFound,
)
from deskpool.domain.profile_merge import SecondSession
from deskpool.drivers.base import HypervisorDriver
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.profile_desktops import ProfileDesktops
from deskpool.store.db import DatabaseUnavailable

log = logging.getLogger(__name__)


# Faults of the desktop or its host, not of the profile: the hand-over's own handling
# (fail the desktop, or keep it for a host that comes back) applies.
_NOT_THE_PROFILES = (AgentUnavailable, DatabaseUnavailable, HostConnectionLost,
                     HypervisorUnreachable, VmNotFound)


class ProfileUnavailable(Unavailable):
    """The user's profile could not be plugged in; ``detail`` says why, for the admin."""

    def __init__(self, user: str, detail: str) -> None:
        super().__init__("your roaming profile cannot be loaded right now (your administrator "
                         "has been told); please try again later")
        self.user = user
        self.detail = detail


class ProfileLogon:
    def __init__(self, ctx: ServiceContext, *, desktops: ProfileDesktops | None = None) -> None:
        self.ctx = ctx
        self.desktops = desktops or ProfileDesktops(ctx)

    def attach(self, user: str, uid: int, desktop: str, driver: HypervisorDriver,
               desktop_id: uuid.UUID, second_session: SecondSession = SecondSession.MERGE
               ) -> str:
        """Plug ``user``'s profile into the desktop; the serial the guest finds it by. The
        profile is made on first use, its root owned by the user's uid and primary group.
        ``second_session``: the pool's policy, should their profile be open elsewhere."""
        with self.ctx.uow(read_only=True) as uow:
            gid = uow.linux_accounts.gid_of(user)
        started = time.monotonic()
        try:
            serial = self.desktops.open(user, desktop, driver, desktop_id,
                                        owner=(uid, uid if gid is None else gid),
                                        second_session=second_session)
        except _NOT_THE_PROFILES:
            raise
        except (DeskpoolError, OSError) as exc:  # OSError: the profile store itself
            detail = f"the roaming profile of {user} could not be plugged into {desktop}: {exc}"
            with self.ctx.uow() as uow:
                record_event(uow, "profile-unavailable", detail, severity="error", user=user,
                             desktop=desktop)
                uow.commit()
            raise ProfileUnavailable(user, detail) from exc
        log.info("profile of %s plugged into %s as %s in %.2f s", user, desktop, serial,
                 time.monotonic() - started)
        return serial

    def abandon(self, desktop_id: uuid.UUID) -> None:
        """The hand-over failed after the profile went in: end its session now (best effort:
        what is left is set aside by the reconciler's recovery)."""
        try:
            self.desktops.close(desktop_id)
        except DeskpoolError as exc:
            log.warning("could not end the profile session on %s after a failed hand-over: %s",
                        desktop_id, exc)

    def tell_temporary(self, user: str, desktop: str) -> None:
        """The user's portal message for a session on a temporary home (their profile was
        unavailable, the event before this one says why)."""
        with self.ctx.uow() as uow:
            record_event(uow, "profile-temporary",
                         f"your roaming profile could not be loaded, so this session on "
                         f"{desktop} has a temporary home: files saved in it are not kept "
                         "when you log off. Your profile itself is unchanged; your "
                         "administrator has been told.", severity="warning", user=user,
                         desktop=desktop)
            uow.commit()
