"""Roaming profiles on desktops: the user's profile is plugged in at logon and ended at logoff.

``ProfileService`` keeps the layers; this module puts them on the desktops of pools with
``roaming_profiles`` whose image carries the session hook (the desktop flavor):

* **Logon** (:meth:`ProfileDesktops.open`, called by the broker's hand-over before
  ``session-hook start``): the user's session layer already plugged into this desktop (a
  reconnect), else a new one on their committed generation (their profile made first if
  they have none, its root owned by their uid). When the desktop's host lacks layers of the
  user's chain (they were written on another host), only those are copied to it first
  (``services.profile_copies``: layers are immutable); a base made now, and each generation
  a logoff commits, is recorded as held by the desktop's host. The broker passes the disk's
  serial to ``session-hook start --profile SERIAL``, which waits for the disk, checks its
  label and mounts it on the user's home before their session starts.
* **Logoff** (:meth:`ProfileDesktops.close`, called by the reconciler before it recycles or
  retires a desktop, and by the broker when a hand-over fails after the disk went in):
  ``session-hook end ACCOUNT`` ends the user's sessions, waits for their processes, syncs
  and unmounts; then ``end_session`` detaches, checks and commits. A guest that does not
  answer, or cannot unmount, is powered off (QEMU closes the file: nothing is written
  after) and the layer is set aside as unclean with a warning event, never committed. The
  recycle goes on either way: it reverts the desktop.
* **Recovery** (:meth:`ProfileDesktops.recover`, on reconciler passes): an open layer whose
  desktop holds no session and no longer has its disk (a broker or QEMU that died) is set
  aside. Layers of desktops still held or being recycled are left to their logoff.

The reconciler sits beside the broker (neither imports the other), so this lives here.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import suppress

from deskpool.domain.errors import Conflict, DeskpoolError, NotFound, VmNotFound
from deskpool.domain.models import PowerState
from deskpool.domain.profile_merge import LayerMode, SecondSession, session_mode
from deskpool.domain.profiles import Layer, LayerState, disk_serial
from deskpool.domain.states import HELD_STATES, DesktopState
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.profile_copies import ChainCopy, ProfileCopies
from deskpool.services.profiles import Logoff, ProfileService
from deskpool.store.db import UnitOfWork

log = logging.getLogger(__name__)

SESSION_HOOK = "/usr/lib/deskpool/session-hook"
END_WAIT_S = 30  # the user's processes get this long to exit at logoff, then are killed
# The guest has unmounted: it answers the PCI unplug, if slowly on a busy TCG host.
DETACH_TIMEOUT_S = 60.0
# Desktops whose open layer is someone's live session or a logoff the reconciler will run:
# recovery leaves their layers alone.
_CLOSED_BY_LOGOFF = frozenset({*HELD_STATES, DesktopState.RECYCLING, DesktopState.RETIRING})


class ProfileDesktops:
    def __init__(self, ctx: ServiceContext, *, profiles: ProfileService | None = None,
                 end_wait_s: int = END_WAIT_S) -> None:
        self.ctx = ctx
        self._profiles = profiles
        self.end_wait_s = end_wait_s
        self.copies = ProfileCopies(ctx)
        self.last_copy = ChainCopy()  # what the latest logon here copied between hosts

    @property
    def profiles(self) -> ProfileService:
        if self._profiles is None:
            self._profiles = ProfileService(self.ctx, self.ctx.settings.resolved_profile_dir)
        return self._profiles

    # --- logon -----------------------------------------------------------------------------

    def open(self, user: str, desktop: str, driver: HypervisorDriver, vm_id: uuid.UUID, *,
             owner: tuple[int, int], second_session: SecondSession = SecondSession.MERGE
             ) -> str:
        """The serial of ``user``'s profile disk plugged into ``desktop`` now: theirs from a
        session still open there (a reconnect), else a new session layer. When their
        profile is open on another desktop too, the pool's ``second_session`` policy gives
        the new layer its mode and the user is told (a refusal was the broker's, before
        anything was reserved; one that raced past it gets a layer merged at logoff).
        Raises what ``ProfileService.start_session`` raises (its layer then set aside)."""
        for layer in self._open_layers(desktop):
            if layer.user == user and disk_serial(layer.id) in driver.attached_disks(vm_id):
                return disk_serial(layer.id)
        with self.ctx.uow(read_only=True) as uow:
            before = uow.profiles.find(user)
            host_id = uow.desktops.get(vm_id).host_id
        profile = self.profiles.ensure_profile(user, owner=owner)
        if profile.layer_id is not None and (before is None or before.generation == 0):
            self.copies.register(profile.layer_id, host_id, driver)  # made for this host
        self._bring_chain(user, desktop, host_id)
        with self.ctx.uow(read_only=True) as uow:
            elsewhere = sorted(set(uow.profiles.open_on(user)) - {desktop})
        mode = session_mode(second_session, other_session_open=bool(elsewhere))
        serial = self.profiles.start_session(user, desktop, driver, vm_id, mode=mode).serial
        if elsewhere:
            self._tell_second_session(user, desktop, elsewhere, mode)
        return serial

    def _bring_chain(self, user: str, desktop: str, host_id: uuid.UUID) -> None:
        """Copy to the desktop's host the layers of ``user``'s chain it lacks (only those:
        layers are immutable), before the session layer opens on it."""
        with self.ctx.uow(read_only=True) as uow:
            top = uow.profiles.get(user).layer_id
        if top is None:
            return
        self.last_copy = self.copies.bring_chain(user, top, host_id)
        if not self.last_copy.layers:
            return
        with self.ctx.uow() as uow:
            record_event(uow, "profile-copied",
                         f"profile of {user}: {len(self.last_copy.layers)} layer(s) "
                         f"({self.last_copy.bytes_copied} bytes) copied to the host of "
                         f"{desktop} for this logon", user=user, desktop=desktop)
            uow.commit()

    def _tell_second_session(self, user: str, desktop: str, elsewhere: list[str],
                             mode: LayerMode) -> None:
        what = ("this session has a read-only copy of it: changes to your files here are "
                "not kept" if mode is LayerMode.READ_ONLY else
                "changes made here are merged into it when you log off, and a file changed "
                "on both desktops is kept twice (the later one as NAME.conflict-" + desktop
                + ")")
        with self.ctx.uow() as uow:
            record_event(uow, "profile-second-session",
                         f"your profile is also open on {', '.join(elsewhere)}; {what}",
                         user=user, desktop=desktop)
            uow.commit()

    # --- logoff ----------------------------------------------------------------------------

    def close(self, desktop_id: uuid.UUID) -> list[Logoff]:
        """End every profile session open on the desktop (see the module docstring); one
        ``Logoff`` each, committed or set aside. Nothing to do (``[]``) for a desktop
        without one. Never raises for a guest that fails: that is what setting aside is for.
        """
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            name, host_id = desktop.name, desktop.host_id
            layers = self._open_layers(name, uow=uow)
            accounts = {layer.user: uow.linux_accounts.find(layer.user) for layer in layers}
        if not layers:
            return []
        driver = self.ctx.driver_for_id(host_id)
        agent = GuestAgent(driver, desktop_id, command_timeout_s=10)
        ended: list[Logoff] = []
        for layer in layers:
            found = accounts.get(layer.user)
            problem = (self._end_in_guest(agent, found[0]) if found is not None
                       else f"no Linux account is recorded for {layer.user}")
            try:
                if problem is None:
                    logoff = self.profiles.end_session(
                        layer.id, driver, desktop_id, detach_timeout_s=DETACH_TIMEOUT_S)
                    ended.append(logoff)
                    if logoff.committed:
                        self._register_committed(layer.user, logoff.generation, host_id,
                                                 driver)
                    continue
                # The guest may still hold the filesystem open: only the end of QEMU's
                # process proves nothing more is written to the layer.
                self._power_off(driver, desktop_id)
                ended.append(self.profiles.abandon_session(
                    layer.id, f"{name} did not end the session cleanly ({problem}); the "
                              "desktop was powered off"))
            except Conflict as exc:  # a recovery set it aside meanwhile
                log.warning("profile layer %s of %s: %s", layer.id, layer.user, exc)
        return ended

    def _register_committed(self, user: str, generation: int, host_id: uuid.UUID,
                            driver: HypervisorDriver) -> None:
        """The generation a logoff committed is held by the host whose desktop wrote it."""
        with self.ctx.uow(read_only=True) as uow:
            profile = uow.profiles.get(user)
        if profile.generation == generation and profile.layer_id is not None:
            self.copies.register(profile.layer_id, host_id, driver)

    def _end_in_guest(self, agent: GuestAgent, account: str) -> str | None:
        """``session-hook end``: None once the profile is unmounted (or was never mounted),
        else what went wrong."""
        try:
            code, _out, err = agent.exec_capture(
                ["/bin/sh", SESSION_HOOK, "end", account, str(self.end_wait_s)],
                timeout_s=self.end_wait_s + 45.0)
        except DeskpoolError as exc:
            return f"its guest did not answer: {exc}"
        if code != 0:
            return f"session-hook end failed ({code}): {err.strip()[:300]}"
        return None

    def _power_off(self, driver: HypervisorDriver, desktop_id: uuid.UUID) -> None:
        try:
            driver.stop_vm(desktop_id, force=True)
        except VmNotFound:
            return
        except DeskpoolError as exc:
            log.warning("could not power %s off to release its profile disk: %s",
                        desktop_id, exc)
            return
        with self.ctx.uow() as uow:
            desktop = uow.desktops.get(desktop_id)
            if desktop.power_state is not PowerState.SHUTOFF:
                uow.desktops.compare_and_set_power(desktop_id, desktop.power_state,
                                                   PowerState.SHUTOFF)
                uow.commit()

    # --- recovery --------------------------------------------------------------------------

    def recover(self) -> list[Layer]:
        """Set aside the open layers no live session or coming logoff will end: their
        desktop is gone, or holds no session and no longer has the disk. A desktop whose host
        cannot be asked keeps its layers for a later pass."""
        with self.ctx.uow(read_only=True) as uow:
            layers = uow.profiles.layers_in_state(LayerState.SESSION)
            if not layers:
                return []
            desktops: dict[str, tuple[uuid.UUID, uuid.UUID, DesktopState]] = {}
            for layer in layers:
                with suppress(NotFound):
                    if layer.desktop is not None:
                        d = uow.desktops.get_by_name(layer.desktop)
                        desktops[layer.desktop] = (d.id, d.host_id, DesktopState(d.state))
        live: set[str] = set()
        for layer in layers:
            found = desktops.get(layer.desktop or "")
            if found is None:
                continue
            desktop_id, host_id, state = found
            if state in _CLOSED_BY_LOGOFF:
                live.add(disk_serial(layer.id))
                continue
            try:
                attached = self.ctx.driver_for_id(host_id).attached_disks(desktop_id)
            except VmNotFound:
                continue
            except DeskpoolError:
                live.add(disk_serial(layer.id))  # its host does not answer: not now
                continue
            if disk_serial(layer.id) in attached:
                live.add(disk_serial(layer.id))
        return self.profiles.recover_sessions(live)

    def _open_layers(self, desktop: str, *, uow: UnitOfWork | None = None) -> list[Layer]:
        if uow is None:
            with self.ctx.uow(read_only=True) as own:
                return self._open_layers(desktop, uow=own)
        return [layer for layer in uow.profiles.layers_in_state(LayerState.SESSION)
                if layer.desktop == desktop]
