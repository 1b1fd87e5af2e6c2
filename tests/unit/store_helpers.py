"""Fixtures and row builders shared by the store's unit tests: a migrated database, seeded."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from deskpool.store import (
    Desktop,
    Host,
    Template,
    TemplateVersion,
    UnitOfWork,
    make_engine,
    make_session_factory,
    upgrade_to_head,
)


# Fixtures are named apart from their functions, so a test module imports them without its
# parameters shadowing the import.
@pytest.fixture(name="engine")
def engine_fixture(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade_to_head(engine)
    yield engine
    engine.dispose()


@pytest.fixture(name="sessions")
def sessions_fixture(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@dataclass
class Seed:
    host_id: uuid.UUID
    template_id: uuid.UUID
    version_id: uuid.UUID


def make_version(template_id: uuid.UUID, number: int, **kw: object) -> TemplateVersion:
    return TemplateVersion(
        template_id=template_id,
        number=number,
        image_path=f"/var/lib/deskpool/templates/base-{number}.qcow2",
        image_sha256="ab" * 32,
        image_size_bytes=5 * 2**30,
        vcpus=2,
        memory_mib=2048,
        **kw,
    )


_counter = iter(range(1, 10_000))


def make_desktop(seed: Seed, name: str, state: str = "provisioning") -> Desktop:
    n = next(_counter)
    return Desktop(
        name=name,
        hostname=name,
        mac=f"52:54:00:00:{n // 256:02x}:{n % 256:02x}",
        machine_id=f"{n:032x}",
        template_version_id=seed.version_id,
        host_id=seed.host_id,
        state=state,
    )


@pytest.fixture(name="seed")
def seed_fixture(sessions: sessionmaker[Session]) -> Seed:
    with UnitOfWork(sessions) as uow:
        host = uow.hosts.add(Host(name="host-a", uri="test:///default"))
        template = uow.templates.add(Template(name="fedora", description="Fedora desktop"))
        version = uow.versions.add(make_version(template.id, 1))
        uow.versions.publish(version)
        uow.commit()
        return Seed(host.id, template.id, version.id)


def add_desktop(sessions: sessionmaker[Session], seed: Seed, name: str, state: str) -> uuid.UUID:
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.add(make_desktop(seed, name, state))
        uow.commit()
        return desktop.id
