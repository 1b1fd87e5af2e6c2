"""Desktops as an administrator handles them one by one: create (through the factory), list,
show, delete, console address. Pool desktops are made by the reconciler with the same factory.
"""

from __future__ import annotations

import uuid

from deskpool.domain.errors import Conflict, InvalidInput
from deskpool.domain.identity import validate_hostname
from deskpool.domain.models import CloneMode, ConsoleAddress
from deskpool.domain.naming import first_free_number, render, validate_pattern
from deskpool.domain.states import DesktopState, DesktopTask, transition
from deskpool.services.context import ServiceContext
from deskpool.services.factory import DesktopFactory, Progress, no_progress
from deskpool.services.hosts import incompatibility
from deskpool.services.placement import Placer
from deskpool.services.views import DesktopView
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Desktop

DEFAULT_PATTERN = "desktop-{n:03}"


def desktop_view(d: Desktop) -> DesktopView:
    return DesktopView(
        id=d.id, name=d.name, hostname=d.hostname, mac=d.mac, machine_id=d.machine_id,
        state=d.state, power_state=d.power_state.value, host=d.host.name,
        template=d.template_version.template.name, version=d.template_version.number,
        clone_mode=d.clone_mode.value, last_error=d.last_error,
    )


class DesktopService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.factory = DesktopFactory(ctx)

    # --- create ----------------------------------------------------------------------------

    def create(
        self, template: str, *, version: int | None = None, host: str | None = None,
        name: str | None = None, pattern: str = DEFAULT_PATTERN,
        clone_mode: CloneMode = CloneMode.LINKED, wait_ready: bool = True,
        ready_timeout_s: float = 240.0, progress: Progress = no_progress,
    ) -> DesktopView:
        desktop_id = self._insert_row(template, version, host, name, pattern, clone_mode)
        try:
            self.factory.provision(desktop_id, progress)
        except BaseException:
            # Nothing usable was made: remove whatever was, and the row, so no half-made
            # desktop remains. (A crash here is finished by the reconciler from the row.)
            self.factory.discard(desktop_id)
            raise
        if wait_ready:
            self.factory.make_ready(desktop_id, timeout_s=ready_timeout_s, progress=progress)
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
            if host_name is not None:
                target_host = uow.hosts.get_by_name(host_name)
                reason = incompatibility(tv, target_host)
                if reason is not None:
                    raise InvalidInput(f"cannot make a desktop there: {reason}")
            else:
                target_host, _why = Placer(uow).place(tv, clone_mode, what="a new desktop")
            taken = uow.desktops.names()
            if name is None:
                name = render(pattern, first_free_number(pattern, taken))
            elif name in taken:
                raise Conflict(f"a desktop named {name!r} already exists")
            version_id, host_id = tv.id, target_host.id
        # A concurrent create of the same name loses at the unique constraint (Conflict).
        return self.factory.insert(name=name, version_id=version_id, host_id=host_id,
                                   clone_mode=clone_mode)

    def wait_ready(self, desktop_id: uuid.UUID, *, timeout_s: float = 240.0) -> None:
        self.factory.make_ready(desktop_id, timeout_s=timeout_s)

    def get(self, name_or_id: str) -> DesktopView:
        with self.ctx.uow() as uow:
            return desktop_view(self._find(uow, name_or_id))

    def list(self) -> list[DesktopView]:
        with self.ctx.uow() as uow:
            return [desktop_view(d) for d in uow.desktops.list()]

    @staticmethod
    def _find(uow: UnitOfWork, name_or_id: str) -> Desktop:
        return find_desktop(uow, name_or_id)

    def delete(self, name_or_id: str) -> None:
        """Remove the VM and its disks, then the row. A crash midway leaves the row in
        ``deleting`` (task ``delete``), which the reconciler finishes."""
        with self.ctx.uow() as uow:
            desktop = self._find(uow, name_or_id)
            desktop_id, state = desktop.id, DesktopState(desktop.state)
            if state is DesktopState.CHECKED_OUT:
                # The laptop holds the user's newest work: the check-out ends first.
                raise Conflict(f"desktop {desktop.name} is checked out to a laptop; check it "
                               "in, roll it back or force its check-in before deleting it")
            if state is not DesktopState.DELETING:
                transition(uow.desktops, desktop_id, state, DesktopState.DELETING,
                           task=DesktopTask.DELETE)
            uow.commit()
        self.factory.discard(desktop_id)

    def console(self, name_or_id: str) -> ConsoleAddress:
        with self.ctx.uow() as uow:
            desktop = self._find(uow, name_or_id)
            desktop_id, driver = desktop.id, self.ctx.driver_for(desktop.host)
        return driver.console_address(desktop_id)


def find_desktop(uow: UnitOfWork, name_or_id: str) -> Desktop:
    """A desktop by its id, or else by its name; ``NotFound`` naming it."""
    try:
        desktop_id = uuid.UUID(name_or_id)
    except ValueError:
        return uow.desktops.get_by_name(name_or_id)
    return uow.desktops.get(desktop_id)
