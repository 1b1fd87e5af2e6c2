"""Hosts: register a hypervisor with its limits, read its capacity, choose the domain type it
really runs, and move it through drain and maintenance.

States: ``enabled`` takes new desktops and sessions; ``draining`` takes none, its free
desktops are replaced elsewhere and its users are logged off at the deadline; ``maintenance``
is empty of sessions and may be worked on; ``down`` stopped answering (the reconciler decides
that, after a grace period). ``enable`` brings a host back.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from deskpool.domain.errors import Conflict, InvalidInput, NotFound
from deskpool.domain.models import DomainType, HostCapacity, HostState
from deskpool.domain.states import NOT_LIVE_STATES, DesktopState
from deskpool.drivers.base import HypervisorDriver
from deskpool.drivers.registry import open_driver, release_driver
from deskpool.services.audit import Actor, changed, record_audit
from deskpool.services.context import ServiceContext
from deskpool.services.views import HostSetView, HostView
from deskpool.store.models import Host, TemplateVersion, utcnow

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# Desktops that occupy a host's capacity: every state but the ones leaving or gone.
LIVE_STATES = tuple(sorted(s.value for s in DesktopState if s.value not in NOT_LIVE_STATES))


@dataclass(frozen=True)
class HostLimits:
    cpu_overcommit: float = 4.0
    memory_overcommit: float = 1.0
    max_desktops: int | None = None
    max_provisioning: int = 2
    transfer_slots: int = 2

    def validate(self, host: str) -> HostLimits:
        # NaN passes every comparison: a NaN ratio would make the host's capacity
        # meaningless to placement, so finiteness is checked first.
        for label, ratio in (("cpu_overcommit", self.cpu_overcommit),
                             ("memory_overcommit", self.memory_overcommit)):
            if not (math.isfinite(ratio) and 0 < ratio <= 1000):
                raise InvalidInput(f"host {host!r}: {label} ({ratio}) must be a ratio above 0 "
                                   "and at most 1000")
        if self.max_desktops is not None and not 0 <= self.max_desktops <= 100_000:
            raise InvalidInput(f"host {host!r}: max_desktops ({self.max_desktops}) must be "
                               "from 0 to 100000")
        for label, slots in (("max_provisioning", self.max_provisioning),
                             ("transfer_slots", self.transfer_slots)):
            if not 1 <= slots <= 1000:
                raise InvalidInput(f"host {host!r}: {label} ({slots}) must be from 1 to 1000")
        return self


def check_set_name(name: str) -> str:
    """A host set's name, or ``InvalidInput`` saying what one may be."""
    if not _NAME_RE.match(name):
        raise InvalidInput(f"host set name {name!r} must be 1-63 characters of a-z, 0-9, '.', "
                           "'_' and '-', starting with a letter or digit")
    return name


def host_view(host: Host, desktops: int = 0, balanced_sets: frozenset[str] = frozenset(),
              ) -> HostView:
    return HostView(
        id=host.id, name=host.name, uri=host.uri, state=host.state.value,
        domain_type=host.domain_type_resolved or host.domain_type_requested.value,
        storage_dir=host.storage_dir, hypervisor=host.hypervisor, arch=host.arch,
        cpu_model=host.cpu_model, vcpus=host.vcpus, memory_mib=host.memory_mib,
        storage_free_bytes=host.storage_free_bytes, cpu_overcommit=host.cpu_overcommit,
        memory_overcommit=host.memory_overcommit, max_desktops=host.max_desktops,
        max_provisioning=host.max_provisioning, transfer_slots=host.transfer_slots,
        desktops=desktops, last_seen_at=host.last_seen_at, last_error=host.last_error,
        drain_deadline=host.drain_deadline, shared_storage=host.shared_storage,
        host_set=host.host_set, set_balances=host.host_set in balanced_sets,
    )


def record_capacity(host: Host, capacity: HostCapacity) -> None:
    host.hypervisor, host.arch, host.cpu_model = (capacity.hypervisor, capacity.arch,
                                                  capacity.cpu_model)
    host.vcpus, host.memory_mib = capacity.vcpus, capacity.memory_mib
    host.storage_free_bytes = capacity.storage_free_bytes
    host.domain_types = ",".join(capacity.domain_types)
    host.capacity_at = host.last_seen_at = utcnow()


def incompatibility(version: TemplateVersion, host: Host) -> str | None:
    """Why ``host`` cannot run ``version``, or None when it can."""
    wanted = {t.strip().upper() for t in version.runs_on.split(",") if t.strip()}
    if wanted and host.hypervisor.upper() not in wanted:
        return (f"host {host.name!r} is a {host.hypervisor or 'unknown'} hypervisor; the "
                f"template runs on {', '.join(sorted(wanted))}")
    if version.arch and host.arch and version.arch != host.arch:
        return f"host {host.name!r} is {host.arch}; the template is {version.arch}"
    return None


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


class HostService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def add(
        self, name: str, uri: str, *, domain_type: DomainType = DomainType.AUTO,
        storage_dir: Path | None = None, limits: HostLimits | None = None,
        shared_storage: str | None = None, host_set: str | None = None,
        actor: Actor | None = None,
    ) -> HostView:
        """Register a host after proving its URI reaches a hypervisor and reading its
        capacity (nothing is stored if not). ``shared_storage`` names the shared storage
        its storage directory is on (see ``set_shared_storage``)."""
        if not _NAME_RE.match(name):
            raise InvalidInput(
                f"host name {name!r} must be 1-63 characters of a-z, 0-9, '.', '_' and '-'"
            )
        limits = (limits or HostLimits()).validate(name)
        shared_storage = _shared_storage_name(name, shared_storage)
        if host_set is not None:
            check_set_name(host_set)
        with self.ctx.uow() as uow:
            if uow.hosts.find_by_name(name) is not None:
                raise Conflict(f"a host named {name!r} already exists")
        driver = open_driver(uri, storage_dir=storage_dir)  # HypervisorUnreachable on a bad URI
        try:
            if domain_type is not DomainType.AUTO:
                driver.resolve_domain_type(domain_type, None)  # InvalidInput if not offered
            capacity = driver.capacity()
            resolved_storage = driver.storage_dir or storage_dir
        finally:
            release_driver(driver)
        with self.ctx.uow() as uow:
            host = Host(
                name=name, uri=uri, state=HostState.ENABLED,
                domain_type_requested=domain_type,
                storage_dir=str(resolved_storage) if resolved_storage else None,
                cpu_overcommit=limits.cpu_overcommit,
                memory_overcommit=limits.memory_overcommit, max_desktops=limits.max_desktops,
                max_provisioning=limits.max_provisioning, transfer_slots=limits.transfer_slots,
                shared_storage=shared_storage, host_set=host_set,
            )
            record_capacity(host, capacity)
            uow.hosts.add(host)
            record_audit(uow, actor, "host.add", f"host/{name}", f"added host {name}",
                         new=_settings(host))
            uow.commit()
            return host_view(host, balanced_sets=frozenset(uow.host_sets.balanced()))

    def set_host_set(self, name: str, host_set: str | None, *,
                     actor: Actor | None = None) -> HostView:
        """Put a host in a set (None: the default set). Its running desktops stay where
        they are; from now on balancing moves them only within the new set."""
        if host_set is not None:
            check_set_name(host_set)
        with self.ctx.uow() as uow:
            host = uow.hosts.get_by_name(name)
            if host.host_set != host_set:
                record_audit(uow, actor, "host.set", f"host/{name}",
                             f"put host {name} in host set {host_set or '(default)'}",
                             old={"host_set": host.host_set}, new={"host_set": host_set})
                old, host.host_set = host.host_set, host_set
                if old is not None:
                    uow.host_sets.forget_if_empty(old)
            uow.commit()
        return self.get(name)

    def set_balance(self, host_set: str, balance: bool, *,
                    actor: Actor | None = None) -> HostSetView:
        """Switch a host set's load balancing: on, the balancer may move any running
        desktop on its hosts (within the set), whatever the desktop's pool says.
        ``NotFound`` when no host is in that set."""
        check_set_name(host_set)
        with self.ctx.uow() as uow:
            if host_set not in uow.host_sets.names():
                known = ", ".join(sorted(uow.host_sets.names())) or "none"
                raise NotFound(f"host set {host_set!r} has no hosts (host sets: {known}); "
                               "put a host in it first (host update --set)")
            before = uow.host_sets.set_balance(host_set, balance)
            if before != balance:
                record_audit(uow, actor, "host-set.balance", f"host-set/{host_set}",
                             f"turned balancing {'on' if balance else 'off'} for host set "
                             f"{host_set}", old={"balance": before}, new={"balance": balance})
            uow.commit()
        return next(s for s in self.sets() if s.name == host_set)

    def sets(self) -> list[HostSetView]:
        """Every host set some host is in, by name, with its switch and hosts."""
        with self.ctx.uow(read_only=True) as uow:
            balanced = uow.host_sets.balanced()
            members: dict[str, list[str]] = {}
            for h in uow.hosts.list():
                if h.host_set is not None:
                    members.setdefault(h.host_set, []).append(h.name)
        return [HostSetView(name, name in balanced, tuple(sorted(hosts)))
                for name, hosts in sorted(members.items())]

    def set_limits(self, name: str, limits: HostLimits, *,
                   actor: Actor | None = None) -> HostView:
        limits.validate(name)
        with self.ctx.uow() as uow:
            host = uow.hosts.get_by_name(name)
            before = _settings(host)
            host.cpu_overcommit, host.memory_overcommit = (limits.cpu_overcommit,
                                                           limits.memory_overcommit)
            host.max_desktops, host.max_provisioning = (limits.max_desktops,
                                                        limits.max_provisioning)
            host.transfer_slots = limits.transfer_slots
            old, new = changed(before, _settings(host))
            if new:
                record_audit(uow, actor, "host.limits", f"host/{name}",
                             f"changed host {name}'s limits", old=old, new=new)
            uow.commit()
            return host_view(host, balanced_sets=frozenset(uow.host_sets.balanced()))

    def set_shared_storage(self, name: str, shared_storage: str | None, *,
                           actor: Actor | None = None) -> HostView:
        """Say which shared storage the host's storage directory is on (None: its own).
        Hosts naming the same one must mount it at the same path: a stateful desktop of one
        of them lost whole is restarted on another over the same disk (the reconciler's HA
        restart, ``reconciler/ha.py``)."""
        shared_storage = _shared_storage_name(name, shared_storage)
        with self.ctx.uow() as uow:
            host = uow.hosts.get_by_name(name)
            before = _settings(host)
            host.shared_storage = shared_storage
            old, new = changed(before, _settings(host))
            if new:
                record_audit(uow, actor, "host.shared-storage", f"host/{name}",
                             f"host {name}'s storage: {shared_storage or 'its own'}",
                             old=old, new=new)
            uow.commit()
            return host_view(host, balanced_sets=frozenset(uow.host_sets.balanced()))

    def list(self) -> list[HostView]:
        with self.ctx.uow(read_only=True) as uow:
            counts = uow.host_usage.desktop_counts(LIVE_STATES)
            balanced = frozenset(uow.host_sets.balanced())
            return [host_view(h, counts.get(h.id, 0), balanced) for h in uow.hosts.list()]

    def get(self, name: str) -> HostView:
        found = [h for h in self.list() if h.name == name]
        if not found:
            raise NotFound(f"host {name!r} does not exist")
        return found[0]

    # --- drain and maintenance ----------------------------------------------------------

    def drain(self, name: str, *, grace: timedelta = timedelta(minutes=30),
              actor: Actor | None = None) -> HostView:
        """Stop new desktops and sessions on the host; its users are warned now and logged
        off at the deadline (by the broker's session timers); free desktops are replaced
        elsewhere and the host enters maintenance when empty of sessions (reconciler)."""
        if grace.total_seconds() < 0:
            raise InvalidInput("the drain deadline cannot be in the past")
        with self.ctx.uow() as uow:
            host = uow.hosts.get_by_name(name)
            if host.state not in (HostState.ENABLED, HostState.DRAINING):
                raise Conflict(f"host {name!r} is {host.state.value}; only an enabled host "
                               "can be drained")
            before = _settings(host)
            host.state = HostState.DRAINING
            host.drain_deadline = utcnow() + grace
            old, new = changed(before, _settings(host))
            record_audit(uow, actor, "host.drain", f"host/{name}",
                         f"draining host {name} (users logged off at "
                         f"{host.drain_deadline:%H:%M} UTC)", old=old, new=new)
            uow.commit()
        return self.get(name)

    def enable(self, name: str, *, actor: Actor | None = None) -> HostView:
        """Back in the pool: takes desktops and sessions again."""
        with self.ctx.uow() as uow:
            host = uow.hosts.get_by_name(name)
            if host.state is not HostState.ENABLED:
                record_audit(uow, actor, "host.enable", f"host/{name}", f"enabled host {name}",
                             old={"state": host.state.value},
                             new={"state": HostState.ENABLED.value})
            host.state = HostState.ENABLED
            host.drain_deadline = None
            # The drain's warnings no longer hold.
            uow.desktop_sessions.clear_notices_on_host(host.id)
            uow.commit()
        return self.get(name)


    def remove(self, name: str, *, actor: Actor | None = None) -> None:
        """Forget an empty host. Refused (``Conflict`` saying why) while any desktop is on it,
        whatever its state, or while a pool is pinned to it: drain it and let its desktops
        go first."""
        with self.ctx.uow() as uow:
            host = uow.hosts.get_by_name(name)
            desktops = uow.admin.desktops_on_host(host.id)
            if desktops:
                shown = ", ".join(desktops[:5]) + (", ..." if len(desktops) > 5 else "")
                raise Conflict(
                    f"host {name!r} still has {len(desktops)} desktop(s) ({shown}); drain it "
                    "and wait until they are gone, or delete them, before removing it")
            pinned = uow.admin.pools_pinned_to(host.id)
            if pinned:
                raise Conflict(f"host {name!r} is the pinned host of pool(s) "
                               f"{', '.join(pinned)}; change their hosts first")
            host_id, before, host_set = host.id, _settings(host), host.host_set
            uow.admin.forget_host(host_id)
            uow.hosts.delete(host)
            if host_set is not None:
                uow.host_sets.forget_if_empty(host_set)
            record_audit(uow, actor, "host.remove", f"host/{name}", f"removed host {name}",
                         old=before)
            uow.commit()
        self.ctx.forget_driver(host_id)


def _settings(host: Host) -> dict[str, object]:
    """What the audit log records of a host."""
    return {"uri": host.uri, "state": host.state.value, "cpu_overcommit": host.cpu_overcommit,
            "memory_overcommit": host.memory_overcommit, "max_desktops": host.max_desktops,
            "max_provisioning": host.max_provisioning, "transfer_slots": host.transfer_slots,
            "host_set": host.host_set,
            "drain_deadline": host.drain_deadline.isoformat() if host.drain_deadline else None,
            "shared_storage": host.shared_storage}


def _shared_storage_name(host: str, name: str | None) -> str | None:
    if name is None or name == "":
        return None
    if not _NAME_RE.match(name):
        raise InvalidInput(f"host {host!r}: shared storage name {name!r} must be 1-63 "
                           "characters of a-z, 0-9, '.', '_' and '-'")
    return name


def drain_notice(deadline: datetime) -> str:
    return (f"Host maintenance: please save your work; you will be logged off at "
            f"{deadline:%H:%M} UTC. Connect again afterwards to get a desktop on another "
            "host.")
