"""Roaming profiles: a user's home as a profile container that follows them to any desktop.

The rules are ``deskpool.domain.profiles``; the files ``deskpool.images.profile_disks``; the
rows ``deskpool.store.profiles``. This service puts them in the order that keeps a committed
generation whole whatever fails:

* **Hand-over** (:meth:`ProfileService.start_session`): the session layer's row is written
  (state ``session``) *before* its file is made and plugged in, so a crash at any later point
  leaves a row the recovery finds. The guest then finds the disk by its serial.
* **Logoff** (:meth:`ProfileService.end_session`): detach (the hypervisor closes the file),
  ``qemu-img check``, checksum, then one transaction: the generation compare-and-swap and the
  layer's ``session -> committed``, or ``session -> unclean`` with a warning event. Nothing
  is copied: the layer the guest wrote *is* the new generation. A session that started
  before another one committed is merged into it (``services.profile_merging``); a
  read-only one is dropped.
* **Recovery** (:meth:`ProfileService.recover_sessions`, for a restarted broker or the
  reconciler): a session layer whose disk no desktop holds any more is set aside, never
  committed after the fact (nothing proves its write-back finished).
* **Rollback** makes a new generation (an empty overlay on the kept one); **flatten** merges
  old generations into a standalone base, never while a session is open, and
  :meth:`ProfileService.sweep` deletes the files no chain needs: both, and :meth:`verify`,
  run on the reconciler's schedule under a lease (``services.profile_maintenance``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from deskpool.domain.errors import Conflict, DriverError, NotFound
from deskpool.domain.profile_merge import LayerMode
from deskpool.domain.profiles import (
    DEFAULT_KEEP_GENERATIONS,
    DEFAULT_QUOTA_BYTES,
    Commit,
    Discard,
    Layer,
    LayerState,
    Profile,
    SetAside,
    chain,
    check_keep,
    check_quota,
    decide_commit,
    disk_serial,
    exclusions,
    kept_generations,
    layer_file_name,
    open_session,
    rollback_target,
)
from deskpool.drivers.base import HypervisorDriver
from deskpool.images import profile_disks as disks
from deskpool.images.profile_merge import merge_layers
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.profile_maintenance import STRAY_AGE, Flatten, ProfileMaintenance

log = logging.getLogger(__name__)
# How long a logon waits for a flatten swapping the profile's base in (see _open_layer).
ADMIT_WAIT_S = 30.0
ADMIT_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class ProfileSession:
    """What the guest needs to mount the user's profile for one session."""

    user: str
    layer_id: uuid.UUID
    serial: str  # /dev/disk/by-id/virtio-<serial>
    path: Path
    base_generation: int
    exclusions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ProfileView:
    """A profile as the admin (or its user) sees it."""

    user: str
    generation: int
    size_bytes: int
    quota_bytes: int
    rollback_to: tuple[int, ...]  # kept generations a rollback may go to
    open_sessions: tuple[str, ...]  # desktops with a session layer now
    unclean: tuple[tuple[str, str], ...]  # (desktop, why) of each layer set aside
    generations_kept: int = 0  # committed generations on disk
    committed_at: datetime | None = None  # the last logoff (or reset, rollback, merge)
    last_writeback_bytes: int = 0  # what that logoff's layer holds
    last_writeback_s: float | None = None  # unplug to commit
    conflicts: tuple[str, ...] = ()  # the newest merges' reports of files changed twice


@dataclass(frozen=True, slots=True)
class Logoff:
    """How a session's layer ended: committed as ``generation``, or set aside (``reason``).
    ``conflicts``: the files a merge found changed by both sessions, in words."""

    committed: bool
    generation: int
    reason: str | None = None
    conflicts: tuple[str, ...] = ()


class ProfileService:
    """Profiles kept under ``store_dir`` (one directory per user), on this host's storage."""

    def __init__(self, ctx: ServiceContext, store_dir: Path, *, skeleton: Path | None = None,
                 extra_exclusions: Iterable[str] = ()) -> None:
        self._ctx = ctx
        self.store_dir = store_dir
        self._skeleton = skeleton
        self.exclusions = exclusions(extra_exclusions)

    def _path(self, layer: Layer | tuple[str, uuid.UUID]) -> Path:
        user, layer_id = (layer.user, layer.id) if isinstance(layer, Layer) else layer
        return self.store_dir / layer_file_name(user, layer_id)

    # --- a user's first profile ------------------------------------------------------------

    def ensure_profile(self, user: str, *, owner: tuple[int, int] | None = None,
                       quota_bytes: int = DEFAULT_QUOTA_BYTES,
                       keep_generations: int = DEFAULT_KEEP_GENERATIONS) -> Profile:
        """``user``'s profile, made now if they have none: generation 1, an empty ext4
        home owned by ``owner`` (uid, gid) holding the skeleton. Two brokers racing both
        make a file; one commits generation 1 and the other removes its own file."""
        with self._ctx.uow(read_only=True) as uow:
            found = uow.profiles.find(user)
        if found is not None and found.generation > 0:
            return found
        check_quota(quota_bytes)
        check_keep(keep_generations)
        layer_id = uuid.uuid4()
        path = self._path((user, layer_id))
        disks.make_base_disk(path, quota_bytes, skeleton=self._skeleton, owner=owner)
        layer = Layer(id=layer_id, user=user, generation=1, parent_id=None,
                      path=str(path), state=LayerState.COMMITTED,
                      size_bytes=disks.allocated_bytes(path), sha256=disks.sha256_of(path))
        try:
            with self._ctx.uow() as uow:
                if uow.profiles.find(user) is None:
                    uow.profiles.create(user, quota_bytes=quota_bytes,
                                        keep_generations=keep_generations)
                uow.profiles.add_layer(layer)
                if uow.profiles.commit_generation(user, 0, layer_id, layer.size_bytes):
                    record_event(uow, "profile-created", f"profile of {user} created "
                                 f"({quota_bytes // 2**20} MiB quota)", user=user)
                    uow.commit()
                    return uow.profiles.get(user)
        except Conflict:
            pass  # the profile row was inserted by another broker at the same moment
        path.unlink(missing_ok=True)  # another broker made it first: ours was never used
        with self._ctx.uow(read_only=True) as uow:
            return uow.profiles.get(user)

    # --- hand-over and logoff --------------------------------------------------------------

    def start_session(self, user: str, desktop: str, driver: HypervisorDriver,
                      vm_id: uuid.UUID, *, mode: LayerMode = LayerMode.EXCLUSIVE
                      ) -> ProfileSession:
        """Open a session layer on ``user``'s committed generation and plug it into the
        running desktop. ``NotFound`` for a user without a profile (``ensure_profile``
        first) or a committed layer whose file is gone; a failed attach sets the layer
        aside and raises the driver's error."""
        profile, layers, session = self._open_layer(user, desktop, mode)
        base = next(layer for layer in layers if layer.id == session.parent_id)
        path, serial = Path(session.path), disk_serial(session.id)
        try:
            self._check_chain(user, profile.generation, layers, base.id)
            disks.create_overlay(Path(base.path), path)
            driver.attach_disk(vm_id, path, serial)
        except Exception as exc:
            self._set_aside(session, f"the session could not start on {desktop}: {exc}")
            raise
        return ProfileSession(user=user, layer_id=session.id, serial=serial, path=path,
                              base_generation=profile.generation,
                              exclusions=self.exclusions)

    def _open_layer(self, user: str, desktop: str, mode: LayerMode
                    ) -> tuple[Profile, list[Layer], Layer]:
        """Record the session layer, once no flatten is swapping its base in (they take a
        second or so: ``services.profile_maintenance``). ``Conflict`` if one still is
        after ``ADMIT_WAIT_S``."""
        deadline = time.monotonic() + ADMIT_WAIT_S
        while True:
            with self._ctx.uow() as uow:
                profile = uow.profiles.get(user)
                layers = uow.profiles.layers(user)
                layer_id = uuid.uuid4()
                session = open_session(profile, layers, layer_id,
                                       str(self._path((user, layer_id))), desktop, mode)
                uow.profiles.add_layer(session)
                # After the insert, on the profile's row: a flatten that swaps now holds it.
                if uow.profiles.admit_session(user, datetime.now(UTC)):
                    uow.commit()
                    return profile, layers, session
            if time.monotonic() >= deadline:
                raise Conflict(f"the profile of {user} is being flattened; try again in a "
                               "moment")
            time.sleep(ADMIT_POLL_S)

    @staticmethod
    def _check_chain(user: str, generation: int, layers: list[Layer],
                     top_id: uuid.UUID) -> None:
        """Each file under the new session: there, and its qcow2 metadata sound (``qemu-img
        check`` reads tables, not data: milliseconds, whatever the profile's size;
        :meth:`verify`, on a schedule or an admin's request, compares whole-file
        checksums). ``NotFound`` or ``Conflict`` naming the generation and the file."""
        for link in chain(layers, top_id):
            found = disks.check_layer(Path(link.path))
            if found.error is None:
                continue
            if not Path(link.path).is_file():
                raise NotFound(f"the committed layer of {user}'s profile (generation "
                               f"{generation}) is missing: {link.path}")
            raise Conflict(f"a layer of {user}'s profile (generation {link.generation}, "
                           f"under generation {generation}) is damaged: {found.error}")

    def end_session(self, layer_id: uuid.UUID, driver: HypervisorDriver, vm_id: uuid.UUID, *,
                    detach_timeout_s: float = 30.0) -> Logoff:
        """Unplug the session's disk and commit it as the next generation, or set it aside.

        The guest has unmounted the profile before this is called (its logoff hook). A
        desktop that does not release the disk leaves its layer set aside (QEMU may still
        write it); so does one that no longer holds it (its QEMU stopped or restarted, maybe
        mid-write), and a layer failing ``qemu-img check``. A session whose base generation
        is no longer the committed one (another session committed first) is merged."""
        with self._ctx.uow(read_only=True) as uow:
            session = uow.profiles.layer(layer_id)
        if session.state is not LayerState.SESSION:
            raise Conflict(f"profile layer {layer_id} is {session.state}, not an open session")
        started = time.monotonic()
        path, serial = Path(session.path), disk_serial(layer_id)
        try:
            # Only unplugging a disk still plugged in ends a write-back the guest finished. A
            # disk the desktop no longer holds went with a QEMU that stopped or restarted,
            # perhaps mid-write, and the guest's "unmounted" was said by a later boot.
            if serial not in driver.attached_disks(vm_id):
                return self._set_aside(
                    session, "the desktop no longer held the disk (its QEMU stopped or "
                             "restarted): nothing proves the guest finished writing it",
                    size=disks.allocated_bytes(path) if path.is_file() else 0)
            driver.detach_disk(vm_id, serial, timeout_s=detach_timeout_s)
        except DriverError as exc:
            return self._set_aside(session, f"the disk was not released: {exc}")
        check = disks.check_layer(path)
        sha256 = disks.sha256_of(path) if check.error is None else None
        size = disks.allocated_bytes(path) if path.is_file() else 0
        with self._ctx.uow() as uow:
            profile = uow.profiles.get(session.user)
            decision = decide_commit(profile, uow.profiles.layer(layer_id),
                                     check_error=check.error)
            # Both writes are conditional and in one transaction: the layer must still be
            # an open session (a recovery may have set it aside meanwhile) and the profile
            # still at the session's base generation. Either miss rolls both back.
            if isinstance(decision, Commit) and uow.profiles.set_layer_state(
                    layer_id, LayerState.SESSION, LayerState.COMMITTED, sha256=sha256,
                    size_bytes=size) and uow.profiles.commit_generation(
                    session.user, decision.expected_generation, layer_id,
                    profile.size_bytes + size, writeback_s=time.monotonic() - started):
                record_event(uow, "profile-committed",
                             f"profile of {session.user}: generation "
                             f"{decision.new_generation} committed from {session.desktop} "
                             f"({size} bytes written)", user=session.user,
                             desktop=session.desktop)
                uow.commit()
                return Logoff(committed=True, generation=decision.new_generation)
        if isinstance(decision, SetAside):
            return self._set_aside(session, decision.reason, size=size)
        if isinstance(decision, Discard):
            return self._discard(session)
        # Another session committed first (before our read, or between it and our write):
        # this one's changes are merged into what it committed.
        return self._merge(session, size, started)

    def _merge(self, session: Layer, size: int, started: float, *, attempts: int = 3
               ) -> Logoff:
        """Merge a session that lost the race into the generation committed meanwhile, as
        the next generation (an overlay on it holding the merged-in changes). Its user is
        told of every file both sessions changed. A merge that cannot be done, or that
        keeps losing the compare-and-swap, sets the layer aside: nothing is ever lost."""
        problem, current = "other sessions kept committing first", session.base_generation
        for _attempt in range(attempts):
            with self._ctx.uow(read_only=True) as uow:
                profile = uow.profiles.get(session.user)
                by_id = {layer.id: layer for layer in uow.profiles.layers(session.user)}
            current = profile.generation
            if by_id[session.id].state is not LayerState.SESSION:  # a recovery got there
                return Logoff(committed=False, generation=profile.generation,
                              reason=by_id[session.id].note)
            base = by_id.get(session.parent_id) if session.parent_id else None
            ours = by_id.get(profile.layer_id) if profile.layer_id else None
            if base is None or ours is None:
                problem = "the generations it started from or merges into are gone"
                break
            if base not in chain(list(by_id.values()), ours.id):
                # A rollback or reset: what the admin threw away is not merged back.
                problem = "the profile was rolled back or reset meanwhile"
                break
            layer_id = uuid.uuid4()
            out = self._path((session.user, layer_id))
            try:
                plan = merge_layers(Path(base.path), Path(ours.path), Path(session.path), out,
                                    desktop=session.desktop or "another-desktop")
            except (disks.ProfileDiskError, OSError) as exc:
                problem = f"it could not be merged: {exc}"
                break
            merged = Layer(id=layer_id, user=session.user, generation=profile.generation + 1,
                           parent_id=ours.id, path=str(out), state=LayerState.COMMITTED,
                           size_bytes=disks.allocated_bytes(out), sha256=disks.sha256_of(out))
            with self._ctx.uow() as uow:
                uow.profiles.add_layer(merged, note=f"merged from the session on "
                                                    f"{session.desktop}")
                if uow.profiles.set_layer_state(
                        session.id, LayerState.SESSION, LayerState.MERGED,
                        size_bytes=size) and uow.profiles.commit_generation(
                        session.user, profile.generation, layer_id,
                        profile.size_bytes + merged.size_bytes,
                        writeback_s=time.monotonic() - started):
                    record_event(uow, "profile-merged", _merge_message(session, plan.conflicts),
                                 severity="warning" if plan.conflicts else "info",
                                 user=session.user, desktop=session.desktop)
                    uow.commit()
                    return Logoff(committed=True, generation=merged.generation,
                                  conflicts=tuple(plan.conflicts))
            out.unlink(missing_ok=True)  # lost the CAS: merge into the newer one
        return self._set_aside(session, f"the session on {session.desktop} started from "
                                        f"generation {session.base_generation}, generation "
                                        f"{current} was committed meanwhile, and {problem}; "
                                        "its changes are kept aside", size=size)

    def _discard(self, session: Layer) -> Logoff:
        """A read-only session's overlay is dropped: the user was told at logon."""
        with self._ctx.uow() as uow:
            generation = uow.profiles.get(session.user).generation
            if uow.profiles.set_layer_state(session.id, LayerState.SESSION,
                                            LayerState.DISCARDED):
                record_event(uow, "profile-read-only",
                             f"the changes to your files on {session.desktop} were not kept: "
                             "your profile was open on another desktop, so that session had "
                             "a read-only copy of it", user=session.user,
                             desktop=session.desktop)
                uow.commit()
        Path(session.path).unlink(missing_ok=True)
        return Logoff(committed=False, generation=generation, reason="read-only session")

    def abandon_session(self, layer_id: uuid.UUID, reason: str) -> Logoff:
        """Set an open session layer aside without detaching it: its desktop could not end
        the session cleanly and was powered off (which released the disk). ``Conflict`` for
        a layer that is not an open session."""
        with self._ctx.uow(read_only=True) as uow:
            session = uow.profiles.layer(layer_id)
        if session.state is not LayerState.SESSION:
            raise Conflict(f"profile layer {layer_id} is {session.state}, not an open session")
        path = Path(session.path)
        return self._set_aside(session, reason,
                               size=disks.allocated_bytes(path) if path.is_file() else 0)

    def _set_aside(self, session: Layer, reason: str, *, size: int = 0) -> Logoff:
        with self._ctx.uow() as uow:
            generation = uow.profiles.get(session.user).generation
            if uow.profiles.set_layer_state(session.id, LayerState.SESSION,
                                            LayerState.UNCLEAN, note=reason, size_bytes=size):
                record_event(uow, "profile-unclean",
                             f"profile of {session.user}: the session layer of "
                             f"{session.desktop} was set aside ({reason}); generation "
                             f"{generation} is unchanged", severity="warning",
                             user=session.user, desktop=session.desktop)
                uow.commit()
        log.warning("profile layer %s of %s set aside: %s", session.id, session.user, reason)
        return Logoff(committed=False, generation=generation, reason=reason)

    def recover_sessions(self, live_serials: Collection[str], *,
                         started_before: datetime | None = None) -> list[Layer]:
        """Set aside every open session layer whose disk is attached to no desktop
        (``live_serials``: what ``attached_serials`` found on the hosts): a broker or QEMU
        that died between detach and commit. Only layers made before ``started_before``
        count (default: a minute ago), so a hand-over still plugging its disk in is left
        alone. Returns the layers set aside."""
        cutoff = started_before or datetime.now(UTC) - timedelta(minutes=1)
        with self._ctx.uow(read_only=True) as uow:
            open_layers = uow.profiles.layers_in_state(LayerState.SESSION)
        orphans = [layer for layer in open_layers
                   if disk_serial(layer.id) not in live_serials
                   and (layer.created_at is None or layer.created_at < cutoff)]
        for layer in orphans:
            self._set_aside(layer, "its session ended without a commit (broker or desktop "
                                   "stopped during logoff)")
        return orphans

    def describe(self, user: str) -> ProfileView:
        """``NotFound`` for a user without a profile."""
        with self._ctx.uow(read_only=True) as uow:
            profile = uow.profiles.get(user)
            layers = uow.profiles.layers(user)
            conflicts = tuple(e.message for e in uow.events.recent(5, user=user,
                                                                    kind="profile-merged")
                              if e.severity == "warning")
        held = {layer.generation for layer in layers if layer.state is LayerState.COMMITTED}
        top = next((layer for layer in layers if layer.id == profile.layer_id), None)
        return ProfileView(
            user=user, generation=profile.generation, size_bytes=profile.size_bytes,
            quota_bytes=profile.quota_bytes,
            rollback_to=tuple(g for g in kept_generations(profile)
                              if g != profile.generation and g in held),
            open_sessions=tuple(layer.desktop or "?" for layer in layers
                                if layer.state is LayerState.SESSION),
            unclean=tuple((layer.desktop or "?", layer.note or "")
                          for layer in layers if layer.state is LayerState.UNCLEAN),
            generations_kept=len(held), committed_at=profile.committed_at,
            last_writeback_bytes=top.size_bytes if top is not None else 0,
            last_writeback_s=profile.writeback_s, conflicts=conflicts)

    # --- rollback, reset, flattening -------------------------------------------------------

    def reset(self, user: str, *, actor: str, owner: tuple[int, int] | None = None) -> Profile:
        """Start ``user`` over with a fresh, empty home as a new generation; the old
        generations stay (a rollback can return to them while they are kept). ``Conflict``
        when a logoff committed meanwhile."""
        with self._ctx.uow(read_only=True) as uow:
            profile = uow.profiles.get(user)
        layer_id = uuid.uuid4()
        path = disks.make_base_disk(self._path((user, layer_id)), profile.quota_bytes,
                                    skeleton=self._skeleton, owner=owner)
        layer = Layer(id=layer_id, user=user, generation=profile.generation + 1,
                      parent_id=None, path=str(path), state=LayerState.COMMITTED,
                      size_bytes=disks.allocated_bytes(path), sha256=disks.sha256_of(path))
        return self._commit_made_layer(
            profile, layer, layer.size_bytes, note="reset", event="profile-reset",
            message=f"profile of {user} reset by {actor}: generation {layer.generation} is a "
                    f"fresh home, generation {profile.generation} is kept",
            doing="resetting it")

    def rollback(self, user: str, generation: int, *, actor: str) -> Profile:
        """Make a new generation whose content is generation ``generation``'s: an empty
        overlay on its layer, so nothing in between is lost (a later rollback can return).
        A session open now will not commit over it (its base is older): it is set aside at
        its logoff. ``InvalidInput`` / ``NotFound`` for a generation not kept; ``Conflict``
        when a logoff committed meanwhile (look again and retry)."""
        with self._ctx.uow(read_only=True) as uow:
            profile = uow.profiles.get(user)
            target = rollback_target(profile, uow.profiles.layers(user), generation)
        layer_id = uuid.uuid4()
        path = disks.create_overlay(Path(target.path), self._path((user, layer_id)))
        layer = Layer(id=layer_id, user=user, generation=profile.generation + 1,
                      parent_id=target.id, path=str(path), state=LayerState.COMMITTED,
                      size_bytes=disks.allocated_bytes(path), sha256=disks.sha256_of(path))
        return self._commit_made_layer(
            profile, layer, profile.size_bytes, note=f"rollback to generation {generation}",
            event="profile-rolled-back",
            message=f"profile of {user} rolled back to generation {generation} by {actor} "
                    f"(now generation {layer.generation})",
            doing="rolling back")

    def _commit_made_layer(self, profile: Profile, layer: Layer, size_bytes: int, *,
                           note: str, event: str, message: str, doing: str) -> Profile:
        """Record ``layer`` (made by an admin action on ``profile``) and commit it as the next
        generation with the generation compare-and-swap; on a lost race its file is removed
        and ``Conflict`` raised (a logoff committed meanwhile)."""
        user = profile.user
        with self._ctx.uow() as uow:
            uow.profiles.add_layer(layer, note=note)
            if uow.profiles.commit_generation(user, profile.generation, layer.id, size_bytes):
                record_event(uow, event, message, user=user)
                uow.commit()
                return uow.profiles.get(user)
        Path(layer.path).unlink(missing_ok=True)
        raise Conflict(f"the profile of {user} changed while {doing}; look again and retry")

    def _maintenance(self) -> ProfileMaintenance:
        return ProfileMaintenance(self._ctx, self.store_dir)

    def flatten(self, user: str) -> bool:
        """Merge the generations older than the kept ones into one standalone layer, under
        the profile's maintenance lease (``services.profile_maintenance``, which the
        reconciler runs on a schedule). Nothing while a session is open, or while another
        broker maintains the profile. Returns whether it merged anything; :meth:`sweep`
        then deletes the retired files."""
        return self._maintenance().flatten(user) is Flatten.DONE

    def sweep(self, user: str, *, stray_age: timedelta = STRAY_AGE) -> list[Path]:
        """Delete spent layer files and old stray files (``ProfileMaintenance.sweep``)."""
        return self._maintenance().sweep(user, stray_age=stray_age)

    def verify(self, user: str) -> list[str]:
        """Check every committed layer of ``user`` against its recorded sha256 (also run on
        a schedule: logon does not read the whole chain, so its time does not grow with the
        profile). Each mismatch or missing file is a sentence, and an error event. Under the
        profile's maintenance lease (a flatten swapping a layer in would read as a mismatch):
        ``Conflict`` while another broker maintains the profile."""
        maintenance = self._maintenance()
        with maintenance.leased(user) as mine:
            if not mine:
                raise Conflict(f"the profile of {user} is being flattened or verified by "
                               "another broker; verify it again in a few minutes")
            return maintenance.verify(user)


def attached_serials(drivers: Iterable[HypervisorDriver]) -> set[str]:
    """The serials of every disk hot-plugged into a running deskpool VM on these hosts."""
    found: set[str] = set()
    for driver in drivers:
        for vm in driver.list_vms():
            if vm.metadata is not None:
                found |= set(driver.attached_disks(vm.vm_id))
    return found


def _merge_message(session: Layer, conflicts: list[str]) -> str:
    """What the user reads in the portal after their second session was merged."""
    head = (f"your profile was open on two desktops; the changes from {session.desktop} were "
            "merged into it")
    if not conflicts:
        return head + " (no file was changed on both)"
    shown = "; ".join(conflicts[:5]) + ("; ..." if len(conflicts) > 5 else "")
    return f"{head}. {len(conflicts)} file(s) changed on both desktops: {shown}"
