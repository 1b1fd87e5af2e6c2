"""Folder redirection: the user's share on deskpool's Samba server, opened at logon and
closed at logoff, for pools with ``redirect_folders`` on desktops with the session hook.

* **Logon** (:meth:`FileShares.open`, called by the broker's hand-over before
  ``session-hook start``): the server must answer and the user's share (made on first use,
  ``deskpool.fileshare.samba``) be under its quota; then a fresh random password is set
  for it, good for this session only, and handed back in a :class:`ShareGrant`, which the
  broker writes into the guest as a 0600 credentials file (through the guest agent, never
  on a command line) for the hook to mount with. The password is kept nowhere: not in the
  database, not in an event, not in a log line.
* **Logoff** (:meth:`FileShares.close`, called by the reconciler before it recycles or
  retires a desktop, after the profile's logoff ended the user's processes):
  ``session-hook unshare ACCOUNT`` unmounts the folders and the share in the guest (best
  effort: the guest may be gone), then the password is revoked on the server (disabled,
  replaced, open connections ended), whatever the guest did: the old credential never
  works again.
* **A share that cannot be opened** (the server down or refusing, the share at its quota)
  is :class:`ShareUnavailable`, with an ``error`` event ``fileshare-unavailable`` for the
  admin naming why; the broker then signs the user in with their local folders and their
  portal says so (``folders-local``, :meth:`FileShares.tell_local`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field

from deskpool.config import Settings
from deskpool.domain.errors import DeskpoolError, NotFound, Unavailable
from deskpool.drivers.agent import GuestAgent
from deskpool.fileshare.samba import (
    FileServerUnavailable,
    SambaLayout,
    SambaServer,
    account_for,
)
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.profile_desktops import SESSION_HOOK

log = logging.getLogger(__name__)

MIB = 1 << 20


def samba_layout(settings: Settings) -> SambaLayout:
    """deskpool's Samba server as the settings describe it."""
    return SambaLayout(state_dir=settings.resolved_fileshare_dir,
                       share_root=settings.resolved_fileshare_root,
                       port=settings.fileshare_port, listen=settings.fileshare_listen,
                       quota_mib=settings.fileshare_quota_mib,
                       account_prefix=settings.fileshare_account_prefix)


CREDENTIALS_DIR = "/run/deskpool-creds"  # the desktop image makes it 0700 root at boot


def credentials_path(account: str) -> str:
    """Where the broker writes the session's credentials in the guest: a directory of
    root's alone (qemu-ga makes new files 0666 less its umask, so the directory is what
    keeps users out), and the hook deletes the file once mounted."""
    return f"{CREDENTIALS_DIR}/share-{account}"


@dataclass(frozen=True)
class ShareGrant:
    """One session's access to the user's share, as the guest reaches it."""

    server: str
    port: int
    share: str
    username: str
    folders: tuple[str, ...]
    password: str = field(repr=False)  # this session's alone; never stored

    def credentials(self) -> bytes:
        """The mount.cifs credentials file's text."""
        return f"username={self.username}\npassword={self.password}\n".encode()

    def hook_arguments(self, account: str) -> list[str]:
        """``session-hook start`` options: the share, where the credentials are, the folders
        (nothing secret: the password is in the file)."""
        argv = ["--share", f"//{self.server}/{self.share}", "--share-port", str(self.port),
                "--share-credentials", credentials_path(account)]
        for folder in self.folders:
            argv += ["--redirect", folder]
        return argv


class ShareUnavailable(Unavailable):
    """The user's share cannot be used this session; ``detail`` says why, for the admin."""

    def __init__(self, user: str, detail: str) -> None:
        super().__init__("your redirected folders cannot be reached right now")
        self.user = user
        self.detail = detail


class FileShares:
    def __init__(self, ctx: ServiceContext, *, server: SambaServer | None = None) -> None:
        self.ctx = ctx
        self._server = server
        self._configured = server is not None
        self._lock = threading.Lock()

    @property
    def server(self) -> SambaServer:
        """The server, its configuration written once per process (smbd reads it again by
        itself; an unchanged file is not rewritten)."""
        with self._lock:
            if self._server is None:
                self._server = SambaServer(samba_layout(self.ctx.settings))
            if not self._configured:
                self._server.write_config()
                self._configured = True
            return self._server

    # --- logon -----------------------------------------------------------------------------

    def open(self, user: str, uid: int, desktop: str, folders: tuple[str, ...],
             desktop_id: uuid.UUID) -> ShareGrant:
        """This session's grant to ``user``'s share (see the module docstring), recorded on
        the desktop (``share_user``) before the password exists, so a logoff or a broker
        that died meanwhile revokes it; raises ``ShareUnavailable`` after writing the
        admin's event."""
        settings = self.ctx.settings
        try:
            server = self.server
            if not server.reachable():
                raise FileServerUnavailable(
                    f"the file server does not answer on {server.layout.listen}:"
                    f"{server.layout.port}")
            share = server.ensure_share(uid)
            used = server.usage_bytes(share)
            quota = settings.fileshare_quota_mib * MIB
            if used >= quota:
                raise FileServerUnavailable(
                    f"the share {share} holds {used / MIB:.1f} MiB, at or above its quota of "
                    f"{settings.fileshare_quota_mib} MiB")
            with self.ctx.uow() as uow:
                uow.desktops.get(desktop_id).share_user = user
                uow.commit()
            password = server.issue(share)
        except (DeskpoolError, OSError) as exc:
            detail = (f"the folders of {user} could not be redirected on {desktop}: {exc}; "
                      "they are local this session")
            with self.ctx.uow() as uow:
                record_event(uow, "fileshare-unavailable", detail, severity="error", user=user,
                             desktop=desktop)
                uow.commit()
            raise ShareUnavailable(user, detail) from exc
        log.info("share %s opened for %s on %s", share, user, desktop)
        return ShareGrant(server=settings.fileshare_guest_address,
                          port=settings.fileshare_guest_port or settings.fileshare_port,
                          share=share, username=share, folders=folders, password=password)

    def tell_local(self, user: str, desktop: str, folders: tuple[str, ...],
                   why: str = "the file server cannot be reached") -> None:
        """The user's portal message for a session whose folders stay on the desktop."""
        with self.ctx.uow() as uow:
            record_event(uow, "folders-local",
                         f"your folders {', '.join(folders)} are not redirected to your file "
                         f"share in this session on {desktop} ({why}): files saved there "
                         "stay on this desktop and are not on your share. Your administrator "
                         "has been told.", severity="warning", user=user, desktop=desktop)
            uow.commit()

    def revoke(self, uid: int) -> None:
        """The password issued for ``uid``'s share no longer works (a failed hand-over, a
        logoff)."""
        self.server.revoke(account_for(self.server.layout, uid))

    # --- logoff ----------------------------------------------------------------------------

    def close(self, desktop_id: uuid.UUID) -> bool:
        """At logoff: unmount in the guest (best effort), then revoke the password of the
        share a session on the desktop was given (its ``share_user``), unless the user's
        session on another desktop holds a newer one. False when there is none. A
        revocation that fails is an ``error`` event, and ``share_user`` stays for the next
        logoff of the desktop to try again."""
        with self.ctx.uow(read_only=True) as uow:
            try:
                desktop = uow.desktops.get(desktop_id)
            except NotFound:
                return False
            user = desktop.share_user
            found = uow.linux_accounts.find(user) if user else None
            pool_name = uow.pools.get(desktop.pool_id).name if desktop.pool_id else None
            name, host_id = desktop.name, desktop.host_id
            # The user's session on another desktop holds the current password (issued
            # after this one's, which no longer works): it is revoked at that logoff.
            elsewhere = [d for d in uow.desktops.share_holders(user) if d != name] if user \
                else []
        if user is None or found is None:
            return False
        account, uid = found
        try:
            agent = GuestAgent(self.ctx.driver_for_id(host_id), desktop_id,
                               command_timeout_s=10)
            code, _out, err = agent.exec_capture(
                ["/bin/sh", SESSION_HOOK, "unshare", account], timeout_s=60.0)
            if code != 0:
                log.warning("session-hook unshare on %s: %s", name, err.strip()[:300])
        except DeskpoolError as exc:  # the guest is gone or silent: the server is what counts
            log.info("could not unmount %s's share in %s: %s", user, name, exc)
        try:
            if not elsewhere:
                self.revoke(uid)
        except (DeskpoolError, OSError) as exc:
            with self.ctx.uow() as uow:
                record_event(uow, "fileshare-revoke-failed",
                             f"the session password of {user}'s share could not be revoked "
                             f"at logoff from {name}: {exc}", severity="error", user=user,
                             pool=pool_name, desktop_id=desktop_id, desktop=name)
                uow.commit()
            return True
        with self.ctx.uow() as uow:
            uow.desktops.get(desktop_id).share_user = None
            record_event(uow, "fileshare-closed", f"{user}'s share closed at logoff from {name}"
                         + (f" (still open on {', '.join(elsewhere)})" if elsewhere else ""),
                         user=user, pool=pool_name, desktop_id=desktop_id, desktop=name)
            uow.commit()
        return True
