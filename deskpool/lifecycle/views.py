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
