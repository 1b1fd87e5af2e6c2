"""Hosts: register a hypervisor, list hosts, choose the domain type a host really runs."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.domain.models import DomainType, HostState
from deskpool.drivers.base import HypervisorDriver
from deskpool.drivers.registry import open_driver, release_driver
from deskpool.lifecycle.context import ServiceContext
from deskpool.lifecycle.views import HostView
from deskpool.store.db import UnitOfWork
from deskpool.store.models import Host

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def host_view(host: Host) -> HostView:
    return HostView(
        id=host.id, name=host.name, uri=host.uri, state=host.state.value,
        domain_type=host.domain_type_resolved or host.domain_type_requested.value,
        storage_dir=host.storage_dir,
    )


def resolved_domain_type(
    ctx: ServiceContext, host_id: uuid.UUID, driver: HypervisorDriver, kernel: Path | None
) -> DomainType:
    """The domain type a host runs guests with, probed once (``auto``) and then recorded."""
    with ctx.uow(read_only=True) as uow:
        host = uow.hosts.get(host_id)
        if host.domain_type_resolved:
            return DomainType(host.domain_type_resolved)
        requested = host.domain_type_requested
    resolved = driver.resolve_domain_type(requested, kernel)
    with ctx.uow() as uow:
        uow.hosts.get(host_id).domain_type_resolved = resolved.value
        uow.commit()
    return resolved


def place_desktop(uow: UnitOfWork, *, pinned: uuid.UUID | None, what: str) -> Host:
    """The host a new desktop goes to: the pinned one, else the enabled host with the fewest
    desktops (placement by capacity comes with the scheduler)."""
    if pinned is not None:
        return uow.hosts.get(pinned)
    enabled = [h for h in uow.hosts.list() if h.state is HostState.ENABLED]
    if not enabled:
        raise NotFound(f"{what} has no enabled host to go to: add one with 'deskpool host add'")
    counts = {h.id: len(uow.desktops.by_host(h.id)) for h in enabled}
    return min(enabled, key=lambda h: (counts[h.id], h.name))


class HostService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def add(
        self, name: str, uri: str, *, domain_type: DomainType = DomainType.AUTO,
        storage_dir: Path | None = None,
    ) -> HostView:
        """Register a host after proving its URI reaches a hypervisor (nothing is stored if not)."""
        if not _NAME_RE.match(name):
            raise InvalidInput(
                f"host name {name!r} must be 1-63 characters of a-z, 0-9, '.', '_' and '-'"
            )
        with self.ctx.uow() as uow:
            if uow.hosts.find_by_name(name) is not None:
                raise Conflict(f"a host named {name!r} already exists")
        driver = open_driver(uri, storage_dir=storage_dir)  # HypervisorUnreachable on a bad URI
        try:
            if domain_type is not DomainType.AUTO:
                driver.resolve_domain_type(domain_type, None)  # InvalidInput if not offered
            resolved_storage = driver.storage_dir or storage_dir
        finally:
            release_driver(driver)
        with self.ctx.uow() as uow:
            host = Host(
                name=name, uri=uri, state=HostState.ENABLED,
                domain_type_requested=domain_type,
                storage_dir=str(resolved_storage) if resolved_storage else None,
            )
            uow.hosts.add(host)
            uow.commit()
            return host_view(host)

    def list(self) -> list[HostView]:
        with self.ctx.uow() as uow:
            return [host_view(h) for h in uow.hosts.list()]
