"""The desktop factory: clone a template version, give the clone its identity, boot it, and
confirm through the guest agent that the guest carries exactly the identity in the database.

Each step is its own short transaction, and the desktop row exists (``provisioning``) before
anything is made on the hypervisor, so a crash at any point leaves a row that names what to clean
up. Bad input is refused before the row is written.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from deskpool.domain.errors import (
    AgentUnavailable,
    Conflict,
    DeskpoolError,
    DriverError,
    NotFound,
)
from deskpool.domain.identity import (
    GUEST_MARKER_PATH,
    DesktopIdentity,
    new_mac,
    new_machine_id,
    validate_hostname,
)
from deskpool.domain.models import (
    CloneMode,
    ConsoleAddress,
    Customization,
    DirectBoot,
    DomainType,
    HostState,
    PowerState,
    VmMetadata,
    VmSpec,
)
from deskpool.domain.naming import first_free_number, render, validate_pattern
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver
from deskpool.images.cloudinit import write_nocloud_seed
from deskpool.lifecycle.context import ServiceContext
from deskpool.lifecycle.states import DesktopState, transition
from deskpool.lifecycle.views import DesktopView
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Desktop, Host, TemplateVersion

Progress = Callable[[str], None]
DEFAULT_PATTERN = "desktop-{n:03}"


def _no_progress(_step: str) -> None:
    pass


def desktop_view(d: Desktop) -> DesktopView:
    return DesktopView(
        id=d.id, name=d.name, hostname=d.hostname, mac=d.mac, machine_id=d.machine_id,
        state=d.state, power_state=d.power_state.value, host=d.host.name,
        template=d.template_version.template.name, version=d.template_version.number,
        clone_mode=d.clone_mode.value, last_error=d.last_error,
    )


def version_volume_names(version: TemplateVersion) -> tuple[str, str, str]:
    """Names of a version's disk, kernel and initrd in a host's storage (one set per version)."""
    stem = f"tv-{version.id}"
    disk_ext = Path(version.image_path).suffix or ".qcow2"
    return f"{stem}{disk_ext}", f"{stem}.vmlinuz", f"{stem}.initrd"


class DesktopService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    # --- create ----------------------------------------------------------------------------

    def create(
        self, template: str, *, version: int | None = None, host: str | None = None,
        name: str | None = None, pattern: str = DEFAULT_PATTERN,
        clone_mode: CloneMode = CloneMode.LINKED, wait_ready: bool = True,
        ready_timeout_s: float = 240.0, progress: Progress = _no_progress,
    ) -> DesktopView:
        desktop_id = self._insert_row(template, version, host, name, pattern, clone_mode)
        try:
            self._provision(desktop_id, progress)
        except BaseException:
            # Nothing usable was made: remove whatever was, and the row, so no half-made
            # desktop remains. (A crash here is finished by the reconciler from the row.)
            self._discard(desktop_id)
            raise
        if wait_ready:
            self.wait_ready(desktop_id, timeout_s=ready_timeout_s, progress=progress)
        return self.get(str(desktop_id))

    def _insert_row(
        self, template: str, version: int | None, host_name: str | None, name: str | None,
        pattern: str, clone_mode: CloneMode,
    ) -> uuid.UUID:
        if name is not None:
            validate_hostname(name)
        else:
            validate_pattern(pattern)
        with self.ctx.uow() as uow:
            tmpl = uow.templates.get_by_name(template)
            tv = (uow.versions.get_by_number(tmpl.id, version) if version is not None
                  else uow.versions.latest(tmpl.id))
            target_host = self._pick_host(uow, host_name)
            taken = uow.desktops.names()
            if name is None:
                name = render(pattern, first_free_number(pattern, taken))
            elif name in taken:
                raise Conflict(f"a desktop named {name!r} already exists")
            desktop = Desktop(
                id=uuid.uuid4(), name=name, hostname=name, mac=new_mac(),
                machine_id=new_machine_id(), template_version_id=tv.id,
                host_id=target_host.id, clone_mode=clone_mode,
                state=DesktopState.PROVISIONING.value, desired_state=DesktopState.READY.value,
                task="clone",
            )
            uow.desktops.add(desktop)
            uow.commit()
            return desktop.id

    @staticmethod
    def _pick_host(uow: UnitOfWork, host_name: str | None) -> Host:
        if host_name is not None:
            return uow.hosts.get_by_name(host_name)
        enabled = [h for h in uow.hosts.list() if h.state is HostState.ENABLED]
        if not enabled:
            raise NotFound("no enabled host is registered: add one with 'deskpool host add'")
        # Placement proper comes with the scheduler; until then the emptiest enabled host.
        counts = {h.id: len(uow.desktops.by_host(h.id)) for h in enabled}
        return min(enabled, key=lambda h: (counts[h.id], h.name))

    def _provision(self, desktop_id: uuid.UUID, progress: Progress) -> None:
        # Work on the hypervisor inside a read-only unit of work: it reads a snapshot and takes
        # no write lock (SQLite in WAL mode), so a long image upload blocks no other writer.
        with self.ctx.uow(read_only=True) as uow:
            desktop = uow.desktops.get(desktop_id)
            host, tv = desktop.host, desktop.template_version
            host_id, resolved_before = host.id, host.domain_type_resolved
            driver = self.ctx.driver_for(host)
            progress(f"copying template {tv.template.name} v{tv.number} to host {host.name}")
            domain_type = self._domain_type(host, driver, tv)
            spec = self._spec(driver, desktop, tv, domain_type)
            try:
                driver.create_vm(spec)
            finally:
                if spec.seed_image is not None:  # the driver copied it into the host's storage
                    shutil.rmtree(spec.seed_image.parent, ignore_errors=True)
        with self.ctx.uow() as uow:
            if not resolved_before:
                uow.hosts.get(host_id).domain_type_resolved = domain_type.value
            transition(uow.desktops, desktop_id, DesktopState.PROVISIONING,
                       DesktopState.CUSTOMIZING, task="boot")
            uow.commit()
        progress("booting")
        driver.start_vm(desktop_id)

    @staticmethod
    def _spec(
        driver: HypervisorDriver, desktop: Desktop, tv: TemplateVersion, domain_type: DomainType
    ) -> VmSpec:
        """Copy the version's files to the host (once per host) and describe the VM."""
        disk_vol, kernel_vol, initrd_vol = version_volume_names(tv)
        driver.import_volume(disk_vol, Path(tv.image_path), tv.image_sha256)
        boot = None
        if tv.kernel_path and tv.initrd_path:
            driver.import_volume(kernel_vol, Path(tv.kernel_path))
            driver.import_volume(initrd_vol, Path(tv.initrd_path))
            cmdline = tv.kernel_cmdline or ""
            if tv.customization is Customization.FWCFG:
                # systemd adopts the id from PID 1's start, before any unit runs.
                cmdline = f"{cmdline} systemd.machine_id={desktop.machine_id}".strip()
            boot = DirectBoot(kernel_vol, initrd_vol, cmdline)
        identity = DesktopIdentity(desktop.id, desktop.hostname, desktop.mac, desktop.machine_id)
        seed = None
        if tv.customization is Customization.CLOUD_INIT:
            seed = write_nocloud_seed(
                Path(tempfile.mkdtemp(prefix="deskpool-seed-")) / "seed.img",
                instance_id=str(desktop.id), hostname=desktop.hostname,
                machine_id=desktop.machine_id,
            )
        return VmSpec(
            vm_id=desktop.id, name=desktop.name, base_volume=disk_vol,
            clone_mode=desktop.clone_mode, mac=desktop.mac,
            metadata=VmMetadata(desktop.id, desktop.name, tv.id),
            vcpus=tv.vcpus, memory_mib=tv.memory_mib, domain_type=domain_type,
            direct_boot=boot,
            identity_text=(identity.to_guest_text()
                           if tv.customization is Customization.FWCFG else None),
            seed_image=seed,
        )

    def _domain_type(
        self, host: Host, driver: HypervisorDriver, tv: TemplateVersion
    ) -> DomainType:
        if host.domain_type_resolved:
            return DomainType(host.domain_type_resolved)
        kernel = Path(tv.kernel_path) if tv.kernel_path else None
        return driver.resolve_domain_type(host.domain_type_requested, kernel)

    # --- readiness -------------------------------------------------------------------------

    def wait_ready(
        self, desktop_id: uuid.UUID, *, timeout_s: float = 240.0,
        progress: Progress = _no_progress,
    ) -> None:
        """Wait for the guest agent, confirm the guest's identity, and mark the desktop ready.

        On a timeout or a mismatch the desktop goes to ``error`` with the reason recorded, and
        the error is raised.
        """
        with self.ctx.uow() as uow:
            desktop = uow.desktops.get(desktop_id)
            expected = DesktopIdentity(desktop.id, desktop.hostname, desktop.mac,
                                       desktop.machine_id)
            customization = desktop.template_version.customization
            driver = self.ctx.driver_for(desktop.host)
        agent = GuestAgent(driver, desktop_id)
        try:
            progress("waiting for the guest agent")
            deadline = time.monotonic() + timeout_s
            agent.wait_until_ready(timeout_s)
            progress("confirming identity inside the guest")
            self._confirm_identity(agent, expected, customization, deadline)
        except DeskpoolError as exc:
            with self.ctx.uow() as uow:
                transition(uow.desktops, desktop_id, DesktopState.CUSTOMIZING,
                           DesktopState.ERROR, last_error=str(exc))
                uow.commit()
            raise
        with self.ctx.uow() as uow:
            transition(uow.desktops, desktop_id, DesktopState.CUSTOMIZING, DesktopState.READY)
            desktop = uow.desktops.get(desktop_id)
            desktop.identity_confirmed_at = datetime.now(UTC)
            desktop.power_state = PowerState.RUNNING
            uow.commit()

    @staticmethod
    def _confirm_identity(
        agent: GuestAgent, expected: DesktopIdentity, customization: Customization,
        deadline: float,
    ) -> None:
        if customization is Customization.NONE:
            return
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
                if hostname == expected.hostname and machine_id == expected.machine_id:
                    return
                problem = (f"guest reports hostname {hostname!r} and machine-id "
                           f"{machine_id!r}, expected {expected.hostname!r} and "
                           f"{expected.machine_id!r}")
            except (AgentUnavailable, DriverError) as exc:
                problem = str(exc)  # marker not written yet, or the agent restarted
            if time.monotonic() > deadline:
                raise AgentUnavailable(f"identity not confirmed in time: {problem}")
            time.sleep(0.5)

    # --- read / delete ---------------------------------------------------------------------

    def get(self, name_or_id: str) -> DesktopView:
        with self.ctx.uow() as uow:
            return desktop_view(self._find(uow, name_or_id))

    def list(self) -> list[DesktopView]:
        with self.ctx.uow() as uow:
            return [desktop_view(d) for d in uow.desktops.list()]

    @staticmethod
    def _find(uow: UnitOfWork, name_or_id: str) -> Desktop:
        try:
            desktop_id = uuid.UUID(name_or_id)
        except ValueError:
            return uow.desktops.get_by_name(name_or_id)
        return uow.desktops.get(desktop_id)

    def delete(self, name_or_id: str) -> None:
        """Remove the VM and its disks, then the row. A crash midway leaves the row in
        ``deleting`` with ``desired_state`` deleted, which the reconciler finishes."""
        with self.ctx.uow() as uow:
            desktop = self._find(uow, name_or_id)
            desktop_id, state = desktop.id, DesktopState(desktop.state)
            if state is not DesktopState.DELETING:
                transition(uow.desktops, desktop_id, state, DesktopState.DELETING,
                           task="delete")
            uow.commit()
        self._discard(desktop_id)

    def _discard(self, desktop_id: uuid.UUID) -> None:
        with self.ctx.uow() as uow:
            try:
                driver = self.ctx.driver_for(uow.desktops.get(desktop_id).host)
            except NotFound:
                return
        driver.delete_vm(desktop_id)  # idempotent: removes the domain and every owned disk
        with self.ctx.uow() as uow:
            uow.desktops.delete(uow.desktops.get(desktop_id))
            uow.commit()

    def console(self, name_or_id: str) -> ConsoleAddress:
        with self.ctx.uow() as uow:
            desktop = self._find(uow, name_or_id)
            desktop_id, driver = desktop.id, self.ctx.driver_for(desktop.host)
        return driver.console_address(desktop_id)
