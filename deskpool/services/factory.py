"""The desktop factory: clone a template version, give the clone its identity, boot it,
confirm through the guest agent that the guest carries exactly the identity in the database,
let the template's customization finish (cloud-init, then the join hook, once per desktop: see
``deskpool.services.customize``) and (for pools that recycle by reverting) take the factory
snapshot before it is ready. The snapshot comes after the join hook, so a revert returns to
the joined desktop and never runs the hook again.

Each step is its own short transaction and the desktop row exists (``provisioning``) before
anything is made on a hypervisor, so a crash at any point leaves a row that says what to finish
or clean up. The reconciler drives these steps for pools; ``DesktopService`` for single desktops.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from deskpool.domain.errors import (
    AgentUnavailable,
    ChecksumMismatch,
    DeskpoolError,
    DriverError,
    HostConnectionLost,
    NotFound,
    TemplateUnusable,
)
from deskpool.domain.identity import GUEST_MARKER_PATH, DesktopIdentity, new_mac, new_machine_id
from deskpool.domain.models import (
    CloneMode,
    Customization,
    DirectBoot,
    DomainType,
    PowerState,
    VmMetadata,
    VmSpec,
)
from deskpool.domain.pools import OnLogout, RevertBy, resets_on_reboot
from deskpool.domain.states import DesktopState, DesktopTask, transition
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver, layer_volume_name
from deskpool.images.cloudinit import write_nocloud_seed
from deskpool.services import template_faults
from deskpool.services.context import ServiceContext
from deskpool.services.customize import (
    JoinContext,
    JoinHookFailed,
    already_joined,
    run_join_hook,
    wait_for_cloud_init,
)
from deskpool.services.events import record_event
from deskpool.services.host_slots import SlotKind, host_slot
from deskpool.services.hosts import resolved_domain_type
from deskpool.services.machine_secrets import MachineSecrets
from deskpool.services.user_layer_volumes import delete_layer_volume, ensure_layer_volume
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Desktop, Pool, TemplateVersion

Progress = Callable[[str], None]
FACTORY_SNAPSHOT = "factory"
# Where an instant clone's identity is written for the guest hook (tmpfs: gone at reboot).
INSTANT_IDENTITY_PATH = "/run/deskpool-identity"
# The kernel parameter telling a layered desktop's guest which template version its root is.
LAYER_VERSION_PARAM = "deskpool.layer_version"
GUEST_IDENTITY_HOOK = "/usr/lib/deskpool/deskpool-identity"


def no_progress(_step: str) -> None:
    pass


def apply_identity_through_agent(agent: GuestAgent, identity: DesktopIdentity,
                                 timeout_s: float = 60.0) -> None:
    """Hand a restored instant clone its identity: write it into the guest and run the boot
    hook on that file (the hook that reads fw_cfg at a cold boot)."""
    agent.write_file(INSTANT_IDENTITY_PATH, identity.to_guest_text().encode())
    code, _out, err = agent.exec_capture(
        [GUEST_IDENTITY_HOOK, INSTANT_IDENTITY_PATH, f"{time.time():.6f}"], timeout_s=timeout_s)
    if code != 0:
        raise DriverError(f"the guest's identity hook failed ({code}): {err.strip()}")


def version_volume_names(version: TemplateVersion) -> tuple[str, str, str]:
    """Names of a version's disk, kernel and initrd in a host's storage (one set per version)."""
    stem = f"tv-{version.id}"
    disk_ext = Path(version.image_path).suffix or ".qcow2"
    return f"{stem}{disk_ext}", f"{stem}.vmlinuz", f"{stem}.initrd"


def copy_version_to_host(
    driver: HypervisorDriver, tv: TemplateVersion
) -> tuple[str, DirectBoot | None]:
    """Import the version's disk (checksummed) and, for direct boot, kernel and initrd into the
    host's storage, once per host. Returns the disk volume and the boot settings."""
    disk_vol, kernel_vol, initrd_vol = version_volume_names(tv)
    driver.import_volume(disk_vol, Path(tv.image_path), tv.image_sha256)
    if not (tv.kernel_path and tv.initrd_path):
        return disk_vol, None
    driver.import_volume(kernel_vol, Path(tv.kernel_path))
    driver.import_volume(initrd_vol, Path(tv.initrd_path))
    return disk_vol, DirectBoot(kernel_vol, initrd_vol, tv.kernel_cmdline or "")


def _on_host(driver: HypervisorDriver, volume: str) -> bool:
    try:
        driver.volume_info(volume)
    except NotFound:
        return False
    return True


class DesktopFactory:
    def __init__(self, ctx: ServiceContext,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.ctx = ctx
        self.clock = clock  # when a template fault is recorded (see template_faults)

    @staticmethod
    def new_row(
        *, name: str, version_id: uuid.UUID, host_id: uuid.UUID, clone_mode: CloneMode,
        taken_macs: set[str], pool_id: uuid.UUID | None = None,
    ) -> Desktop:
        """A desktop row in ``provisioning`` with a fresh identity, for the caller to add.
        ``taken_macs`` are the MACs in use; the new one is added to it."""
        mac = new_mac(taken_macs)
        taken_macs.add(mac)
        return Desktop(
            id=uuid.uuid4(), name=name, hostname=name, mac=mac,
            machine_id=new_machine_id(), template_version_id=version_id,
            host_id=host_id, clone_mode=clone_mode, pool_id=pool_id,
            state=DesktopState.PROVISIONING, task=DesktopTask.CLONE,
        )

    def insert(
        self, *, name: str, version_id: uuid.UUID, host_id: uuid.UUID, clone_mode: CloneMode,
        pool_id: uuid.UUID | None = None,
    ) -> uuid.UUID:
        """Write the desktop's row, in ``provisioning``, with a fresh identity."""
        with self.ctx.uow() as uow:
            desktop = self.new_row(name=name, version_id=version_id, host_id=host_id,
                                   clone_mode=clone_mode, taken_macs=uow.desktops.macs(),
                                   pool_id=pool_id)
            uow.desktops.add(desktop)
            uow.commit()
            return desktop.id

    def driver_of(self, desktop_id: uuid.UUID) -> HypervisorDriver:
        with self.ctx.uow(read_only=True) as uow:
            return self.ctx.driver_for(uow.desktops.get(desktop_id).host)

    def provision(self, desktop_id: uuid.UUID, progress: Progress = no_progress) -> None:
        """Clone and define the VM, then boot it (``provisioning`` -> ``customizing``).

        Safe to call again for a row a crash left in ``provisioning``: whatever an earlier
        attempt made on the hypervisor is removed first and the clone is made afresh. A pool
        desktop whose template disk is missing or corrupt raises ``TemplateUnusable`` and
        leaves nothing, its row included (its pool is marked instead).
        """
        try:
            driver, made = self._create(desktop_id, progress)
        except TemplateUnusable as exc:
            self._unusable(desktop_id, exc)
            raise
        with self.ctx.uow() as uow:
            transition(uow.desktops, desktop_id, DesktopState.PROVISIONING,
                       DesktopState.CUSTOMIZING, task=DesktopTask.BOOT)
            template_faults.cleared_by_success(uow, *made)
            uow.commit()
        progress("booting")
        driver.start_vm(desktop_id)

    def _create(self, desktop_id: uuid.UUID, progress: Progress, *,
                version_id: uuid.UUID | None = None,
                layer_base_id: uuid.UUID | None = None) -> tuple[
            HypervisorDriver, tuple[uuid.UUID | None, uuid.UUID, str]]:
        """The VM defined on its host; returns its driver and the (pool, version, host name)
        it was made for. ``version_id``: made on that version instead of the desktop's own;
        ``layer_base_id``: with that version's root attached as its user layer's old base,
        for the boot that rebases the layer (``services.layer_rebase_boot``)."""
        # Work on the hypervisor inside a read-only unit of work: it reads a snapshot and takes
        # no write lock (SQLite in WAL mode), so a long image upload blocks no other writer.
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            host, tv = desktop.host, desktop.template_version
            if version_id is not None:
                tv = uow.versions.get(version_id)
            host_id = host.id
            driver = self.ctx.driver_for(host)
            progress(f"copying template {tv.template.name} v{tv.number} to host {host.name}")
            domain_type = resolved_domain_type(
                self.ctx, host_id, driver, Path(tv.kernel_path) if tv.kernel_path else None)
            driver.delete_vm(desktop_id)  # an interrupted earlier attempt's VM, if any
            reboot_ends_vm = _resets_on_reboot(uow, desktop)
            if desktop.clone_mode is CloneMode.INSTANT:
                state = uow.memory_states.find(tv.id, host.id)
                if state is None:
                    raise NotFound(f"template {tv.template.name!r} version {tv.number} has no "
                                   f"memory state on host {host.name!r} for instant clones")
                spec = VmSpec(
                    vm_id=desktop.id, name=desktop.name, base_volume=state.disk_volume,
                    clone_mode=CloneMode.INSTANT, mac=desktop.mac,
                    metadata=VmMetadata(desktop.id, desktop.name, tv.id,
                                        self.ctx.installation_id),
                    memory_state_volume=state.memory_volume, domain_type=domain_type,
                    reboot_ends_vm=reboot_ends_vm,
                )
            else:
                layer_mib = _user_layer_mib(uow, desktop)
                spec = replace(self._spec(driver, desktop, tv, domain_type,
                                          layered=layer_mib > 0),
                               reboot_ends_vm=reboot_ends_vm)
                if layer_mib:
                    spec = replace(spec, layer_volume=ensure_layer_volume(
                        driver, desktop.id, size_mib=layer_mib, version=tv.number))
                    if layer_base_id is not None:
                        old_root, _boot = self._copy(driver, desktop,
                                                     uow.versions.get(layer_base_id))
                        spec = replace(spec, layer_base_volume=old_root)
            made = (desktop.pool_id, tv.id, host.name)
            try:
                driver.create_vm(spec)
            finally:
                if spec.seed_image is not None:  # the driver copied it into the host's storage
                    shutil.rmtree(spec.seed_image.parent, ignore_errors=True)
        return driver, made

    def make_vm(self, desktop_id: uuid.UUID, *, version_id: uuid.UUID | None = None,
                layer_base_id: uuid.UUID | None = None) -> None:
        """The desktop's VM made anew, off (what ``_create`` makes), on ``version_id`` if
        given and with ``layer_base_id``'s root as its user layer's old base if given."""
        self._create(desktop_id, no_progress, version_id=version_id,
                     layer_base_id=layer_base_id)

    def spec_on(self, desktop_id: uuid.UUID, host_id: uuid.UUID) -> VmSpec:
        """The spec ``provision`` made the desktop's VM from, for host ``host_id``: the same
        identity over the same disk (an HA restart on a host sharing the storage; the
        template's version must be on that host, as it is on shared storage)."""
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            tv = desktop.template_version
            driver = self.ctx.driver_for(uow.hosts.get(host_id))
            domain_type = resolved_domain_type(
                self.ctx, host_id, driver, Path(tv.kernel_path) if tv.kernel_path else None)
            layered = _user_layer_mib(uow, desktop) > 0
            spec = self._spec(driver, desktop, tv, domain_type, layered=layered)
            layer = layer_volume_name(desktop.id) if layered else None
            return replace(spec, reboot_ends_vm=_resets_on_reboot(uow, desktop),
                           layer_volume=layer)

    def _unusable(self, desktop_id: uuid.UUID, exc: TemplateUnusable) -> None:
        """A pool desktop whose template disk cannot be used: nothing was made on the host
        (the import and the check come before ``create_vm``), so its row goes and its pool
        is marked (``template_faults``). A desktop outside a pool keeps its row (in error)."""
        with self.ctx.uow() as uow:
            if template_faults.mark_unusable(uow, desktop_id, exc, self.clock()):
                uow.commit()

    def _copy(self, driver: HypervisorDriver, desktop: Desktop,
              tv: TemplateVersion) -> tuple[str, DirectBoot | None]:
        """``copy_version_to_host``, a missing or corrupt disk told as ``TemplateUnusable``
        naming the template, the version and the host."""
        try:
            if _on_host(driver, version_volume_names(tv)[0]):
                return copy_version_to_host(driver, tv)  # there already: only checked
            # A host's transfer slots bound how many image copies reach it at once,
            # whichever broker sends them.
            with host_slot(self.ctx, desktop.host_id, SlotKind.TRANSFER,
                           desktop.host.transfer_slots):
                return copy_version_to_host(driver, tv)
        except (NotFound, ChecksumMismatch) as exc:
            raise TemplateUnusable(
                f"template {tv.template.name!r} version {tv.number} cannot be used on host "
                f"{desktop.host.name!r}: {exc}", version_id=tv.id, source=tv.image_path,
            ) from exc

    def _spec(
        self, driver: HypervisorDriver, desktop: Desktop, tv: TemplateVersion,
        domain_type: DomainType, *, layered: bool = False,
    ) -> VmSpec:
        """Copy the version's files to the host (once per host) and describe the VM."""
        disk_vol, boot = self._copy(driver, desktop, tv)
        cmdline, identity_text = boot_identity(desktop, tv, layered=layered)
        if boot is not None and cmdline is not None:
            boot = replace(boot, cmdline=cmdline)
        seed = None
        if tv.customization is Customization.CLOUD_INIT:
            seed = write_nocloud_seed(
                Path(tempfile.mkdtemp(prefix="deskpool-seed-")) / "seed.img",
                instance_id=str(desktop.id), hostname=desktop.hostname,
                machine_id=desktop.machine_id, user_data=tv.user_data,
            )
        return VmSpec(
            vm_id=desktop.id, name=desktop.name, base_volume=disk_vol,
            clone_mode=desktop.clone_mode, mac=desktop.mac,
            metadata=VmMetadata(desktop.id, desktop.name, tv.id, self.ctx.installation_id),
            vcpus=tv.vcpus, memory_mib=tv.memory_mib, domain_type=domain_type,
            direct_boot=boot, identity_text=identity_text, seed_image=seed,
        )

    def make_ready(
        self, desktop_id: uuid.UUID, *, timeout_s: float = 240.0,
        progress: Progress = no_progress,
    ) -> None:
        """Boot if needed, confirm the guest's identity through its agent, wait for cloud-init
        and run the join hook (once per desktop), take the factory snapshot when the desktop's
        pool recycles by reverting, and mark it ready.

        On a timeout, a mismatch or a failed customization the desktop goes to ``error`` with
        the reason recorded (a failed join hook also as an error event with its output's end),
        and the error is raised. A lost connection to the host (``HostConnectionLost``) is
        raised with the desktop left in ``customizing``, for a later call to carry on.
        """
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            pool = uow.pools.get(desktop.pool_id) if desktop.pool_id else None
            # A pool that reverts by booting afresh needs no snapshot (RevertBy.BOOT).
            wants_snapshot = (pool is not None and pool.on_logout is OnLogout.RECYCLE_REVERT
                              and pool.revert_by == RevertBy.SNAPSHOT)
            driver = self.ctx.driver_for(desktop.host)
            join, hook = _join_of(desktop, pool)
        try:
            joined = self._boot_and_join(driver, desktop_id, timeout_s, progress, join, hook)
            if wants_snapshot:
                progress("taking the factory snapshot")
                driver.delete_snapshot(desktop_id, FACTORY_SNAPSHOT)  # an interrupted try's
                driver.create_snapshot(desktop_id, FACTORY_SNAPSHOT)
        except HostConnectionLost:
            raise  # not the desktop's failure: it stays customizing, tried again from its row
        except DeskpoolError as exc:
            with self.ctx.uow() as uow:
                transition(uow.desktops, desktop_id, DesktopState.CUSTOMIZING,
                           DesktopState.ERROR, last_error=str(exc))
                if isinstance(exc, JoinHookFailed):
                    record_event(uow, "join-hook-failed", str(exc), severity="error",
                                 pool=join.pool, desktop_id=desktop_id,
                                 desktop=join.desktop_name)
                uow.commit()
            raise
        with self.ctx.uow() as uow:
            transition(uow.desktops, desktop_id, DesktopState.CUSTOMIZING, DesktopState.READY)
            if joined is not None:
                seconds, output = joined
                record_event(uow, "join-hook-ran",
                             f"the join hook of template {join.template} v"
                             f"{join.template_version} ran on {join.desktop_name} in "
                             f"{seconds:.1f} s" + (f": {output}" if output else ""),
                             pool=join.pool, desktop_id=desktop_id, desktop=join.desktop_name)
            desktop = uow.desktops.get(desktop_id)
            desktop.identity_confirmed_at = datetime.now(UTC)
            desktop.power_state = PowerState.RUNNING
            desktop.has_factory_snapshot = wants_snapshot
            desktop.retry_count, desktop.next_attempt_at = 0, None
            uow.commit()

    def _boot_and_join(self, driver: HypervisorDriver, desktop_id: uuid.UUID,
                       timeout_s: float, progress: Progress, join: JoinContext,
                       hook: str | None) -> tuple[float, str] | None:
        """Boot if needed, confirm identity (and machine secrets), wait for cloud-init, run
        the join hook unless the guest is joined already: the join's (seconds, output)."""
        driver.start_vm(desktop_id)  # off after a crash or a power-off: boot it
        self.confirm_running(desktop_id, timeout_s=timeout_s, progress=progress)
        joined = None
        cloud_init = join.customization is Customization.CLOUD_INIT
        if cloud_init or hook:
            agent = GuestAgent(driver, desktop_id)
            if cloud_init:
                progress("waiting for cloud-init to finish")
                wait_for_cloud_init(agent, join.desktop_name)
            if hook and not already_joined(agent, join):
                progress("running the template's join hook")
                joined = run_join_hook(agent, hook, join)
        return joined

    def revert_by_boot(self, desktop_id: uuid.UUID, *, timeout_s: float) -> None:
        """Revert a desktop of a pool that reverts by booting (``RevertBy.BOOT``): its VM
        and volumes made anew from its row (a fresh overlay on the master), booted, its
        identity and machine secrets confirmed, cloud-init and the join hook run as for a new
        desktop. Its state is the caller's. Safe to run again after a crash at any point."""
        driver, _made = self._create(desktop_id, no_progress)
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            pool = uow.pools.get(desktop.pool_id) if desktop.pool_id else None
            join, hook = _join_of(desktop, pool)
        self._boot_and_join(driver, desktop_id, timeout_s, no_progress, join, hook)

    def confirm_running(
        self, desktop_id: uuid.UUID, *, timeout_s: float, progress: Progress = no_progress,
    ) -> None:
        """Wait for the guest agent, check the guest carries the database's identity, and
        put its machine secrets (SSH host key, credentials) in place: at every boot the
        broker sees, so a stateless desktop's come back with it."""
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            expected = DesktopIdentity(desktop.id, desktop.hostname, desktop.mac,
                                       desktop.machine_id)
            customization = desktop.template_version.customization
            instant = desktop.clone_mode is CloneMode.INSTANT
            driver = self.ctx.driver_for(desktop.host)
            name = desktop.name
        if customization is Customization.NONE:
            # An image without deskpool's hook or an agent: running is all we can check.
            if driver.get_vm(desktop_id).power_state is not PowerState.RUNNING:
                raise DriverError(f"desktop {expected.hostname} is not running")
            return
        agent = GuestAgent(driver, desktop_id)
        progress("waiting for the guest agent")
        deadline = time.monotonic() + timeout_s
        agent.wait_until_ready(timeout_s)
        if not instant:
            with contextlib.suppress(DriverError):
                # After a revert or a resume the guest's clock stood still meanwhile.
                agent.set_time()
        else:
            progress("giving the instant clone its identity and the time")
            apply_identity_through_agent(agent, expected)
        progress("confirming identity inside the guest")
        self._confirm_identity(agent, expected, customization, deadline)
        progress("putting the desktop's SSH host key and machine credentials in place")
        MachineSecrets(self.ctx).install(agent, name, expected.hostname)

    @staticmethod
    def _confirm_identity(
        agent: GuestAgent, expected: DesktopIdentity, customization: Customization,
        deadline: float,
    ) -> None:
        while True:
            try:
                if customization is Customization.FWCFG:
                    marker = agent.read_file(GUEST_MARKER_PATH).decode()
                    applied = DesktopIdentity.from_guest_text(marker)
                    if applied != expected:
                        raise DriverError(
                            f"guest applied identity {applied.hostname}/{applied.machine_id}, "
                            f"expected {expected.hostname}/{expected.machine_id}"
                        )
                hostname = agent.host_name()
                machine_id = agent.read_file("/etc/machine-id").decode().strip()
                # The agent starts before udev: ready also means the NIC is there.
                macs = set(agent.interfaces().values())
                if (hostname, machine_id) == (expected.hostname, expected.machine_id) and (
                        expected.mac in macs):
                    return
                problem = (f"guest reports hostname {hostname!r}, machine-id {machine_id!r} "
                           f"and MACs {sorted(macs)}; expected {expected.hostname!r}, "
                           f"{expected.machine_id!r} and {expected.mac}")
            except (AgentUnavailable, DriverError) as exc:
                problem = str(exc)  # marker not written yet, or the agent restarted
            if time.monotonic() > deadline:
                raise AgentUnavailable(f"identity not confirmed in time: {problem}")
            time.sleep(0.1)  # each poll is a few agent calls; the guest is usually nearly there

    def rebase(self, desktop_id: uuid.UUID, *, timeout_s: float) -> bool:
        """Rebase a layered desktop's user layer onto its pool's current version (see
        ``services.layer_rebase_boot``); whether it now runs that version."""
        from deskpool.services.layer_rebase_boot import LayerRebaseBoot

        return LayerRebaseBoot(self.ctx, self).rebase(desktop_id, timeout_s=timeout_s)

    def discard(self, desktop_id: uuid.UUID) -> None:
        with self.ctx.uow() as uow:
            try:
                driver = self.ctx.driver_for(uow.desktops.get(desktop_id).host)
            except NotFound:
                return
        driver.delete_vm(desktop_id)  # idempotent: removes the domain and every owned disk
        # The desktop itself goes (retired by its pool's policy or deleted by an admin): its
        # user layer with it. No VM re-create ever removes it.
        delete_layer_volume(driver, desktop_id)
        with self.ctx.uow() as uow:
            uow.desktops.delete(uow.desktops.get(desktop_id))
            uow.commit()


def _join_of(desktop: Desktop, pool: Pool | None) -> tuple[JoinContext, str | None]:
    """What the template's join hook is told, and the hook (none for an image without
    deskpool's customization)."""
    tv = desktop.template_version
    join = JoinContext(
        desktop_id=desktop.id, desktop_name=desktop.name, hostname=desktop.hostname,
        mac=desktop.mac, machine_id=desktop.machine_id,
        pool=pool.name if pool is not None else None, template=tv.template.name,
        template_version=tv.number, customization=tv.customization)
    return join, (tv.join_hook if tv.customization is not Customization.NONE else None)


def _user_layer_mib(uow: UnitOfWork, desktop: Desktop) -> int:
    pool = uow.pools.find(desktop.pool_id) if desktop.pool_id else None
    return pool.user_layer_mib if pool is not None else 0


def _resets_on_reboot(uow: UnitOfWork, desktop: Desktop) -> bool:
    """Whether the desktop's VM is made so that a reboot inside ends it (stateless pools)."""
    pool = uow.pools.find(desktop.pool_id) if desktop.pool_id else None
    return pool is not None and resets_on_reboot(pool.kind, pool.on_logout)


def layered_desktop(uow: UnitOfWork, desktop: Desktop) -> bool:
    """Whether the desktop has a user layer disk (its pool's ``user_layer_mib``)."""
    return _user_layer_mib(uow, desktop) > 0


def boot_identity(desktop: Desktop, tv: TemplateVersion, *,
                  layered: bool = False) -> tuple[str | None, str | None]:
    """The kernel command line (for a template booted by direct kernel boot) and the fw_cfg
    identity text the desktop's VM boots with: the same on every host, and on a laptop that
    runs it offline. None for what the template does not use. A ``layered`` desktop's
    command line names the version its root is (``LAYER_VERSION_PARAM``): the guest boots
    its user layer only on that version, rebasing it first when given the old base."""
    cmdline = None
    if tv.kernel_path:
        cmdline = tv.kernel_cmdline or ""
        if tv.customization is Customization.FWCFG:
            # systemd adopts the id from PID 1's start, before any unit runs.
            cmdline = f"{cmdline} systemd.machine_id={desktop.machine_id}".strip()
        if layered:
            cmdline = f"{cmdline} {LAYER_VERSION_PARAM}={tv.number}".strip()
    if tv.customization is not Customization.FWCFG:
        return cmdline, None
    identity = DesktopIdentity(desktop.id, desktop.hostname, desktop.mac, desktop.machine_id)
    return cmdline, identity.to_guest_text()
