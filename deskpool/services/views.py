"""Read-only views the services hand to the edges (CLI, API), so no ORM object leaves a
transaction."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class HostView:
    id: uuid.UUID
    name: str
    uri: str
    state: str
    domain_type: str
    storage_dir: str | None
    hypervisor: str = ""
    arch: str = ""
    cpu_model: str = ""
    vcpus: int = 0
    memory_mib: int = 0
    storage_free_bytes: int = 0
    cpu_overcommit: float = 4.0
    memory_overcommit: float = 1.0
    max_desktops: int | None = None
    max_provisioning: int = 2
    transfer_slots: int = 2
    desktops: int = 0
    last_seen_at: datetime | None = None
    last_error: str | None = None
    drain_deadline: datetime | None = None
    shared_storage: str | None = None
    host_set: str | None = None  # None: the default set
    set_balances: bool = False  # the set's balancing switch


@dataclass(frozen=True)
class HostSetView:
    name: str
    balance: bool
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class TemplateVersionView:
    id: uuid.UUID
    template: str
    number: int
    image_path: str
    image_sha256: str
    image_size_bytes: int
    customization: str
    published_at: datetime
    has_user_data: bool = False  # the admin's cloud-init user data rides in each seed
    has_join_hook: bool = False  # a join hook runs once on each desktop


@dataclass(frozen=True)
class DesktopView:
    id: uuid.UUID
    name: str
    hostname: str
    mac: str
    machine_id: str
    state: str
    power_state: str
    host: str
    template: str
    version: int
    clone_mode: str
    last_error: str | None
