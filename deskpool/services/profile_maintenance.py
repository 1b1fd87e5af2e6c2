"""Roaming-profile maintenance: flattening long chains, sweeping spent files, verifying
checksums. The reconciler runs :meth:`ProfileMaintenance.run` on a schedule
(``profile_maintenance_interval_s``), a few profiles per run; an admin's ``verify`` and the
tests call the single operations.

Every operation on a profile runs under its **maintenance lease** (``profiles.maint_owner`` /
``maint_until``, a conditional UPDATE that expires, as ``store.leases``): of several brokers one
works on a profile at a time, and a broker that died holds it only until the lease runs out.

A flatten writes its standalone copy (``qemu-img convert``: long, reads only committed, immutable
files) while sessions may still open. Then it **swaps**: it marks its lease swapping and reads
the open sessions in that transaction (a logon's :meth:`ProfileRepository.admit_session` waits
on the same row and refuses to open a session during a swap); with one open, it gives up and
removes its copy. Otherwise it rebases the child layer's header onto the copy and commits
everything with compare-and-swaps: its lease still swapping, the child still committed on the
old layer, each retired layer still committed. A lost compare-and-swap rolls the transaction
back and puts the child's header back (the same bytes as before, so its checksum holds), then
removes the copy: nothing the profile uses was deleted or changed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from deskpool.domain.errors import Conflict, DeskpoolError
from deskpool.domain.profiles import (
    Layer,
    LayerState,
    chain,
    flatten_plan,
    layer_file_name,
)
from deskpool.images import profile_disks as disks
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.profile_copies import ProfileCopies
from deskpool.services.renewal import renewed_while_running
from deskpool.store.db import DatabaseUnavailable

log = logging.getLogger(__name__)
# Layers whose files no chain reads once no session uses them: sweep deletes them.
_SPENT = frozenset({LayerState.FLATTENED, LayerState.MERGED, LayerState.DISCARDED})
STRAY_AGE = timedelta(hours=1)
T = TypeVar("T")


class Flatten(StrEnum):
    """How one flatten ended."""

    DONE = "flattened"
    NOTHING = "nothing to flatten"
    IN_USE = "in use by a session"
    BUSY = "another broker maintains it"
    LOST_RACE = "lost a race, undone"


@dataclass
class MaintenanceReport:
    """What one scheduled run did, by user."""

    flattened: list[str] = field(default_factory=list)
    skipped: list[tuple[str, Flatten]] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    swept: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each also an error event


def in_use(layers: list[Layer]) -> list[Path]:
    """Every file an open session's chain reads (by the store's parents)."""
    used: set[Path] = set()
    for layer in layers:
        if layer.state is LayerState.SESSION:
            used |= {Path(link.path) for link in chain(layers, layer.id)}
    return sorted(used)


class ProfileMaintenance:
    """Maintenance of the profiles under ``store_dir``, as lease holder ``owner`` (a one-off
    name by default) for ``lease`` at a time (renewed while it works)."""

    def __init__(self, ctx: ServiceContext, store_dir: Path, *, owner: str | None = None,
                 lease: timedelta | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self._ctx = ctx
        self.store_dir = store_dir
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = lease or timedelta(seconds=ctx.settings.lease_s)
        self.clock = clock or (lambda: datetime.now(UTC))

    # --- the lease -------------------------------------------------------------------------

    @contextmanager
    def leased(self, user: str) -> Iterator[bool]:
        """Whether this owner got ``user``'s maintenance lease; renewed while the block runs
        and given back after."""
        now = self.clock()
        with self._ctx.uow() as uow:
            mine = uow.profiles.take_maintenance(user, self.owner, now + self.lease, now)
            uow.commit()
        if not mine:
            yield False
            return

        def renew() -> bool:
            with self._ctx.uow() as uow:
                kept = uow.profiles.renew_maintenance(user, self.owner,
                                                      self.clock() + self.lease)
                uow.commit()
            return kept

        try:
            with renewed_while_running(renew, self.lease.total_seconds() / 3,
                                       f"maintenance lease on the profile of {user}"):
                yield True
        finally:
            try:
                with self._ctx.uow() as uow:
                    uow.profiles.release_maintenance(user, self.owner)
                    uow.commit()
            except DatabaseUnavailable as exc:  # it runs out by itself
                log.warning("could not give back the maintenance lease of %s: %s", user, exc)

    def _end_swap(self, user: str) -> None:
        """Sessions may open again (the lease itself stays this owner's)."""
        now = self.clock()
        with self._ctx.uow() as uow:
            uow.profiles.take_maintenance(user, self.owner, now + self.lease, now)
            uow.commit()

    # --- flatten ---------------------------------------------------------------------------

    def flatten(self, user: str) -> Flatten:
        """Merge the generations older than the kept ones into one standalone layer (see
        ``domain.profiles.flatten_plan``), under the profile's lease (taken here unless this
        owner holds it). Never while a session is open; :meth:`sweep` then deletes the
        retired files. Raises what the disk tools raise, with nothing changed."""
        with self.leased(user) as mine:
            if not mine:
                return Flatten.BUSY
            return self._flatten(user)

    def _flatten(self, user: str) -> Flatten:
        with self._ctx.uow(read_only=True) as uow:
            profile = uow.profiles.get(user)
            layers = uow.profiles.layers(user)
        if any(layer.state is LayerState.SESSION for layer in layers):
            return Flatten.IN_USE
        plan = flatten_plan(profile, layers)
        if plan is None:
            return Flatten.NOTHING
        flat_id = uuid.uuid4()
        flat_path = disks.flatten(Path(plan.target.path),
                                  self.store_dir / layer_file_name(user, flat_id), child=None)
        swapping = False
        try:
            # Its checksum before the swap: reading the whole copy holds up no logon.
            flat = Layer(id=flat_id, user=user, generation=plan.target.generation,
                         parent_id=None, path=str(flat_path), state=LayerState.COMMITTED,
                         size_bytes=disks.allocated_bytes(flat_path),
                         sha256=disks.sha256_of(flat_path))
            with self._ctx.uow() as uow:
                # The row lock first, then the sessions read with a fresh snapshot: a logon
                # that got the row before us committed its session, and one after us waits.
                if not uow.profiles.begin_swap(user, self.owner, self.clock()):
                    return Flatten.LOST_RACE
                if uow.profiles.open_on(user):
                    return Flatten.IN_USE
                uow.commit()
            swapping = True
            return self._swap(user, plan.target, plan.child, plan.retired, flat)
        finally:
            if swapping:
                self._end_swap(user)  # _swap kept or removed the copy
            else:
                flat_path.unlink(missing_ok=True)

    def _swap(self, user: str, target: Layer, child: Layer | None, retired: tuple[Layer, ...],
              flat: Layer) -> Flatten:
        """Rebase the child onto ``flat`` and commit it all, or undo it (see the module)."""
        flat_path = Path(flat.path)
        rebased = False
        committed = False
        try:
            child_sha = None
            if child is not None:
                disks.rebase_header(Path(child.path), flat_path)
                rebased = True
                # The child's header changed: its checksum is the file's now.
                child_sha = disks.sha256_of(Path(child.path))
            with self._ctx.uow() as uow:
                stale = (uow.profile_holders.holders([child.id]) if child is not None
                         else {})
                won = uow.profiles.still_swapping(user, self.owner, self.clock())
                uow.profiles.add_layer(flat, note=f"flattened generations up to "
                                                  f"{target.generation}")
                if won and child is not None:
                    won = (uow.profiles.layer(child.id).parent_id == target.id
                           and uow.profiles.set_layer_state(
                               child.id, LayerState.COMMITTED, LayerState.COMMITTED,
                               sha256=child_sha))
                    if won:
                        uow.profiles.set_parent(child.id, flat.id)
                        # Hosts' copies of the child keep the old header: no longer it.
                        # Its record gone, the child is read from the profile store.
                        uow.profile_holders.forget(child.id)
                for layer in retired:
                    won = won and uow.profiles.set_layer_state(
                        layer.id, LayerState.COMMITTED, LayerState.FLATTENED)
                if not won:  # leaving the block without commit rolls every write back
                    log.warning("flatten of %s's profile lost a race; undoing it", user)
                    return Flatten.LOST_RACE
                uow.profiles.replace_generation_layer(user, target.id, flat.id)
                uow.commit()
                committed = True
            if stale:  # hosts' copies of the child, with its old header
                ProfileCopies(self._ctx).remove_from_hosts(stale)
            return Flatten.DONE
        finally:
            if not committed:
                self._undo(child, target, flat_path, rebased)

    @staticmethod
    def _undo(child: Layer | None, target: Layer, flat_path: Path, rebased: bool) -> None:
        """Put the child's header back on ``target`` (its bytes, and so its checksum, as
        before), then remove the copy; a copy the child may still name is kept."""
        if rebased and child is not None:
            try:
                disks.rebase_header(Path(child.path), Path(target.path))
            except (DeskpoolError, OSError):
                log.exception("could not rebase %s back onto %s; keeping %s", child.path,
                              target.path, flat_path)
                return
        flat_path.unlink(missing_ok=True)

    # --- sweep, verify ---------------------------------------------------------------------

    def sweep(self, user: str, *, stray_age: timedelta = STRAY_AGE) -> list[Path]:
        """Delete the files of flattened layers no open chain reads any more, and files in
        the user's directory that no row names (a crash between making a file and
        recording it) once they are older than ``stray_age`` (younger ones may belong to an
        operation still running) and no layer names them as its backing file."""
        with self._ctx.uow(read_only=True) as uow:
            layers = uow.profiles.layers(user)
        busy = set(in_use(layers))
        removed: list[Path] = []
        for layer in layers:
            path = Path(layer.path)
            if layer.state in _SPENT and path not in busy and path.exists():
                disks.remove_layer(path, busy)
                removed.append(path)
        self._sweep_hosts([layer.id for layer in layers if layer.state in _SPENT])
        known = {Path(layer.path) for layer in layers}
        cutoff = time.time() - stray_age.total_seconds()
        directory = self.store_dir / user
        strays = [path for path in (sorted(directory.iterdir()) if directory.is_dir() else [])
                  if path.is_file() and path not in known
                  and path.suffix in (".qcow2", ".partial") and path.stat().st_mtime < cutoff]
        if strays:
            backing = {(Path(layer.path).parent / name).resolve()
                       for layer in layers if layer.state not in _SPENT
                       and Path(layer.path).is_file()
                       and (name := disks.backing_file(Path(layer.path))) is not None}
            for path in strays:
                if path.resolve() not in backing:
                    disks.remove_layer(path, busy)
                    removed.append(path)
        return removed

    def _sweep_hosts(self, spent: list[uuid.UUID]) -> None:
        """Hosts' copies of spent layers (``services.profile_copies``) go with their files."""
        with self._ctx.uow(read_only=True) as uow:
            holders = uow.profile_holders.holders(spent)
        if holders:
            ProfileCopies(self._ctx).remove_from_hosts(holders)

    def verify(self, user: str) -> list[str]:
        """Check every committed layer of ``user`` against its recorded sha256. Each mismatch
        or missing file is a sentence, and an error event; nothing is changed or deleted."""
        with self._ctx.uow(read_only=True) as uow:
            layers = uow.profiles.layers(user)
        problems: list[str] = []
        for layer in layers:
            if layer.state is not LayerState.COMMITTED or layer.sha256 is None:
                continue
            path = Path(layer.path)
            try:
                disks.verify_sha256(path, layer.sha256)
            except Conflict as exc:
                problems.append(f"generation {layer.generation}: {exc}")
            except OSError as exc:
                problems.append(f"generation {layer.generation}: {path} cannot be read "
                                f"({exc.strerror})")
        with self._ctx.uow() as uow:
            for problem in problems:
                record_event(uow, "profile-corrupt", f"profile of {user}, {problem}",
                             severity="error", user=user)
            uow.profiles.mark_verified(user, self.clock())
            uow.commit()
        return problems

    # --- the scheduled run -----------------------------------------------------------------

    def run(self, *, flatten_limit: int, verify_limit: int,
            stray_age: timedelta = STRAY_AGE) -> MaintenanceReport:
        """Flatten up to ``flatten_limit`` profiles whose chain is longer than their kept
        generations (then sweep them), and sweep and verify the ``verify_limit`` profiles
        verified longest ago. Profiles another broker maintains now are left to it. What
        fails is an error event naming the user, and the run goes on."""
        report = MaintenanceReport()
        started = self.clock()
        with self._ctx.uow(read_only=True) as uow:
            candidates = uow.profiles.flatten_candidates() if flatten_limit > 0 else []
            due = (uow.profiles.least_recently_verified(verify_limit)
                   if verify_limit > 0 else [])
        tried = 0
        for user in candidates:
            if tried >= flatten_limit:
                break
            with self.leased(user) as mine:
                if not mine:
                    report.skipped.append((user, Flatten.BUSY))
                    continue
                outcome = self._attempt(user, f"flattening the profile of {user}",
                                        self._flatten, report,
                                        after="; its layers were left as they were")
                tried += outcome is not Flatten.NOTHING and outcome is not Flatten.IN_USE
                if outcome is Flatten.DONE:
                    report.flattened.append(user)
                    self._attempt(user, f"sweeping the profile of {user}",
                                  lambda u: report.swept.extend(self.sweep(u,
                                                                           stray_age=stray_age)),
                                  report)
                elif outcome is not None and outcome is not Flatten.NOTHING:
                    report.skipped.append((user, outcome))  # (a kept rollback line: no news)
        for user in due:
            with self.leased(user) as mine:
                if not mine:
                    continue
                with self._ctx.uow(read_only=True) as uow:
                    last = uow.profiles.verified_at(user)
                if last is not None and last >= started:
                    continue  # another broker verified it since we listed it
                self._attempt(user, f"sweeping the profile of {user}",
                              lambda u: report.swept.extend(self.sweep(u, stray_age=stray_age)),
                              report)
                problems = self._attempt(user, f"verifying the profile of {user}",
                                         self.verify, report)
                report.verified.append(user)
                report.problems += [f"profile of {user}, {p}" for p in problems or []]
        return report

    def _attempt(self, user: str, doing: str, work: Callable[[str], T],
                 report: MaintenanceReport, *, after: str = "") -> T | None:
        """``work(user)``; what it raises (but the database going away) becomes an error
        event for the admin and a line of the report, and None."""
        try:
            return work(user)
        except DatabaseUnavailable:
            raise
        except (DeskpoolError, OSError) as exc:
            message = f"{doing} failed: {exc}{after}"
            report.problems.append(message)
            log.warning("%s", message)
            with self._ctx.uow() as uow:
                record_event(uow, "profile-maintenance-failed", message, severity="error",
                             user=user)
                uow.commit()
            return None
