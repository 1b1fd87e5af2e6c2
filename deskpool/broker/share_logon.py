"""The user's redirected folders at hand-over, for pools with ``redirect_folders``.

Before ``session-hook start`` the broker opens the user's share for this session
(``FileShares.open``: a fresh random password) and writes the credentials into the guest
through the guest agent (``guest-file-write`` into ``/run/deskpool-creds``, a directory of
root's alone; never a command line a ``ps`` in the guest would show); the hook mounts the
share with them,
deletes the file and binds each folder of the share over the same folder of the home.

Folders that cannot be redirected never cost the user their desktop: the file server down
or refusing, the share at its quota, or the guest unable to mount it (its hook says why on
a line of its own). The user then signs in with local folders, the hand-over's answer and
their portal say so (``folders-local``), the admin gets an ``error`` event
(``fileshare-unavailable``), and a password issued but not used is revoked at once. Logoff
is the reconciler's (``FileShares.close``).
"""

from __future__ import annotations

import logging
from contextlib import suppress

from deskpool.domain.errors import (
    AgentUnavailable,
    DeskpoolError,
    DriverError,
    NotFound,
    VmNotFound,
)
from deskpool.drivers.agent import GuestAgent
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.fileshare import (
    FileShares,
    ShareGrant,
    ShareUnavailable,
    credentials_path,
)

log = logging.getLogger(__name__)


class ShareLogon:
    def __init__(self, ctx: ServiceContext, *, shares: FileShares | None = None) -> None:
        self.ctx = ctx
        self.shares = shares or FileShares(ctx)

    def open(self, user: str, account: str, uid: int, desktop: str, agent: GuestAgent,
             folders: tuple[str, ...]) -> ShareGrant | None:
        """This session's grant, its credentials already in the guest; None when the share
        cannot be used (the admin's event written: ``settle`` tells the user). A silent
        guest raises what the agent raised (the desktop's fault), the password revoked
        first."""
        try:
            grant = self.shares.open(user, uid, desktop, folders, agent.vm_id)
        except ShareUnavailable:
            return None
        try:
            agent.write_file(credentials_path(account), grant.credentials())
        except DriverError as exc:
            self.abandon(user, uid, desktop)
            if isinstance(exc, AgentUnavailable | VmNotFound):
                raise  # the desktop's fault: the hand-over fails it
            # The agent answered but could not write there: an image without the
            # credentials directory (made before folder redirection). Local folders.
            with self.ctx.uow() as uow:
                record_event(uow, "fileshare-unavailable",
                             f"the folders of {user} could not be redirected on {desktop}: "
                             f"its guest did not take the share's credentials ({exc}); they "
                             "are local this session", severity="error", user=user,
                             desktop=desktop)
                uow.commit()
            return None
        return grant

    def abandon(self, user: str, uid: int, desktop: str) -> None:
        """The session on ``desktop`` will not use its password: revoked now (best effort:
        the logoff revokes it again), unless the user's session on another desktop uses
        the share (revoking ends its connections; the password it was given is the one
        this hand-over replaced, so it is dead for new logons already)."""
        with self.ctx.uow() as uow:
            # This desktop holds no usable password of the user's any more.
            with suppress(NotFound):
                held = uow.desktops.get_by_name(desktop)
                if held.share_user == user:
                    held.share_user = None
            elsewhere = [d for d in uow.desktops.share_holders(user) if d != desktop]
            uow.commit()
        if elsewhere:
            log.info("share of %s left open for its session on %s", user, ", ".join(elsewhere))
            return
        try:
            self.shares.revoke(uid)
        except (DeskpoolError, OSError) as exc:
            log.warning("could not revoke the unused share password of %s: %s", user, exc)

    def settle(self, user: str, uid: int, desktop: str, folders: tuple[str, ...], *,
               opened: bool, problem: str | None) -> str:
        """After the session started: what the user is told besides "ready" (``""`` when
        their folders are on their share)."""
        if opened and problem is None:
            return ""
        if opened:  # the server issued it, the guest could not mount it
            self.abandon(user, uid, desktop)
            with self.ctx.uow() as uow:
                record_event(uow, "fileshare-unavailable",
                             f"the folders of {user} could not be redirected on {desktop}: "
                             f"the desktop could not mount the share ({problem}); they are "
                             "local this session", severity="error", user=user,
                             desktop=desktop)
                uow.commit()
        why = ("the desktop could not reach your file share" if opened
               else "your file share cannot be reached or is full")
        self.shares.tell_local(user, desktop, folders, why)
        return (f", with local folders: your {', '.join(folders)} could not be redirected "
                "to your file share this session")
