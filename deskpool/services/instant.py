"""Instant clones: capture a booted template's memory on a host, and give each restored clone
its own identity through the guest agent.

Capture boots a throwaway VM of the template version (its identity is the template's own),
waits for its agent, and saves its memory and disk as the version's memory state on that host.
The VM carries deskpool metadata but no desktop row, so if capture is interrupted the
reconciler removes it as an orphan.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from deskpool.domain.errors import Conflict, DriverError, InvalidInput
from deskpool.domain.identity import DesktopIdentity, new_mac, new_machine_id
from deskpool.domain.models import (
    CloneMode,
    Customization,
    DomainType,
    VmMetadata,
    VmSpec,
)
from deskpool.drivers.agent import GuestAgent
from deskpool.drivers.base import HypervisorDriver
from deskpool.services.context import ServiceContext
from deskpool.services.factory import copy_version_to_host
from deskpool.services.hosts import resolved_domain_type
from deskpool.store.models import MemoryState, TemplateVersion


class InstantCloneService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def capture(self, template: str, *, host: str, version: int | None = None,
                timeout_s: float = 300.0) -> tuple[str, str]:
        """Boot the version on ``host`` and save its memory there. Returns the two volumes."""
        with self.ctx.uow(read_only=True) as uow:
            tmpl = uow.templates.get_by_name(template)
            tv = (uow.versions.get_by_number(tmpl.id, version) if version
                  else uow.versions.latest(tmpl.id))
            target = uow.hosts.get_by_name(host)
            if uow.memory_states.find(tv.id, target.id) is not None:
                raise Conflict(f"template {template!r} version {tv.number} already has a memory "
                               f"state on host {host!r}")
            if tv.customization is not Customization.FWCFG:
                raise InvalidInput(
                    f"instant clones need a template whose guest runs deskpool's identity hook "
                    f"(customization fwcfg); {template!r} uses {tv.customization.value}")
            driver = self.ctx.driver_for(target)
            version_id, host_id = tv.id, target.id
            domain_type = resolved_domain_type(
                self.ctx, host_id, driver, Path(tv.kernel_path) if tv.kernel_path else None)
            spec = self._template_spec(driver, tv, domain_type, template)
        driver.create_vm(spec)
        try:
            driver.start_vm(spec.vm_id)
            agent = GuestAgent(driver, spec.vm_id)
            agent.wait_until_ready(timeout_s)
            self._wait_settled(agent, timeout_s)
            disk_volume, memory_volume = driver.capture_memory_state(spec.vm_id)
        except BaseException:
            driver.delete_vm(spec.vm_id)
            raise
        with self.ctx.uow() as uow:
            uow.memory_states.add(MemoryState(version_id=version_id, host_id=host_id,
                                              disk_volume=disk_volume,
                                              memory_volume=memory_volume))
            uow.commit()
        return disk_volume, memory_volume

    def _template_spec(self, driver: HypervisorDriver, tv: TemplateVersion,
                       domain_type: DomainType, template: str) -> VmSpec:
        disk_vol, boot = copy_version_to_host(driver, tv)
        vm_id = uuid.uuid4()
        name = f"{template}-v{tv.number}-template"[:63]
        identity = DesktopIdentity(vm_id, name, new_mac(), new_machine_id())
        return VmSpec(
            vm_id=vm_id, name=f"{name}-{vm_id.hex[:6]}", base_volume=disk_vol,
            clone_mode=CloneMode.LINKED, mac=identity.mac,
            metadata=VmMetadata(vm_id, name, tv.id, self.ctx.installation_id), vcpus=tv.vcpus,
            memory_mib=tv.memory_mib, domain_type=domain_type, direct_boot=boot,
            identity_text=identity.to_guest_text(),
        )

    @staticmethod
    def _wait_settled(agent: GuestAgent, timeout_s: float) -> None:
        """Wait until the guest has finished booting: its agent starts before udev, and a
        memory state captured that early has no NIC driver loaded, so clones get no network."""
        _code, out, err = agent.exec_capture(["systemctl", "is-system-running", "--wait"],
                                            timeout_s=timeout_s)
        state = out.strip()
        if state not in ("running", "degraded"):
            raise DriverError(f"the template guest did not finish booting ({state or err})")

    def forget(self, template: str, *, host: str, version: int | None = None) -> None:
        """Remove a version's memory state from a host (its volumes and its record)."""
        with self.ctx.uow() as uow:
            tmpl = uow.templates.get_by_name(template)
            tv = (uow.versions.get_by_number(tmpl.id, version) if version
                  else uow.versions.latest(tmpl.id))
            target = uow.hosts.get_by_name(host)
            state = uow.memory_states.find(tv.id, target.id)
            if state is None:
                return
            driver = self.ctx.driver_for(target)
            driver.delete_volume(state.memory_volume)
            driver.delete_volume(state.disk_volume)
            uow.memory_states.delete(state)
            uow.commit()
