"""Offline desktops on the server (issue 15): check a user's desktop out to a laptop, renew
its lease, take its changes back (check-in or sync), roll back, revoke, force a check-in.

The lock is the desktop state ``checked_out`` (see ``domain.states``: entered from ready by
the one table's compare-and-swap, left only back to ready), with an ``offline_checkouts``
row saying to whom and until when. Every broker and reconciler path names the states it acts
on and none names this one, so no hand-over, recycle, retire, move or power step touches a
checked-out desktop, and the database's CAS settles two brokers racing to check one out.

The server's copy of the desktop's changes is an encrypted layer file
(``images.offline_server``). Check-out freezes the VM (powered off, so nothing on the server
writes while the laptop does) and hands out the layer's data key once, over the API, for the
laptop to wrap under the user's password; the server keeps it only under its escrow key.
Transfers (check-in, sync) are ``offline_transfers``: the plan is stored on the check-out
row and the undo journal on disk, so a cut transfer resumes after any restart, and the
layer becomes the new copy only once it is verified (else it is undone).
"""

from __future__ import annotations

import base64
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from deskpool.domain.errors import Conflict, Forbidden, InvalidInput, NotFound
from deskpool.domain.models import VolumeInfo
from deskpool.domain.offline import OfflineLease, OfflinePolicy, human_date, sign_lease
from deskpool.domain.offline_keys import EscrowWrappedKey as Escrowed
from deskpool.domain.offline_keys import (
    KeyBinding,
    new_data_key,
    unwrap_from_escrow,
    wrap_for_escrow,
)
from deskpool.domain.states import DesktopState, transition
from deskpool.drivers.base import HypervisorDriver, root_volume_name
from deskpool.images.layer_apply import layer_manifest
from deskpool.images.offline_layers import layer_from_overlay, overlay_from_layer
from deskpool.images.offline_server import (
    ServerLayer,
    discard_transfer,
    ensure_base,
    ensure_layer,
    transfer_in_flight,
)
from deskpool.services import offline_transfers as transfers
from deskpool.services.audit import Actor, record_audit
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.host_slots import SlotKind, host_slot
from deskpool.services.offline_secrets import OfflineSecrets, load_offline_secrets, secrets_dir
from deskpool.services.offline_views import (
    CheckoutView,
    LeaseGrant,
    OfflineDesktopView,
    TransferView,
    checkout_view,
)
from deskpool.services.pools import offline_policy
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Desktop, utcnow
from deskpool.store.offline import OfflineCheckout

S = DesktopState
LAPTOP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# A request waits this long for one of the host's transfer slots before answering 503 with
# ``Retry-After: SLOT_RETRY_S``: a worker thread must not block behind another transfer.
SLOT_WAIT_S = 2.0
SLOT_RETRY_S = 5.0

_desktop_lock = transfers.desktop_lock


def _binding(c: OfflineCheckout) -> KeyBinding:
    return KeyBinding(user=c.user_name, desktop_id=c.desktop_id, laptop_id=c.laptop_id)


@dataclass
class Download:
    """A file the laptop downloads, with the host's transfer slot held until ``close``
    (the response's stream ends, completed or cut)."""

    path: Path
    size: int
    sha256: str
    hold: ExitStack

    def close(self) -> None:
        self.hold.close()


class OfflineService:
    """``actor``: the administrator behind admin actions (audited); None for a user's."""

    def __init__(self, ctx: ServiceContext, actor: Actor | None = None) -> None:
        self.ctx = ctx
        self.actor = actor
        self._secrets: OfflineSecrets | None = None

    @property
    def secrets(self) -> OfflineSecrets:
        if self._secrets is None:
            self._secrets = load_offline_secrets(self.ctx.settings)
        return self._secrets

    def _server_layer(self, desktop_id: uuid.UUID) -> ServerLayer:
        # The fake driver's volumes are not files: the layers live in the data directory.
        return ServerLayer(secrets_dir(self.ctx.settings), desktop_id)

    # --- the user's side -------------------------------------------------------------------

    def offline_desktops(self, user: str) -> list[OfflineDesktopView]:
        """The user's own desktops in pools that let them go offline."""
        with self.ctx.uow(read_only=True) as uow:
            found = []
            for d in uow.offline_checkouts.desktops_of(user):
                pool = uow.pools.get(d.pool_id) if d.pool_id else None
                if pool is None or not offline_policy(pool).may_go_offline:
                    continue
                c = uow.offline_checkouts.active_for(d.id)
                version = uow.versions.get(d.template_version_id)
                image = Path(version.image_path)
                found.append(OfflineDesktopView(
                    desktop=d.name, pool=pool.name, state=d.state.value,
                    policy=offline_policy(pool), checkout=checkout_view(c) if c else None,
                    base_sha256=version.image_sha256,
                    base_size=image.stat().st_size if image.is_file() else 0))
            return found

    def check_out(self, user: str, desktop_name: str, laptop_id: str) -> LeaseGrant:
        """Lock ``desktop_name`` for ``laptop_id``: freeze it, store the check-out, issue a
        lease. Any refusal or failure stores nothing."""
        if not LAPTOP_ID.match(laptop_id):
            raise InvalidInput(f"laptop name {laptop_id!r} must be 1-63 characters of A-Z, "
                               "a-z, 0-9, '.', '_' and '-', starting with a letter or digit")
        now = utcnow()
        secrets_ = self.secrets
        with _desktop_lock_by_name(self.ctx, desktop_name), self.ctx.uow() as uow:
            desktop = uow.desktops.get_by_name(desktop_name)
            if desktop.assigned_user != user:
                raise Forbidden(f"desktop {desktop_name} is not assigned to you; only its own "
                                "user may check it out")
            pool = uow.pools.get(desktop.pool_id) if desktop.pool_id else None
            policy = offline_policy(pool) if pool else OfflinePolicy()
            if pool is None or not policy.may_go_offline:
                raise Forbidden(f"pool {pool.name if pool else '(none)'} does not allow its "
                                f"desktops to go offline, so {desktop_name} cannot be "
                                "checked out")
            if desktop.state is S.CHECKED_OUT:
                out = uow.offline_checkouts.active_for(desktop.id)
                raise Conflict(f"desktop {desktop_name} is already checked out"
                               + (f" to {out.laptop_id} until "
                                  f"{human_date(out.lease_expires_at)}" if out else "")
                               + "; check it in first")
            if desktop.state is not S.READY:
                raise Conflict(f"desktop {desktop_name} is {desktop.state.value}; log off "
                               "(or wait until it is ready) before checking it out")
            version = uow.versions.get(desktop.template_version_id)
            server = self._server_layer(desktop.id)
            driver = self.ctx.driver_for(desktop.host)
            root = _local_root(driver, desktop.id)
            if root is not None and driver.list_snapshots(desktop.id):
                raise Conflict(f"desktop {desktop_name} has snapshots, which its offline copy "
                               "cannot carry; it cannot be checked out")
            data_key, made_layer = self._layer_key(uow, desktop, server,
                                                   fresh=root is not None)
            # The lock first: from here no broker can hand the desktop out or recycle it.
            transition(uow.desktops, desktop.id, S.READY, S.CHECKED_OUT)
            checkout = OfflineCheckout(
                id=uuid.uuid4(), desktop_id=desktop.id, desktop_name=desktop.name,
                pool_name=pool.name, user_name=user, laptop_id=laptop_id,
                checked_out_at=now, lease_expires_at=now, escrowed_key="",
                base_sha256=version.image_sha256, layer_sha256="")
            checkout.escrowed_key = wrap_for_escrow(
                data_key, secrets_.escrow_key, secrets_.escrow_key_id,
                _binding(checkout)).to_json()
            try:
                # A consistent point: the VM off, so the server's copy stops changing (inside
                # the transaction: a failure here stores nothing; a VM left off is started by
                # the usual hand-over).
                driver.stop_vm(desktop.id, force=True)
                if root is not None:  # the desktop's disk as its user left it
                    base = ensure_base(server, Path(version.image_path), version.image_sha256)
                    discard_transfer(server)  # a journal of the old layer's, if any
                    layer_from_overlay(Path(root.path), server.layer, base, data_key)
                    checkout.layer_sha256 = layer_manifest(server.layer).digest
                else:  # the fake's volumes are no files: the layer alone stands for the disk
                    checkout.layer_sha256 = ensure_layer(server, Path(version.image_path),
                                                         version.image_sha256, data_key)
                lease = self._lease(checkout, policy, now)
                uow.offline_checkouts.add(checkout)
                record_event(uow, "offline-checkout",
                             f"{user} checked {desktop.name} out to {laptop_id} until "
                             f"{human_date(checkout.lease_expires_at)}", user=user,
                             pool=pool.name, desktop_id=desktop.id, desktop=desktop.name)
                uow.commit()
            except BaseException:
                if made_layer:  # its key dies with this transaction: the layer would be lost
                    server.layer.unlink(missing_ok=True)
                raise
            return self._grant(checkout, lease,
                               data_key=base64.b64encode(data_key).decode("ascii"))

    def renew(self, user: str, desktop_name: str, laptop_id: str, *,
              bytes_pending: int | None = None) -> LeaseGrant:
        """Sync's lease half: a new lease from now, as long as the policy allows."""
        if bytes_pending is not None and bytes_pending < 0:
            raise InvalidInput("bytes_pending must not be negative")
        with self.ctx.uow() as uow:
            checkout, policy = self._own_checkout(uow, user, desktop_name, laptop_id)
            if checkout.revoked_at is not None:
                raise Forbidden(f"the check-out of {desktop_name} was revoked by an "
                                "administrator; check it in now")
            lease = self._lease(checkout, policy, utcnow())
            checkout.last_sync_at = utcnow()
            if bytes_pending is not None:
                checkout.bytes_pending = bytes_pending
            uow.commit()
            return self._grant(checkout, lease)

    def open_download(self, user: str, desktop_name: str, laptop_id: str,
                      what: str) -> Download:
        """The layer (``what="layer"``) or the template's base (``"base"``) of the user's
        check-out, with a transfer slot of the desktop's host taken (``HostBusy`` when none
        frees within ``SLOT_WAIT_S``)."""
        with self.ctx.uow(read_only=True) as uow:
            checkout, _ = self._own_checkout(uow, user, desktop_name, laptop_id)
            desktop_id, base, layer_sha = (checkout.desktop_id, checkout.base_sha256,
                                           checkout.layer_sha256)
        server = self._server_layer(desktop_id)
        path, sha = (server.layer, layer_sha) if what == "layer" else (server.base(base), base)
        if not path.is_file():
            raise NotFound(f"the {what} of {desktop_name} is missing on the server")
        if what == "layer" and transfer_in_flight(server):
            raise Conflict(f"a check-in or sync of {desktop_name} is in flight; finish it "
                           "(run it again) before downloading the layer")
        hold = ExitStack()
        hold.enter_context(self.transfer_slot(desktop_id))
        return Download(path=path, size=path.stat().st_size, sha256=sha, hold=hold)

    def own_checkout_desktop(self, user: str, desktop_name: str, laptop_id: str) -> uuid.UUID:
        """The id of ``desktop_name``, checked out by ``user`` to ``laptop_id`` (else
        ``Forbidden``/``Conflict`` as for any of the laptop's calls)."""
        with self.ctx.uow(read_only=True) as uow:
            return self._own_checkout(uow, user, desktop_name, laptop_id)[0].desktop_id

    @contextmanager
    def transfer_slot(self, desktop_id: uuid.UUID) -> Iterator[None]:
        """One of the desktop's host's transfer slots while a download or an upload step
        runs, so laptops do not starve the host's disks (issue 15)."""
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            host_id, limit, host = (desktop.host_id, desktop.host.transfer_slots,
                                    desktop.host.name)
        busy = (f"host {host} is busy with {limit} other transfer(s); try again in "
                f"{SLOT_RETRY_S:.0f} s (nothing was lost)")
        with host_slot(self.ctx, host_id, SlotKind.TRANSFER, limit, wait_up_to=SLOT_WAIT_S,
                       busy_message=busy, retry_after=SLOT_RETRY_S):
            yield

    def revoked_checkouts(self, user: str) -> list[uuid.UUID]:
        """What the user's laptops must refuse to start (``verify_lease``'s list)."""
        with self.ctx.uow(read_only=True) as uow:
            return uow.offline_checkouts.revoked_ids(user)

    # --- transfers: check-in and sync -------------------------------------------------------

    def begin_transfer(self, user: str, desktop_name: str, laptop_id: str, plan: bytes,
                       kind: str = "checkin") -> TransferView:
        """See ``offline_transfers.begin``: the check-out's transfer slot is taken here."""
        return transfers.begin(self, user, desktop_name, laptop_id, plan, kind)

    def put_chunk(self, user: str, desktop_name: str, laptop_id: str, index: int,
                  data: bytes) -> TransferView:
        return transfers.put_chunks(self, user, desktop_name, laptop_id, [index], data)

    def put_chunks(self, user: str, desktop_name: str, laptop_id: str, indexes: list[int],
                   data: bytes) -> TransferView:
        return transfers.put_chunks(self, user, desktop_name, laptop_id, indexes, data)

    def finish_transfer(self, user: str, desktop_name: str,
                        laptop_id: str) -> CheckoutView | LeaseGrant:
        """See ``offline_transfers.finish``: the slot is given back after the commit."""
        return transfers.finish(self, user, desktop_name, laptop_id)

    # --- ending a check-out without the laptop's changes -----------------------------------

    def roll_back(self, user: str, desktop_name: str) -> CheckoutView:
        """The user gives up the laptop's changes since the last sync (if the pool allows)."""
        with self.ctx.uow() as uow:
            checkout = self._active(uow, desktop_name)
            if checkout.user_name != user:
                raise Forbidden(f"desktop {desktop_name} is not checked out to you")
            policy = offline_policy(uow.pools.get_by_name(checkout.pool_name))
            if not policy.may_roll_back:
                raise Forbidden(f"pool {checkout.pool_name} does not let users roll back an "
                                "offline desktop; check it in, or ask an administrator")
        return self._discard_and_release(desktop_name, "rolled-back", "offline-rollback",
                                         f"{user} rolled {desktop_name} back: the laptop's "
                                         "changes since its last sync are discarded")

    def admin_roll_back(self, desktop_name: str) -> CheckoutView:
        return self._discard_and_release(desktop_name, "rolled-back", "offline-rollback",
                                         f"{self._who()} rolled {desktop_name} back: the "
                                         "laptop's changes since its last sync are discarded")

    def force_check_in(self, desktop_name: str) -> CheckoutView:
        """The desktop comes back online as of its last sync (a lost laptop); the laptop's
        lease is revoked with it, so its copy no longer starts."""
        return self._discard_and_release(desktop_name, "forced-in", "offline-force-checkin",
                                         f"{self._who()} forced {desktop_name} back in from "
                                         "its last sync; the laptop's copy is revoked")

    def revoke(self, desktop_name: str) -> CheckoutView:
        """The laptop may no longer start the desktop (at its next contact, and once its
        lease runs out at the latest); the lock stays until it is checked in or forced."""
        with self.ctx.uow() as uow:
            checkout = self._active(uow, desktop_name)
            if checkout.revoked_at is not None:
                raise Conflict(f"the check-out of {desktop_name} is already revoked")
            checkout.revoked_at = utcnow()
            message = (f"{self._who()} revoked the check-out of {desktop_name} to "
                       f"{checkout.laptop_id}")
            record_event(uow, "offline-revoke", message, severity="warning",
                         user=checkout.user_name, pool=checkout.pool_name,
                         desktop_id=checkout.desktop_id, desktop=desktop_name)
            record_audit(uow, self.actor, "offline.revoke", f"desktop/{desktop_name}",
                         message, old={"revoked": False}, new={"revoked": True},
                         pool=checkout.pool_name, user=checkout.user_name)
            uow.commit()
            return checkout_view(checkout)

    def checkouts(self) -> list[CheckoutView]:
        with self.ctx.uow(read_only=True) as uow:
            return [checkout_view(c) for c in uow.offline_checkouts.active()]

    # --- helpers ---------------------------------------------------------------------------

    def _who(self) -> str:
        return self.actor.name if self.actor else "an administrator"

    def _discard_and_release(self, desktop_name: str, status: str, kind: str,
                             message: str) -> CheckoutView:
        with self.ctx.uow(read_only=True) as uow:
            desktop_id = self._active(uow, desktop_name).desktop_id
        with _desktop_lock(desktop_id):
            transfers.forget_open(desktop_id)
            discard_transfer(self._server_layer(desktop_id))
            with self.ctx.uow(read_only=True) as uow:
                data_key = self._data_key(self._active(uow, desktop_name))
            self._rebuild_root(desktop_id, data_key)  # as of the last sync
            with self.ctx.uow() as uow:
                checkout = self._active(uow, desktop_name)
                if status == "forced-in" and checkout.revoked_at is None:
                    checkout.revoked_at = utcnow()
                self._release(uow, checkout, status, message, kind)
                if self.actor is not None or kind != "offline-rollback":
                    record_audit(uow, self.actor, kind.replace("offline-", "offline."),
                                 f"desktop/{desktop_name}", message, old={"status": "out"},
                                 new={"status": status}, pool=checkout.pool_name,
                                 user=checkout.user_name)
                uow.commit()
                checkout_id = checkout.id
                view = checkout_view(checkout)
            transfers.release_slot(self, checkout_id, desktop_id)
            return view

    @staticmethod
    def _release(uow: UnitOfWork, checkout: OfflineCheckout, status: str, message: str,
                 kind: str) -> None:
        uow.offline_checkouts.end(checkout, status)
        transition(uow.desktops, checkout.desktop_id, S.CHECKED_OUT, S.READY)
        record_event(uow, kind, message, user=checkout.user_name, pool=checkout.pool_name,
                     desktop_id=checkout.desktop_id, desktop=checkout.desktop_name)

    @staticmethod
    def _active(uow: UnitOfWork, desktop_name: str) -> OfflineCheckout:
        desktop = uow.desktops.get_by_name(desktop_name)
        checkout = uow.offline_checkouts.active_for(desktop.id)
        if checkout is None:
            raise Conflict(f"desktop {desktop_name} is not checked out")
        return checkout

    def _own_checkout(self, uow: UnitOfWork, user: str, desktop_name: str,
                      laptop_id: str) -> tuple[OfflineCheckout, OfflinePolicy]:
        checkout = self._active(uow, desktop_name)
        if checkout.user_name != user or checkout.laptop_id != laptop_id:
            raise Forbidden(f"desktop {desktop_name} is not checked out to you on laptop "
                            f"{laptop_id}")
        return checkout, offline_policy(uow.pools.get_by_name(checkout.pool_name))

    def _grant(self, checkout: OfflineCheckout, lease: str,
               data_key: str | None = None) -> LeaseGrant:
        """A lease with the sizes the laptop must have room for before downloading."""
        server = self._server_layer(checkout.desktop_id)
        base, layer = server.base(checkout.base_sha256), server.layer
        return LeaseGrant(checkout=checkout_view(checkout), lease=lease,
                          public_key_pem=self.secrets.public_key_pem(),
                          base_sha256=checkout.base_sha256, layer_sha256=checkout.layer_sha256,
                          base_size=base.stat().st_size if base.is_file() else 0,
                          layer_size=layer.stat().st_size if layer.is_file() else 0,
                          data_key=data_key)

    def _note_error(self, checkout_id: uuid.UUID, message: str) -> None:
        with self.ctx.uow() as uow:
            uow.offline_checkouts.get(checkout_id).last_error = message
            uow.commit()

    def _data_key(self, checkout: OfflineCheckout) -> bytes:
        return unwrap_from_escrow(Escrowed.from_json(checkout.escrowed_key),
                                  self.secrets.escrow_key, _binding(checkout))

    def _rebuild_root(self, desktop_id: uuid.UUID, data_key: bytes) -> None:
        """The desktop's disk made again from the server's copy of its layer (what the laptop
        checked in, or its last sync), its VM off; the old disk kept on any failure, the
        check-out then still holding the desktop. A host whose disks are not files here (the
        fake) keeps the layer as the desktop's disk."""
        with self.ctx.uow(read_only=True) as uow:
            driver = self.ctx.driver_for(uow.desktops.get(desktop_id).host)
        root = _local_root(driver, desktop_id)
        if root is None:
            return
        if root.backing_volume_path is None:
            raise Conflict(f"the disk of desktop {desktop_id} has no template under it; its "
                           "offline layer cannot be laid on it")
        overlay_from_layer(self._server_layer(desktop_id).layer, data_key, Path(root.path),
                           Path(root.backing_volume_path))

    def _layer_key(self, uow: UnitOfWork, desktop: Desktop, server: ServerLayer, *,
                   fresh: bool = False) -> tuple[bytes, bool]:
        """The key of the desktop's layer (from its last check-out's escrow), or a new one
        for a layer made now (``fresh``: made from the desktop's disk whatever is there);
        and whether the layer is new."""
        previous = uow.offline_checkouts.latest_for(desktop.id)
        if fresh:
            return new_data_key(), True
        if server.layer.exists() and previous is not None:
            return self._data_key(previous), False
        if server.layer.exists():  # a layer whose check-out never committed: unusable
            server.layer.unlink()
        return new_data_key(), True

    def _lease(self, checkout: OfflineCheckout, policy: OfflinePolicy, now: datetime) -> str:
        """A signed lease from ``now``. It ends at the earlier of the policy's period and
        the check-out's maximum days offline counted from check-out: renewals never stretch
        a check-out past that."""
        lease = OfflineLease.grant(checkout_id=checkout.id, user=checkout.user_name,
                                   desktop_id=checkout.desktop_id,
                                   laptop_id=checkout.laptop_id, policy=policy,
                                   base_sha256=checkout.base_sha256, now=now)
        limit = (checkout.checked_out_at.replace(microsecond=0)
                 + timedelta(days=policy.max_days_offline))
        if limit <= lease.issued_at + timedelta(seconds=1):
            raise Conflict(f"desktop {checkout.desktop_name} has been offline for the "
                           f"maximum of {policy.max_days_offline} days; check it in")
        if lease.expires_at > limit:
            lease = replace(lease, expires_at=limit)
        checkout.lease_expires_at = lease.expires_at
        return sign_lease(lease, self.secrets.signing_key).to_json()


def _desktop_lock_by_name(ctx: ServiceContext, desktop_name: str) -> threading.Lock:
    with ctx.uow(read_only=True) as uow:
        try:
            return _desktop_lock(uow.desktops.get_by_name(desktop_name).id)
        except NotFound:
            raise NotFound(f"there is no desktop named {desktop_name!r}") from None


def _local_root(driver: HypervisorDriver, desktop_id: uuid.UUID) -> VolumeInfo | None:
    """The desktop's root volume when it is a file this broker reaches (a libvirt host on
    this machine); None for others (the fake's volumes, a remote host's)."""
    try:
        info = driver.volume_info(root_volume_name(desktop_id))
    except NotFound:
        return None
    return info if Path(info.path).is_file() else None
