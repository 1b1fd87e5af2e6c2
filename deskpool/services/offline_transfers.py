"""Offline check-ins and syncs on the server (issue 15): the plan, the chunks, the commit.

A transfer holds one of the desktop's host's transfer slots from its plan to its commit (not
one per request): the slot is held by the check-out (``checkin:<id>``) until a lease that
each step renews runs out (``TRANSFER_LEASE``), so a laptop that vanishes mid-transfer, or a
broker that dies, frees it by itself; the commit, a refusal, a rollback or a forced check-in
give it back at once. A laptop that finds every slot taken gets 503 with ``Retry-After``.

The chunks go into the server's layer in place (``images.layer_apply``, under an undo
journal); the plan is stored on the check-out row, so a cut transfer resumes after any restart.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from deskpool.domain.errors import Conflict, Forbidden, InvalidInput, NotFound
from deskpool.images.layer_apply import InPlaceCheckin
from deskpool.images.layer_delta import CheckinRefused, LayerDelta
from deskpool.images.offline_server import ServerLayer, discard_transfer, open_transfer
from deskpool.services.context import ServiceContext
from deskpool.services.host_slots import HostBusy, SlotKind
from deskpool.services.offline_views import CheckoutView, LeaseGrant, TransferView, checkout_view
from deskpool.services.pools import offline_policy
from deskpool.services.renewal import renewed_while_running
from deskpool.store.models import utcnow

if TYPE_CHECKING:
    from deskpool.services.offline import OfflineService

TRANSFER_KINDS = ("checkin", "sync")
TRANSFER_LEASE = timedelta(seconds=120)  # a vanished laptop's slot is free again within this
SLOT_RETRY_S = 5.0

# One transfer step per desktop at a time in this process, and each transfer kept open
# between requests (its journal read once). Another broker process resumes from the journal.
_locks: dict[uuid.UUID, threading.Lock] = {}
_locks_guard = threading.Lock()
_open: dict[uuid.UUID, tuple[str, InPlaceCheckin]] = {}
# Each desktop's plan as last decoded, by the sha256 of its bytes: every chunk request reads
# the plan, and decoding thousands of chunks each time cost more than applying them.
_plans: dict[uuid.UUID, tuple[bytes, LayerDelta]] = {}
# When this process last renewed a check-out's slot: a step within a third of the lease of
# that renews nothing (one database write per step would cost more than the step).
_renewed: dict[uuid.UUID, float] = {}


def desktop_lock(desktop_id: uuid.UUID) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(desktop_id, threading.Lock())


def forget_open(desktop_id: uuid.UUID) -> None:
    _open.pop(desktop_id, None)
    _plans.pop(desktop_id, None)


def _decoded(desktop_id: uuid.UUID, plan: bytes) -> LayerDelta:
    digest = hashlib.sha256(plan).digest()
    cached = _plans.get(desktop_id)
    if cached is not None and cached[0] == digest:
        return cached[1]
    delta = LayerDelta.decode(plan)
    _plans[desktop_id] = (digest, delta)
    return delta


def slot_holder(checkout_id: uuid.UUID) -> str:
    return f"checkin:{checkout_id}"


# --- the check-out's transfer slot ----------------------------------------------------------


def hold_slot(svc: OfflineService, checkout_id: uuid.UUID, desktop_id: uuid.UUID) -> bool:
    """Take (or renew) the check-out's transfer slot until ``TRANSFER_LEASE`` from now;
    ``HostBusy`` when every slot is taken. False when the slot was lost (it expired and
    another took it), True while held."""
    holder = slot_holder(checkout_id)
    last = _renewed.get(checkout_id)
    if last is not None and time.monotonic() - last < TRANSFER_LEASE.total_seconds() / 3:
        return True
    now = datetime.now(UTC)
    with svc.ctx.uow() as uow:
        desktop = uow.desktops.get(desktop_id)
        host_id, limit, host = desktop.host_id, desktop.host.transfer_slots, desktop.host.name
        held = uow.host_slots.held_by(host_id, SlotKind.TRANSFER.value, holder)
        if held is not None and uow.host_slots.renew(host_id, SlotKind.TRANSFER.value, held,
                                                     holder, now + TRANSFER_LEASE):
            uow.commit()
            _renewed[checkout_id] = time.monotonic()
            return True
        taken = uow.host_slots.take(host_id, SlotKind.TRANSFER.value, max(limit, 1), holder,
                                    now + TRANSFER_LEASE, now)
        uow.commit()
    if taken is not None:
        _renewed[checkout_id] = time.monotonic()
    if taken is None:
        raise HostBusy(f"host {host} is busy with {limit} other transfer(s); try again in "
                       f"{SLOT_RETRY_S:.0f} s (nothing was lost)", delay=SLOT_RETRY_S)
    return True


def release_slot(svc: OfflineService, checkout_id: uuid.UUID, desktop_id: uuid.UUID) -> None:
    _renewed.pop(checkout_id, None)
    holder = slot_holder(checkout_id)
    with svc.ctx.uow() as uow:
        host_id = uow.desktops.get(desktop_id).host_id
        held = uow.host_slots.held_by(host_id, SlotKind.TRANSFER.value, holder)
        if held is not None:
            uow.host_slots.release(host_id, SlotKind.TRANSFER.value, held, holder)
        uow.commit()


def release_stale_slots(ctx: ServiceContext) -> int:
    """Crash recovery (the reconciler, each pass): give back the transfer slots of check-outs
    with no transfer in flight any more (ended, or their transfer done or undone by a broker
    that died before giving the slot back). Those of live transfers are left to their lease.
    How many were given back."""
    freed = 0
    with ctx.uow() as uow:
        for host_id, slot, holder in uow.host_slots.held_by_prefix(SlotKind.TRANSFER.value,
                                                                   "checkin:"):
            try:
                checkout = uow.offline_checkouts.get(uuid.UUID(holder.split(":", 1)[1]))
            except (ValueError, NotFound):
                checkout = None
            if checkout is None or not checkout.active or checkout.transfer_plan is None:
                uow.host_slots.release(host_id, SlotKind.TRANSFER.value, slot, holder)
                freed += 1
        uow.commit()
    return freed


# --- the steps ----------------------------------------------------------------------------


def begin(svc: OfflineService, user: str, desktop_name: str, laptop_id: str, plan: bytes,
          kind: str) -> TransferView:
    """Start (or resume) a check-in or sync of ``plan`` (an encoded ``LayerDelta``). A plan
    other than the one in flight replaces it (the other one undone first)."""
    if kind not in TRANSFER_KINDS:
        raise InvalidInput(f"transfer kind {kind!r} is not checkin or sync")
    try:
        delta = LayerDelta.decode(plan)
    except ValueError as exc:  # e.g. a checksum field that is not hex
        raise InvalidInput(f"the check-in plan is malformed: {exc}") from None
    with svc.ctx.uow(read_only=True) as uow:
        checkout, _ = svc._own_checkout(uow, user, desktop_name, laptop_id)
        if kind == "sync" and checkout.revoked_at is not None:
            raise Forbidden(f"the check-out of {desktop_name} was revoked by an "
                            "administrator; check it in instead of syncing")
        checkout_id, desktop_id, base, old_plan = (
            checkout.id, checkout.desktop_id, checkout.base_sha256, checkout.transfer_plan)
    hold_slot(svc, checkout_id, desktop_id)
    with desktop_lock(desktop_id):
        server = svc._server_layer(desktop_id)
        if old_plan is not None and old_plan != plan:
            forget_open(desktop_id)
            discard_transfer(server)
        staged = _opened(desktop_id, server, delta, base)
        pending = sum(delta.chunks[i].wire_length for i in staged.missing())
        with svc.ctx.uow() as uow:
            checkout = uow.offline_checkouts.get(checkout_id)
            checkout.transfer_plan, checkout.transfer_kind = plan, kind
            checkout.transfer_started_at = checkout.transfer_started_at or utcnow()
            checkout.bytes_pending, checkout.last_error = pending, None
            uow.commit()
        return TransferView(desktop_name, kind, len(delta.chunks), staged.missing(), pending)


def put_chunks(svc: OfflineService, user: str, desktop_name: str, laptop_id: str,
               indexes: list[int], data: bytes) -> TransferView:
    """Chunks' payloads end to end, in ``indexes``' order: each checked against the plan and
    journalled, so a batch cut halfway keeps the chunks it applied."""
    checkout_id, desktop_id, delta, kind, base = _in_flight(svc, user, desktop_name,
                                                            laptop_id)
    if not indexes or any(not 0 <= i < len(delta.chunks) for i in indexes):
        raise InvalidInput(f"chunk indexes must be 0 to {len(delta.chunks) - 1}")
    sizes = [delta.chunks[i].wire_length for i in indexes]
    if len(indexes) == 1:  # alone, a chunk of the wrong size is a damaged one (503)
        sizes = [len(data)]
    elif sum(sizes) != len(data):
        raise InvalidInput(f"the chunks' bytes are {len(data)} long; the plan says "
                           f"chunks {indexes[0]}... take {sum(sizes)}")
    hold_slot(svc, checkout_id, desktop_id)
    with desktop_lock(desktop_id):
        staged = _opened(desktop_id, svc._server_layer(desktop_id), delta, base)
        items, at = [], 0
        for index, size in zip(indexes, sizes, strict=True):
            items.append((index, data[at:at + size]))
            at += size
        staged.apply_chunks(items)
        missing = staged.missing()
    return TransferView(desktop_name, kind, len(delta.chunks), missing,
                        sum(delta.chunks[i].wire_length for i in missing))


def finish(svc: OfflineService, user: str, desktop_name: str,
           laptop_id: str) -> CheckoutView | LeaseGrant:
    """Verify and commit: a check-in releases the desktop (its view), a sync keeps it out
    with a renewed lease. A refusal undoes the transfer and keeps the lock."""
    checkout_id, desktop_id, delta, kind, base = _in_flight(svc, user, desktop_name, laptop_id)
    hold_slot(svc, checkout_id, desktop_id)

    def renew() -> bool:
        _renewed.pop(checkout_id, None)
        return hold_slot(svc, checkout_id, desktop_id)

    with renewed_while_running(renew, TRANSFER_LEASE.total_seconds() / 3,
                               f"transfer slot of check-out {checkout_id}"), \
            desktop_lock(desktop_id):
        staged = _opened(desktop_id, svc._server_layer(desktop_id), delta, base)
        with svc.ctx.uow(read_only=True) as uow:
            data_key = svc._data_key(uow.offline_checkouts.get(checkout_id))
        try:
            staged.commit(data_key)
        except CheckinRefused as exc:
            _refused(svc, checkout_id, desktop_id, f"{kind} refused: {exc}")
            raise Conflict(str(exc)) from exc
        except Exception as exc:
            _refused(svc, checkout_id, desktop_id, f"{kind} refused: {exc}")
            raise
        forget_open(desktop_id)
        if kind != "sync":  # before the write transaction: a convert takes a while
            svc._rebuild_root(desktop_id, data_key)
        with svc.ctx.uow() as uow:
            checkout = uow.offline_checkouts.get(checkout_id)
            checkout.layer_sha256 = delta.target_sha256
            checkout.last_sync_at = utcnow()
            if kind == "sync":
                checkout.transfer_plan = checkout.transfer_kind = None
                checkout.transfer_started_at, checkout.bytes_pending = None, 0
                policy = offline_policy(uow.pools.get_by_name(checkout.pool_name))
                lease = svc._lease(checkout, policy, utcnow())
                uow.commit()
                done: CheckoutView | LeaseGrant = svc._grant(checkout, lease)
            else:
                svc._release(uow, checkout, "checked-in",
                             f"{user} checked {checkout.desktop_name} in from "
                             f"{checkout.laptop_id} ({delta.payload_bytes()} bytes sent)",
                             "offline-checkin")
                uow.commit()
                done = checkout_view(checkout)
    release_slot(svc, checkout_id, desktop_id)
    return done


def _refused(svc: OfflineService, checkout_id: uuid.UUID, desktop_id: uuid.UUID,
             message: str) -> None:
    forget_open(desktop_id)
    svc._note_error(checkout_id, message)
    release_slot(svc, checkout_id, desktop_id)


def _in_flight(svc: OfflineService, user: str, desktop_name: str,
               laptop_id: str) -> tuple[uuid.UUID, uuid.UUID, LayerDelta, str, str]:
    with svc.ctx.uow(read_only=True) as uow:
        checkout, _ = svc._own_checkout(uow, user, desktop_name, laptop_id)
        if checkout.transfer_plan is None or checkout.transfer_kind is None:
            raise Conflict(f"no check-in or sync of {desktop_name} is in progress; "
                           "start one first")
        return (checkout.id, checkout.desktop_id,
                _decoded(checkout.desktop_id, checkout.transfer_plan),
                checkout.transfer_kind, checkout.base_sha256)


def _opened(desktop_id: uuid.UUID, server: ServerLayer, delta: LayerDelta,
            base: str) -> InPlaceCheckin:
    cached = _open.get(desktop_id)
    if cached is not None and cached[0] == delta.identity():
        return cached[1]
    try:
        staged = open_transfer(server, delta, base)
    except CheckinRefused as exc:  # another base or starting copy: nothing was touched
        raise Conflict(str(exc)) from exc
    _open[desktop_id] = (delta.identity(), staged)
    return staged
