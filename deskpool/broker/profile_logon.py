"""The user's roaming profile at hand-over, for pools with ``roaming_profiles``.

Before ``session-hook start``, the user's session layer is plugged into the desktop
(``ProfileDesktops.open``: a reconnect finds the one still plugged in) and its serial goes
to the hook, which mounts it on their home before their session starts. When the session
then fails to start, the layer is ended at once (unmounted, detached, committed or set
aside) rather than left on a desktop that is about to be failed and replaced. Logoff is
the reconciler's (``ProfileDesktops.close`` before a recycle or retire).
"""

from __future__ import annotations

import logging
import time
import uuid

from deskpool.domain.errors import DeskpoolError
from deskpool.domain.profile_merge import SecondSession
from deskpool.drivers.base import HypervisorDriver
from deskpool.services.context import ServiceContext
from deskpool.services.profile_desktops import ProfileDesktops

log = logging.getLogger(__name__)


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
        serial = self.desktops.open(user, desktop, driver, desktop_id,
                                    owner=(uid, uid if gid is None else gid),
                                    second_session=second_session)
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
