"""Rebasing a layered desktop's user layer onto its pool's template version (issue 14).

A stateful pool with user layers keeps each user's changes to the system on their desktop's
layer disk, never on its root. When the pool's version changes, an outdated desktop that is
not in use (its user logged off, or free and ready) is rebased, from its row
(``recycling`` with task ``rebase``):

1. its VM is stopped (gracefully, forced after a bound) and deleted; the layer disk is not
   the VM's and stays;
2. the VM is made on the new version with the layer and, read-only, the old version's root
   (``VmSpec.layer_base_volume``), its kernel command line naming the new version
   (``deskpool.layer_version``); at this boot the guest rebases the layer before it mounts
   the overlay root and leaves its ``RebaseReport`` on the layer disk
   (``REPORT_PATH`` in the running guest);
3. once the guest confirms its identity, the report is recorded (``UserLayerViews``) and
   the row moves to the new version;
4. the VM is made once more on the new version without the old root (the root is read-only
   in the guest: nothing is lost), so the old version is pinned by nothing, and booted as
   for any desktop.

A failed rebase (the boot times out, the agent never answers, an error) leaves the layer's
current generation on the old version, as the guest's contract says: the VM is powered off,
the failure recorded (with the guest's reason from the layer disk when the host's storage is
local), and the VM made and booted on the old version again, so its user gets their desktop
as it was. The user's layer is touched by nothing here on any path.

Every step starts from the row, so a broker killed at any point carries on at the next pass:
a re-made VM and a second boot are harmless, and the guest's rebase is idempotent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from deskpool.domain.errors import (
    AgentUnavailable,
    Conflict,
    DeskpoolError,
    DriverError,
    HostConnectionLost,
    LostRace,
    VmNotFound,
)
from deskpool.domain.layers import LayerError, RebaseReport
from deskpool.domain.models import PowerState
from deskpool.domain.states import HELD_STATES, DesktopState, DesktopTask, transition
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver, layer_volume_name, stop_gracefully
from deskpool.images.user_layer_disk import read_layer_file
from deskpool.services.context import ServiceContext
from deskpool.services.events import record_event
from deskpool.services.layer_usage import try_measure_layer
from deskpool.services.pools import rebases_layers
from deskpool.services.user_layers import UserLayerViews

if TYPE_CHECKING:
    from deskpool.services.factory import DesktopFactory

log = logging.getLogger(__name__)
S = DesktopState

# Where the running guest shows its layer disk's root (the guest side's contract).
REPORT_PATH = "/run/deskpool/layer/rebase-report.json"
ERROR_FILE = "rebase-error.txt"  # at the layer disk's root, when the guest's rebase failed
SHUTDOWN_GRACE_S = 60.0  # a graceful stop's bound before the VM is forced off
SHUTDOWN_POLL_S = 0.2
AGENT_POLL_S = 1.0  # a rebase boot's agent (or a power-off) is looked for this often

ReportReader = Callable[[HypervisorDriver, uuid.UUID], RebaseReport | None]


def read_guest_report(driver: HypervisorDriver, desktop_id: uuid.UUID) -> RebaseReport | None:
    """The report the guest left at this boot's rebase; None when it left none (a boot
    after an earlier one that rebased it already may not)."""
    try:
        raw = GuestAgent(driver, desktop_id).read_file(REPORT_PATH)
    except DriverError:
        return None
    try:
        return RebaseReport.from_json(json.loads(raw))
    except (ValueError, LayerError) as exc:
        log.warning("desktop %s: the guest's rebase report is unreadable: %s", desktop_id, exc)
        return None


def guest_rebase_error(driver: HypervisorDriver, desktop_id: uuid.UUID) -> str | None:
    """Why the guest's rebase failed, from the layer disk (a local host's storage only)."""
    if driver.storage_dir is None:
        return None
    try:
        text = read_layer_file(driver.storage_dir / layer_volume_name(desktop_id), ERROR_FILE)
    except (LayerError, OSError) as exc:
        log.warning("desktop %s: the layer's error file is unreadable: %s", desktop_id, exc)
        return None
    return f"the guest's rebase failed: {text.strip()}" if text and text.strip() else None


class LayerRebaseBoot:
    def __init__(self, ctx: ServiceContext, factory: DesktopFactory, *,
                 read_report: ReportReader = read_guest_report,
                 shutdown_grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self.ctx = ctx
        self.factory = factory
        self.read_report = read_report
        self.shutdown_grace_s = shutdown_grace_s
        self.views = UserLayerViews(ctx)

    def rebase(self, desktop_id: uuid.UUID, *, timeout_s: float) -> bool:
        """Rebase the desktop (``recycling``) onto its pool's current version and boot it
        ready for its user; its state is the caller's. Returns whether it now runs the
        pool's version (False: the rebase failed and it runs its own one again). Raises only
        when even its own version cannot be booted (or the host's connection is lost)."""
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            pool = uow.pools.get(desktop.pool_id) if desktop.pool_id else None
            if pool is None or not rebases_layers(pool):
                raise Conflict(f"desktop {desktop.name!r} has no user layer to rebase")
            old_id, new_id = desktop.template_version_id, pool.current_version_id
            old, new = desktop.template_version.number, pool.current_version.number
            name = desktop.name
            driver = self.ctx.driver_for(desktop.host)
        if old_id != new_id:
            # How full the layer is, while the user's guest still runs (for the views, and a
            # warning before a layer with no room for the next generation fails).
            try_measure_layer(self.ctx, driver, desktop_id, old)
            try:
                report = self._rebase_boot(driver, desktop_id, old_id, new_id, timeout_s)
            except HostConnectionLost:
                raise  # not the rebase's failure: the same step again, from the row
            except DeskpoolError as exc:
                self._fall_back(driver, desktop_id, name, exc, old, new, timeout_s)
                return False
            self._record(desktop_id, name, report, old, new, old_id, new_id)
        # On its own version now (the new one, or a crash's rerun after the switch): made
        # without the old root, so nothing pins the old version, and booted as any desktop.
        self._remake_and_boot(driver, desktop_id, timeout_s)
        return True

    # --- the steps --------------------------------------------------------------------------

    def _rebase_boot(self, driver: HypervisorDriver, desktop_id: uuid.UUID,
                     old_id: uuid.UUID, new_id: uuid.UUID,
                     timeout_s: float) -> RebaseReport | None:
        """The boot of the new version over the layer, the old root beside it, until the
        guest confirms its identity: the guest's report."""
        self._power_off(driver, desktop_id)
        driver.delete_vm(desktop_id)  # the layer volume is not the VM's: it stays
        self.factory.make_vm(desktop_id, version_id=new_id, layer_base_id=old_id)
        driver.start_vm(desktop_id)
        deadline = time.monotonic() + timeout_s
        agent = GuestAgent(driver, desktop_id)
        while not agent.ping():
            # A guest that cannot rebase powers itself off at once, its reason on the layer:
            # no need to wait out the boot's timeout for an agent that will never answer.
            if driver.get_vm(desktop_id).power_state is PowerState.SHUTOFF:
                raise DriverError("the guest powered off during the rebase boot")
            if time.monotonic() >= deadline:
                raise AgentUnavailable(f"the guest agent did not answer within {timeout_s:g} s "
                                       "of the rebase boot")
            time.sleep(AGENT_POLL_S)
        self.factory.confirm_running(desktop_id,
                                     timeout_s=max(1.0, deadline - time.monotonic()))
        return self.read_report(driver, desktop_id)

    def _record(self, desktop_id: uuid.UUID, name: str, report: RebaseReport | None,
                old: int, new: int, old_id: uuid.UUID, new_id: uuid.UUID) -> None:
        """The report kept, then the row on the new version (a crash between the two
        records the report again at the rerun: twice rather than never)."""
        if report is not None:
            self.views.record_rebase(desktop_id, report, old_version=old, new_version=new)
        with self.ctx.uow() as uow:
            if not uow.desktops.rebased_onto(desktop_id, old_id, new_id):
                raise LostRace(f"desktop {name} is no longer recycling on version {old}; "
                               "another actor changed it first")
            if report is None:
                # The guest booted the layer on the new version, so it is rebased (it never
                # boots a layer on a version it was not rebased to), but it left no report.
                record_event(uow, "layer-rebased",
                             f"user layer of {name} rebased from version {old} to {new}; "
                             "the guest left no report", severity="warning",
                             desktop_id=desktop_id, desktop=name)
            uow.commit()

    def _fall_back(self, driver: HypervisorDriver, desktop_id: uuid.UUID, name: str,
                   exc: DeskpoolError, old: int, new: int, timeout_s: float) -> None:
        """The rebase failed: the VM off, the failure recorded, the desktop back on its own
        version (its layer's current generation still sits on it), booted."""
        log.warning("desktop %s: the rebase of its user layer onto version %d failed: %s",
                    name, new, exc)
        with contextlib.suppress(VmNotFound):
            driver.stop_vm(desktop_id, force=True)
        guest = guest_rebase_error(driver, desktop_id)
        reason = f"{guest} ({exc})" if guest else str(exc)
        self.views.record_rebase(
            desktop_id, error=f"{reason.strip()}; the desktop runs version {old} again",
            old_version=old, new_version=new)
        driver.delete_vm(desktop_id)
        self._remake_and_boot(driver, desktop_id, timeout_s)

    def _remake_and_boot(self, driver: HypervisorDriver, desktop_id: uuid.UUID,
                         timeout_s: float) -> None:
        """The VM made anew on the desktop's version, without an old root, and booted until
        its identity is confirmed (cloud-init and the join hook as for any desktop: a joined
        guest is not joined again)."""
        self._power_off(driver, desktop_id)
        self.factory.revert_by_boot(desktop_id, timeout_s=timeout_s)

    def _power_off(self, driver: HypervisorDriver, desktop_id: uuid.UUID) -> None:
        """A graceful stop (the guest writes its layer out), forced after the bound."""
        try:
            stop_gracefully(driver, desktop_id, grace_s=self.shutdown_grace_s,
                            poll_s=SHUTDOWN_POLL_S)
        except VmNotFound:
            return  # deleted already (a crash's rerun)


def request_rebase(ctx: ServiceContext, desktop: uuid.UUID | str) -> tuple[uuid.UUID, str]:
    """Queue a rebase of a layered desktop onto its pool's version now (``ready ->
    recycling``, task ``rebase``); the reconciler carries it out at its next pass. Returns
    the desktop's id and name. ``Conflict`` when it is in use (it is rebased at its user's
    logoff), busy, already on the pool's version or has no user layer."""
    with ctx.uow() as uow:
        found = (uow.desktops.get(desktop) if isinstance(desktop, uuid.UUID)
                 else uow.desktops.get_by_name(desktop))
        pool = uow.pools.get(found.pool_id) if found.pool_id else None
        if pool is None or not rebases_layers(pool):
            raise Conflict(f"desktop {found.name!r} has no user layer to rebase: only a "
                           "stateful pool with user layers rebases its desktops")
        if found.template_version_id == pool.current_version_id:
            raise Conflict(f"desktop {found.name!r} already runs its pool's version "
                           f"{pool.current_version.number}")
        if found.state in HELD_STATES:
            raise Conflict(f"desktop {found.name!r} is in use by {found.assigned_user}: its "
                           "user layer is rebased when they log off")
        if found.state is not S.READY:
            raise Conflict(f"desktop {found.name!r} is {found.state.value}: only a ready "
                           "desktop can be rebased now")
        transition(uow.desktops, found.id, S.READY, S.RECYCLING, task=DesktopTask.REBASE)
        record_event(uow, "layer-rebase-requested",
                     f"user layer of {found.name} to be rebased from version "
                     f"{found.template_version.number} to {pool.current_version.number}",
                     pool=pool.name, desktop_id=found.id, desktop=found.name)
        uow.commit()
        return found.id, found.name
