"""Roaming profiles across hosts: a user's layers copied to the host of their desktop.

A profile's layers are immutable once committed, so a host that lacks some of a chain gets
only those (``domain.profile_hosts.missing_layers``), oldest first, each from a host that
holds it, over the drivers' volume streams (``HypervisorDriver.read_volume`` on the holder,
``receive_volume`` on the desktop's host). Each copy:

* holds a **transfer slot** on both hosts (``services.host_slots``, taken in one order, host
  id first, so two copies in opposite directions never wait on each other);
* is recorded ``copying`` with its bytes so far (renewed as they arrive: the admin and the CLI
  show the progress), and becomes ``held`` only after the receiving host published the layer
  whole and checked against its sha256; so no record ever claims a host holds half a layer;
* is safe to cut anywhere: what a killed process leaves is a ``copying`` row nobody renews
  and a partial volume, which :meth:`ProfileCopies.recover` removes (the reconciler runs it
  every pass); a copy published whose process died before recording it is found whole by the
  next copy (``receive_volume`` returns it unread) and recorded then.

A committed layer is recorded as held by the host whose desktop wrote it
(:meth:`ProfileCopies.register`): the layer is put into that host's storage under
``layer_volume_name``. Layers without a record live in the profile store every host reaches.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from deskpool.domain.errors import DeskpoolError, NotFound, Unavailable
from deskpool.domain.models import HostState
from deskpool.domain.profile_hosts import (
    HoldState,
    LayerHolding,
    copy_source,
    latest_holders,
    layer_volume_name,
    missing_layers,
)
from deskpool.domain.profiles import Layer, chain
from deskpool.drivers.base import HypervisorDriver, partial_volume_name
from deskpool.services.context import ServiceContext
from deskpool.services.host_slots import SlotKind, host_slot, process_holder
from deskpool.store.db import UnitOfWork

log = logging.getLogger(__name__)
# A copy whose process stopped renewing its record for this long died: another may take it
# over, the reconciler removes its partial volume.
STALE_AFTER = timedelta(seconds=60)
PROGRESS_EVERY_S = 0.5  # how often a copy writes its bytes so far
WAIT_FOR_OTHER_S = 300.0  # a logon waits this long for another broker's copy of a layer
_USABLE = (HostState.ENABLED, HostState.DRAINING)


@dataclass(frozen=True, slots=True)
class ChainCopy:
    """What a logon copied to its desktop's host: the layers (oldest first) and bytes."""

    layers: tuple[uuid.UUID, ...] = ()
    bytes_copied: int = 0


def holder_hosts(uow: UnitOfWork, user: str) -> frozenset[uuid.UUID]:
    """The hosts holding ``user``'s latest generation, with their storage mates; empty for
    no profile or one every host reaches (in the broker's claim: placement prefers them)."""
    profile = uow.profiles.find(user)
    if profile is None or profile.layer_id is None:
        return frozenset()
    holders = uow.profile_holders.holders([profile.layer_id])
    if not holders:
        return frozenset()
    shared = {h.id: h.shared_storage for h in uow.hosts.list()}
    return latest_holders(profile.layer_id, holders, shared)


class ProfileCopies:
    def __init__(self, ctx: ServiceContext, *, copier: str | None = None,
                 stale_after: timedelta = STALE_AFTER, chunk_bytes: int = 4 * 2**20) -> None:
        self.ctx = ctx
        self.copier = copier or process_holder()
        self.stale_after = stale_after
        self.chunk_bytes = chunk_bytes  # what one read from the sending host carries

    # --- what is where ---------------------------------------------------------------------

    def lacking(self, user: str, top_id: uuid.UUID, host_id: uuid.UUID) -> list[Layer]:
        """The layers of the chain under ``top_id`` that ``host_id`` lacks, oldest first."""
        with self.ctx.uow(read_only=True) as uow:
            links = chain(uow.profiles.layers(user), top_id)
            holders = uow.profile_holders.holders([link.id for link in links])
            shared = {h.id: h.shared_storage for h in uow.hosts.list()}
        return missing_layers(links, host_id, holders, shared)

    def preferred_hosts(self, user: str) -> frozenset[uuid.UUID]:
        """The hosts holding ``user``'s latest generation (placement prefers them)."""
        with self.ctx.uow(read_only=True) as uow:
            return holder_hosts(uow, user)

    def copies(self) -> list[LayerHolding]:
        """The copies in flight, with their bytes so far (for the admin and the CLI)."""
        with self.ctx.uow(read_only=True) as uow:
            return uow.profile_holders.records(state=HoldState.COPYING)

    # --- registering a layer made on a host ------------------------------------------------

    def register(self, layer_id: uuid.UUID, host_id: uuid.UUID,
                 driver: HypervisorDriver) -> bool:
        """Put the committed layer (its file in the profile store) into the host's storage
        and record it held there. Best effort: on failure (logged) the layer keeps no record
        and stays where every host reaches it. Hosts whose storage holds no bytes
        (``copies_volumes`` False) are not asked."""
        if not driver.copies_volumes:
            return False
        with self.ctx.uow(read_only=True) as uow:
            layer = uow.profiles.layer(layer_id)
        path = Path(layer.path)
        try:
            info = driver.import_volume(layer_volume_name(layer.id), path, layer.sha256)
            with self.ctx.uow() as uow:
                uow.profile_holders.mark_held(layer.id, host_id, path.stat().st_size)
                uow.commit()
        except (DeskpoolError, OSError) as exc:
            log.warning("profile layer %s of %s stays in the profile store only: %s",
                        layer.id, layer.user, exc)
            return False
        log.info("profile layer %s of %s held by host %s (%s)", layer.id, layer.user,
                 host_id, info.name)
        return True

    # --- copying ---------------------------------------------------------------------------

    def bring_chain(self, user: str, top_id: uuid.UUID, host_id: uuid.UUID) -> ChainCopy:
        """Copy to ``host_id`` the layers of the chain under ``top_id`` it lacks, oldest
        first. ``Unavailable`` when no host holding a missing layer answers; what the
        drivers raise for a failed copy (``ChecksumMismatch`` for a corrupt one)."""
        copied: list[uuid.UUID] = []
        total = 0
        for layer in self.lacking(user, top_id, host_id):
            moved = self.copy_layer(layer, host_id)
            if moved:  # 0: another broker's copy (or a flatten) made it unnecessary
                copied.append(layer.id)
                total += moved
        return ChainCopy(layers=tuple(copied), bytes_copied=total)

    def copy_layer(self, layer: Layer, host_id: uuid.UUID) -> int:
        """Copy one committed layer to ``host_id``; the bytes that crossed (0 when another
        broker's copy finished meanwhile, or the host found it whole already)."""
        deadline = time.monotonic() + WAIT_FOR_OTHER_S
        while True:
            with self.ctx.uow(read_only=True) as uow:
                holders = uow.profile_holders.holders([layer.id])
                usable = [h.id for h in uow.hosts.list() if h.state in _USABLE]
            if layer.id not in holders or host_id in holders[layer.id]:
                return 0  # in the store every host reaches (no record), or held there
            source = copy_source(layer.id, holders, usable)
            if source is None:
                raise Unavailable(
                    f"no host that holds layer {layer.id} of {layer.user}'s profile "
                    f"(generation {layer.generation}) answers: it cannot be copied now")
            moved = self._copy_from(layer, source, host_id)
            if moved is not None:
                return moved
            if time.monotonic() >= deadline:
                raise Unavailable(f"another broker has been copying layer {layer.id} of "
                                  f"{layer.user}'s profile for too long; try again later")
            time.sleep(0.5)

    def _copy_from(self, layer: Layer, source: uuid.UUID, target: uuid.UUID) -> int | None:
        """One attempt; None when another live process copies the layer there now."""
        with self.ctx.uow(read_only=True) as uow:
            slots = {h: uow.hosts.get(h).transfer_slots for h in (source, target)}
        size, digest = self._facts(layer)
        first, second = sorted((source, target))
        with host_slot(self.ctx, first, SlotKind.TRANSFER, slots[first]), \
                host_slot(self.ctx, second, SlotKind.TRANSFER, slots[second]):
            with self.ctx.uow() as uow:
                began = uow.profile_holders.begin_copy(
                    layer.id, target, size, self.copier,
                    datetime.now(UTC) - self.stale_after)
                uow.commit()
            if not began:
                return None
            try:
                self._stream(layer, source, target, size, digest)
            except BaseException:
                self._forget_copy(layer.id, target)
                raise
            with self.ctx.uow() as uow:
                # A flatten that rebased the layer meanwhile changed its bytes (and dropped
                # its records): what arrived is the old file, not the layer any more.
                if uow.profiles.layer(layer.id).sha256 == digest:
                    finished = uow.profile_holders.finish_copy(layer.id, target, self.copier)
                else:
                    finished = False
                    uow.profile_holders.drop_copy(layer.id, target, self.copier)
                uow.commit()
        if not finished:  # taken as dead, or the layer changed meanwhile: look again
            return None
        log.info("profile layer %s of %s copied from host %s to %s (%d bytes)", layer.id,
                 layer.user, source, target, size)
        return size

    def _facts(self, layer: Layer) -> tuple[int, str]:
        """The layer file's exact size and sha256 (recorded at its commit)."""
        if layer.sha256 is None:
            raise NotFound(f"layer {layer.id} of {layer.user}'s profile has no checksum: "
                           "it is not a committed layer")
        try:
            return Path(layer.path).stat().st_size, layer.sha256
        except OSError as exc:
            raise NotFound(f"layer {layer.id} of {layer.user}'s profile is missing from the "
                           f"profile store: {exc}") from exc

    def _stream(self, layer: Layer, source: uuid.UUID, target: uuid.UUID, size: int,
                digest: str) -> None:
        reader = self.ctx.driver_for_id(source)
        writer = self.ctx.driver_for_id(target)
        last = time.monotonic()

        def progress(done: int) -> None:
            nonlocal last
            if done < size and time.monotonic() - last < PROGRESS_EVERY_S:
                return
            last = time.monotonic()
            with self.ctx.uow() as uow:
                uow.profile_holders.progress(layer.id, target, self.copier, done)
                uow.commit()

        name = layer_volume_name(layer.id)
        writer.receive_volume(name, reader.read_volume(name, chunk_bytes=self.chunk_bytes),
                              size=size, sha256=digest, progress=progress)

    def _forget_copy(self, layer_id: uuid.UUID, target: uuid.UUID) -> None:
        try:
            with self.ctx.uow() as uow:
                uow.profile_holders.drop_copy(layer_id, target, self.copier)
                uow.commit()
        except DeskpoolError:  # the reconciler removes it once it is stale
            log.warning("could not drop the copy record of layer %s to host %s", layer_id,
                        target, exc_info=True)

    # --- removing hosts' copies ------------------------------------------------------------

    def remove_from_hosts(self, holders: dict[uuid.UUID, set[uuid.UUID]]) -> int:
        """Delete the hosts' copies of layers no chain reads any more (``holders``: layer ->
        hosts, read before their records were forgotten, or still recorded) and forget their
        records. Best effort: a host that does not answer keeps its copy (and its record,
        when there still is one) for a later sweep. Returns the copies deleted."""
        deleted = 0
        for layer_id, hosts in holders.items():
            for host_id in hosts:
                try:
                    self.ctx.driver_for_id(host_id).delete_volume(layer_volume_name(layer_id))
                except DeskpoolError as exc:
                    log.warning("the copy of profile layer %s on host %s stays for now: %s",
                                layer_id, host_id, exc)
                    continue
                with self.ctx.uow() as uow:
                    uow.profile_holders.forget(layer_id, host_id)
                    uow.commit()
                deleted += 1
        return deleted

    # --- crash recovery --------------------------------------------------------------------

    def recover(self, *, now: datetime | None = None) -> list[LayerHolding]:
        """Remove the copies whose process died (not renewed for ``stale_after``): their
        partial volume on the receiving host, then their record. A host that does not answer
        keeps both for a later pass. Returns the copies removed."""
        stale_before = (now or datetime.now(UTC)) - self.stale_after
        with self.ctx.uow(read_only=True) as uow:
            dead = [c for c in uow.profile_holders.records(state=HoldState.COPYING)
                    if c.updated_at is not None and c.updated_at < stale_before]
        removed: list[LayerHolding] = []
        for copy in dead:
            try:
                self.ctx.driver_for_id(copy.host_id).delete_volume(
                    partial_volume_name(layer_volume_name(copy.layer_id)))
            except DeskpoolError as exc:
                log.warning("the partial copy of layer %s on host %s stays for now: %s",
                            copy.layer_id, copy.host_id, exc)
                continue
            with self.ctx.uow() as uow:
                if uow.profile_holders.drop_copy(copy.layer_id, copy.host_id,
                                                 stale_before=stale_before):
                    removed.append(copy)
                uow.commit()
        return removed
