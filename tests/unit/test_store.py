"""deskpool.store: repositories in a unit of work, on a migrated SQLite file. Compare-and-set and
races are in test_store_compare_and_set.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

from deskpool.domain.errors import Conflict, NotFound
from deskpool.domain.models import CloneMode, Customization, DomainType, HostState, PowerState
from deskpool.store import Host, Template, UnitOfWork, make_engine
from tests.unit.store_helpers import (
    Seed,
    add_desktop,
    engine_fixture,  # noqa: F401
    make_desktop,
    make_version,
    seed_fixture,  # noqa: F401
    sessions_fixture,  # noqa: F401
)

# --- engine ---------------------------------------------------------------------------------


def test_make_engine_creates_the_directory_and_sets_sqlite_pragmas(tmp_path: Path) -> None:
    db = tmp_path / "not" / "yet" / "there.db"
    engine = make_engine(f"sqlite:///{db}", busy_timeout_ms=1234)
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
        assert db.parent.is_dir()
    finally:
        engine.dispose()


# --- CRUD and the unit of work --------------------------------------------------------------


def test_crud_through_repositories(sessions: sessionmaker[Session], seed: Seed) -> None:
    with UnitOfWork(sessions) as uow:
        uow.hosts.add(Host(name="host-c", uri="qemu+ssh://c/system", state=HostState.DRAINING))
        uow.hosts.add(Host(name="host-b", uri="qemu+ssh://b/system", storage_dir="/srv/dp"))
        desktop = uow.desktops.add(make_desktop(seed, "lab-001"))
        desktop_id = desktop.id
        uow.commit()

    with UnitOfWork(sessions) as uow:
        assert [h.name for h in uow.hosts.list()] == ["host-a", "host-b", "host-c"]
        host_b = uow.hosts.get_by_name("host-b")
        assert host_b.state is HostState.ENABLED
        assert host_b.domain_type_requested is DomainType.AUTO
        assert host_b.domain_type_resolved is None
        assert host_b.storage_dir == "/srv/dp"
        assert uow.hosts.get(host_b.id) is host_b
        assert uow.hosts.get_by_name("host-c").state is HostState.DRAINING

        desktop = uow.desktops.get(desktop_id)
        assert desktop.name == "lab-001"
        assert desktop.state == "provisioning"
        assert desktop.power_state is PowerState.UNKNOWN
        assert desktop.clone_mode is CloneMode.LINKED
        assert desktop.version == 1
        assert desktop.host.name == "host-a"
        assert desktop.template_version.template.name == "fedora"
        assert desktop.created_at.tzinfo is not None
        assert desktop.created_at.utcoffset() == timedelta(0)

        desktop.notice = "maintenance at 14:30"
        desktop.power_state = PowerState.SHUTOFF
        uow.hosts.delete(uow.hosts.get_by_name("host-c"))
        uow.commit()

    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        assert (desktop.notice, desktop.power_state) == ("maintenance at 14:30", PowerState.SHUTOFF)
        assert desktop.version == 2  # every ORM write bumps the optimistic counter
        assert uow.hosts.find_by_name("host-c") is None
        uow.desktops.delete(desktop)
        uow.commit()

    with UnitOfWork(sessions, read_only=True) as uow:
        assert uow.desktops.list() == []


def test_leaving_the_block_without_commit_rolls_back(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    with UnitOfWork(sessions) as uow:
        uow.hosts.add(Host(name="host-kept", uri="test:///default"))
        uow.commit()
        uow.hosts.add(Host(name="host-dropped", uri="test:///default"))
        uow.hosts.get_by_name("host-a").uri = "qemu:///changed"

    with UnitOfWork(sessions) as uow:
        assert [h.name for h in uow.hosts.list()] == ["host-a", "host-kept"]
        assert uow.hosts.get_by_name("host-a").uri == "test:///default"


def test_an_exception_in_the_block_rolls_back_and_propagates(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    with pytest.raises(RuntimeError, match="boom"), UnitOfWork(sessions) as uow:
        uow.desktops.add(make_desktop(seed, "lab-001"))
        raise RuntimeError("boom")

    with UnitOfWork(sessions) as uow:
        assert uow.desktops.names() == set()


def test_read_only_unit_of_work_sees_a_snapshot_and_refuses_to_commit(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    with UnitOfWork(sessions, read_only=True) as reader:
        assert [h.name for h in reader.hosts.list()] == ["host-a"]
        # A writer is not blocked by the open reader (a writing UoW here would wait).
        with UnitOfWork(sessions) as writer:
            writer.hosts.add(Host(name="host-b", uri="test:///default"))
            writer.commit()
        assert [h.name for h in reader.hosts.list()] == ["host-a"]  # still its snapshot
        reader.rollback()
        assert [h.name for h in reader.hosts.list()] == ["host-a", "host-b"]
        with pytest.raises(RuntimeError, match="read-only"):
            reader.commit()


# --- conflicts ------------------------------------------------------------------------------


def test_duplicate_desktop_fields_raise_conflict_naming_field_and_value(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    with UnitOfWork(sessions) as uow:
        first = uow.desktops.add(make_desktop(seed, "lab-001"))
        uow.commit()

    with UnitOfWork(sessions) as uow:
        same_name = make_desktop(seed, "lab-001")
        with pytest.raises(Conflict, match=r"^a desktop named 'lab-001' already exists$"):
            uow.desktops.add(same_name)

        same_mac = make_desktop(seed, "lab-002")
        same_mac.mac = first.mac
        with pytest.raises(Conflict, match=rf"^a desktop with MAC address '{first.mac}' already"):
            uow.desktops.add(same_mac)

        same_machine_id = make_desktop(seed, "lab-003")
        same_machine_id.machine_id = first.machine_id
        with pytest.raises(Conflict, match=rf"machine-id '{first.machine_id}' already exists"):
            uow.desktops.add(same_machine_id)

        # The SAVEPOINT kept the transaction usable: a good insert still commits.
        uow.desktops.add(make_desktop(seed, "lab-004"))
        uow.commit()

    with UnitOfWork(sessions) as uow:
        assert uow.desktops.names() == {"lab-001", "lab-004"}


def test_duplicate_host_template_and_version_number_raise_conflict(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    with UnitOfWork(sessions) as uow:
        with pytest.raises(Conflict, match=r"^a host named 'host-a' already exists$"):
            uow.hosts.add(Host(name="host-a", uri="test:///other"))
        with pytest.raises(Conflict, match=r"^a template named 'fedora' already exists$"):
            uow.templates.add(Template(name="fedora"))
        with pytest.raises(Conflict, match=r"^template 'fedora' already has a version 1$"):
            uow.versions.add(make_version(seed.template_id, 1))
        assert [v.number for v in uow.versions.list(seed.template_id)] == [1]


def test_a_duplicate_made_by_renaming_fails_at_commit_as_conflict(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    with UnitOfWork(sessions) as uow:
        uow.hosts.add(Host(name="host-b", uri="test:///default"))
        uow.commit()
    with UnitOfWork(sessions) as uow:
        uow.hosts.get_by_name("host-b").name = "host-a"
        # SQLite names the column, PostgreSQL the constraint and the value.
        with pytest.raises(Conflict, match=r"hosts\.name|uq_hosts_name.*\(host-a\)"):
            uow.commit()
    with UnitOfWork(sessions) as uow:
        assert [h.name for h in uow.hosts.list()] == ["host-a", "host-b"]


def test_deleting_what_desktops_use_is_a_conflict(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        with pytest.raises(Conflict, match=r"^host 'host-a' cannot be deleted"):
            uow.hosts.delete(uow.hosts.get(seed.host_id))
        with pytest.raises(Conflict, match=r"^template 'fedora' cannot be deleted"):
            uow.templates.delete(uow.templates.get(seed.template_id))
        with pytest.raises(Conflict, match=r"^template version 1 of 'fedora' cannot be deleted"):
            uow.versions.delete(uow.versions.get(seed.version_id))
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.hosts.get(seed.host_id).name == "host-a"
        assert uow.versions.get(seed.version_id).number == 1


def test_deleting_an_unused_template_deletes_its_versions(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    with UnitOfWork(sessions) as uow:
        uow.versions.add(make_version(seed.template_id, 2))
        uow.commit()
    with UnitOfWork(sessions) as uow:
        uow.templates.delete(uow.templates.get(seed.template_id))
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.templates.list() == []
        assert uow.versions.list(seed.template_id) == []


# --- not found ------------------------------------------------------------------------------


def test_not_found_messages_name_the_thing(sessions: sessionmaker[Session], seed: Seed) -> None:
    missing = uuid.uuid4()
    with UnitOfWork(sessions) as uow:
        with pytest.raises(NotFound, match=rf"^desktop {missing} does not exist$"):
            uow.desktops.get(missing)
        with pytest.raises(NotFound, match=r"^desktop 'lab-404' does not exist$"):
            uow.desktops.get_by_name("lab-404")
        with pytest.raises(NotFound, match=rf"^host {missing} does not exist$"):
            uow.hosts.get(missing)
        with pytest.raises(NotFound, match=r"^host 'nowhere' does not exist$"):
            uow.hosts.get_by_name("nowhere")
        with pytest.raises(NotFound, match=r"^template 'ubuntu' does not exist$"):
            uow.templates.get_by_name("ubuntu")
        with pytest.raises(NotFound, match=rf"^template version {missing} does not exist$"):
            uow.versions.get(missing)
        with pytest.raises(NotFound, match=r"^template 'fedora' has no version 7$"):
            uow.versions.get_by_number(seed.template_id, 7)
        empty = uow.templates.add(Template(name="empty"))
        with pytest.raises(NotFound, match=r"^template 'empty' has no published version$"):
            uow.versions.latest(empty.id)


# --- template versions ----------------------------------------------------------------------


def test_version_numbers_and_latest_published(sessions: sessionmaker[Session], seed: Seed) -> None:
    with UnitOfWork(sessions) as uow:
        other = uow.templates.add(Template(name="other"))
        assert uow.versions.next_number(other.id) == 1
        assert uow.versions.next_number(seed.template_id) == 2
        v2 = uow.versions.add(make_version(seed.template_id, 2))
        uow.versions.publish(v2)
        uow.versions.add(make_version(seed.template_id, 3))  # a draft
        uow.commit()

    with UnitOfWork(sessions) as uow:
        assert [v.number for v in uow.versions.list(seed.template_id)] == [1, 2, 3]
        assert uow.versions.next_number(seed.template_id) == 4
        latest = uow.versions.latest(seed.template_id)
        assert latest.number == 2  # 3 is a draft
        assert latest.is_published
        assert latest.published_at is not None and latest.published_at.tzinfo is not None
        assert uow.versions.get_by_number(seed.template_id, 3).published_at is None


def test_a_published_version_refuses_changes(sessions: sessionmaker[Session], seed: Seed) -> None:
    with UnitOfWork(sessions) as uow:
        version = uow.versions.get(seed.version_id)
        version.image_path = "/tmp/swapped.qcow2"
        with pytest.raises(
            Conflict,
            match=r"^template version 1 of 'fedora' is published and cannot change "
            r"\(tried to change image_path\)$",
        ):
            uow.commit()

    with UnitOfWork(sessions) as uow:
        version = uow.versions.get(seed.version_id)
        assert version.image_path == "/var/lib/deskpool/templates/base-1.qcow2"
        version.published_at = None  # un-publishing is a change too
        with pytest.raises(Conflict, match="is published and cannot change"):
            uow.flush()

    with (
        UnitOfWork(sessions) as uow,
        pytest.raises(Conflict, match=r"^template version 1 of 'fedora' is already"),
    ):
        uow.versions.publish(uow.versions.get(seed.version_id))


def test_a_draft_version_may_change_until_published(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    with UnitOfWork(sessions) as uow:
        draft = uow.versions.add(make_version(seed.template_id, 2))
        uow.commit()
    with UnitOfWork(sessions) as uow:
        draft = uow.versions.get(draft.id)
        draft.notes = "with office suite"
        draft.customization = Customization.CLOUD_INIT
        uow.versions.publish(draft)  # changes and publication in one flush are allowed
        uow.commit()
    with UnitOfWork(sessions) as uow:
        draft = uow.versions.get(draft.id)
        assert (draft.notes, draft.customization) == ("with office suite", Customization.CLOUD_INIT)
        stored = uow.session.execute(
            text("SELECT customization FROM template_versions WHERE number = 2")
        ).scalar_one()
        assert stored == "cloud-init"  # enum values, not member names, are stored
        draft.notes = "again"
        with pytest.raises(Conflict, match="template version 2 of 'fedora' is published"):
            uow.commit()


def test_a_version_added_with_its_new_template_flushes_cleanly(
    sessions: sessionmaker[Session], recwarn: pytest.WarningsRecorder
) -> None:
    with UnitOfWork(sessions) as uow:
        template = uow.templates.add(Template(name="ubuntu"))
        version = make_version(template.id, 1)
        version.template = template  # by relationship, as services do
        uow.versions.add(version)
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert [v.number for v in uow.versions.list(template.id)] == [1]
    assert [str(w.message) for w in recwarn] == []


# --- desktops -------------------------------------------------------------------------------


def test_desktop_queries(sessions: sessionmaker[Session], seed: Seed) -> None:
    with UnitOfWork(sessions) as uow:
        other_host = uow.hosts.add(Host(name="host-b", uri="test:///default"))
        uow.desktops.add(make_desktop(seed, "lab-003", "ready"))
        uow.desktops.add(make_desktop(seed, "lab-001", "ready"))
        on_b = make_desktop(seed, "lab-002", "in_use")
        on_b.host_id = other_host.id
        uow.desktops.add(on_b)
        uow.commit()

    with UnitOfWork(sessions, read_only=True) as uow:
        assert uow.desktops.names() == {"lab-001", "lab-002", "lab-003"}
        assert [d.name for d in uow.desktops.list()] == ["lab-001", "lab-002", "lab-003"]
        assert [d.name for d in uow.desktops.by_host(seed.host_id)] == ["lab-001", "lab-003"]
        assert [d.name for d in uow.desktops.by_host(other_host.id)] == ["lab-002"]
        assert [d.name for d in uow.desktops.by_state("ready")] == ["lab-001", "lab-003"]
        assert uow.desktops.by_state("retired") == []


def test_timestamps_are_utc_and_naive_ones_are_refused(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    desktop_id = add_desktop(sessions, seed, "lab-001", "ready")
    plus_two = datetime(2030, 5, 1, 14, 0, tzinfo=UTC).astimezone()  # any zone is converted
    with UnitOfWork(sessions) as uow:
        uow.desktops.get(desktop_id).identity_confirmed_at = plus_two
        uow.commit()
    with UnitOfWork(sessions) as uow:
        confirmed = uow.desktops.get(desktop_id).identity_confirmed_at
        assert confirmed == datetime(2030, 5, 1, 14, 0, tzinfo=UTC)
        assert confirmed is not None and confirmed.tzinfo is UTC

        uow.desktops.get(desktop_id).identity_confirmed_at = datetime(2030, 5, 1, 14, 0)
        with pytest.raises(StatementError, match="naive datetime"):
            uow.flush()
