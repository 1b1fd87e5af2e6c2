"""deskpool.store: repositories in a unit of work, on a migrated SQLite file."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text, update
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

from deskpool.domain.errors import Conflict, InvalidInput, InvalidTransition, NotFound
from deskpool.domain.models import CloneMode, Customization, DomainType, HostState, PowerState
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


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade_to_head(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@dataclass
class Seed:
    host_id: uuid.UUID
    template_id: uuid.UUID
    version_id: uuid.UUID


def _version(template_id: uuid.UUID, number: int, **kw: object) -> TemplateVersion:
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


def _desktop(seed: Seed, name: str, state: str = "provisioning") -> Desktop:
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


@pytest.fixture
def seed(sessions: sessionmaker[Session]) -> Seed:
    with UnitOfWork(sessions) as uow:
        host = uow.hosts.add(Host(name="host-a", uri="test:///default"))
        template = uow.templates.add(Template(name="fedora", description="Fedora desktop"))
        version = uow.versions.add(_version(template.id, 1))
        uow.versions.publish(version)
        uow.commit()
        return Seed(host.id, template.id, version.id)


def _add_desktop(sessions: sessionmaker[Session], seed: Seed, name: str, state: str) -> uuid.UUID:
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.add(_desktop(seed, name, state))
        uow.commit()
        return desktop.id


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
        desktop = uow.desktops.add(_desktop(seed, "lab-001"))
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

        desktop.desired_state = "ready"
        desktop.power_state = PowerState.SHUTOFF
        uow.hosts.delete(uow.hosts.get_by_name("host-c"))
        uow.commit()

    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        assert (desktop.desired_state, desktop.power_state) == ("ready", PowerState.SHUTOFF)
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
        uow.desktops.add(_desktop(seed, "lab-001"))
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
        first = uow.desktops.add(_desktop(seed, "lab-001"))
        uow.commit()

    with UnitOfWork(sessions) as uow:
        same_name = _desktop(seed, "lab-001")
        with pytest.raises(Conflict, match=r"^a desktop named 'lab-001' already exists$"):
            uow.desktops.add(same_name)

        same_mac = _desktop(seed, "lab-002")
        same_mac.mac = first.mac
        with pytest.raises(Conflict, match=rf"^a desktop with MAC address '{first.mac}' already"):
            uow.desktops.add(same_mac)

        same_machine_id = _desktop(seed, "lab-003")
        same_machine_id.machine_id = first.machine_id
        with pytest.raises(Conflict, match=rf"machine-id '{first.machine_id}' already exists"):
            uow.desktops.add(same_machine_id)

        # The SAVEPOINT kept the transaction usable: a good insert still commits.
        uow.desktops.add(_desktop(seed, "lab-004"))
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
            uow.versions.add(_version(seed.template_id, 1))
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
    _add_desktop(sessions, seed, "lab-001", "ready")
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
        uow.versions.add(_version(seed.template_id, 2))
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
        v2 = uow.versions.add(_version(seed.template_id, 2))
        uow.versions.publish(v2)
        uow.versions.add(_version(seed.template_id, 3))  # a draft
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
        draft = uow.versions.add(_version(seed.template_id, 2))
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


# --- desktops and compare-and-set -----------------------------------------------------------


def test_compare_and_set_state_wins_once(sessions: sessionmaker[Session], seed: Seed) -> None:
    desktop_id = _add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        before = desktop.state_changed_at
        assert desktop.version == 1

        assert uow.desktops.compare_and_set_state(desktop_id, "ready", "reserved", task="reserve")
        # The loaded object was expired and now shows the new row.
        assert (desktop.state, desktop.task, desktop.version) == ("reserved", "reserve", 2)
        assert desktop.state_changed_at >= before
        assert desktop.state_changed_at.tzinfo is not None

        assert not uow.desktops.compare_and_set_state(desktop_id, "ready", "reserved")
        assert desktop.version == 2
        uow.commit()

    with UnitOfWork(sessions) as uow:  # a second broker with the old expectation loses
        assert not uow.desktops.compare_and_set_state(desktop_id, "ready", "reserved")
        assert uow.desktops.compare_and_set_state(
            desktop_id, "reserved", "error", last_error="agent silent"
        )
        uow.commit()

    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        assert (desktop.state, desktop.task, desktop.last_error) == ("error", None, "agent silent")
        assert desktop.version == 3
        assert not uow.desktops.compare_and_set_state(uuid.uuid4(), "error", "ready")


def test_compare_and_set_state_is_rolled_back_with_its_unit_of_work(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    desktop_id = _add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        assert uow.desktops.compare_and_set_state(desktop_id, "ready", "reserved")
    with UnitOfWork(sessions) as uow:
        assert uow.desktops.get(desktop_id).state == "ready"


@pytest.mark.parametrize("engines", [1, 2], ids=["one-engine", "two-brokers"])
def test_racing_threads_have_exactly_one_winner(
    tmp_path: Path, engine: Engine, sessions: sessionmaker[Session], seed: Seed, engines: int
) -> None:
    desktop_id = _add_desktop(sessions, seed, "lab-001", "ready")
    # engines=2: two engines (two "brokers") with their own connection pools.
    factories = [sessions]
    extra: list[Engine] = []
    if engines == 2:
        extra.append(make_engine(str(engine.url)))
        factories.append(make_session_factory(extra[0]))

    threads_count = 20
    barrier = threading.Barrier(threads_count)
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    def claim(i: int) -> None:
        try:
            barrier.wait()
            with UnitOfWork(factories[i % len(factories)]) as uow:
                desktop = uow.desktops.get(desktop_id)
                expected = desktop.state  # every thread read "ready" or lost already
                won = expected == "ready" and uow.desktops.compare_and_set_state(
                    desktop_id, "ready", "reserved", task=f"claim-{i}"
                )
                uow.commit()
                results[i] = won
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for extra_engine in extra:
        extra_engine.dispose()

    assert errors == []
    assert len(results) == threads_count
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        assert (desktop.state, desktop.task, desktop.version) == (
            "reserved",
            f"claim-{winners[0]}",
            2,
        )


def test_racing_compare_and_set_without_reading_first(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    """Blind CAS from many threads: the WHERE clause alone picks one winner."""
    desktop_id = _add_desktop(sessions, seed, "lab-001", "ready")
    barrier = threading.Barrier(20)
    outcomes: list[bool] = []
    lock = threading.Lock()

    def claim() -> None:
        barrier.wait()
        with UnitOfWork(sessions) as uow:
            won = uow.desktops.compare_and_set_state(desktop_id, "ready", "reserved")
            uow.commit()
        with lock:
            outcomes.append(won)

    threads = [threading.Thread(target=claim) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == [False] * 19 + [True]


def test_assigning_desktop_state_through_the_orm_is_refused(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    desktop_id = _add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        uow.desktops.get(desktop_id).state = "in_use"
        with pytest.raises(InvalidTransition, match="compare_and_set_state"):
            uow.commit()
    with UnitOfWork(sessions) as uow:
        assert uow.desktops.get(desktop_id).state == "ready"


def test_compare_and_set_state_rejects_an_oversized_state(
    sessions: sessionmaker[Session], seed: Seed
) -> None:
    desktop_id = _add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow, pytest.raises(InvalidInput, match="1-32 characters"):
        uow.desktops.compare_and_set_state(desktop_id, "ready", "x" * 33)


def test_a_stale_orm_write_is_a_conflict(sessions: sessionmaker[Session], seed: Seed) -> None:
    desktop_id = _add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        # Someone else writes the row behind this session's back (no expiry of `desktop`).
        uow.session.execute(
            update(Desktop)
            .where(Desktop.id == desktop_id)
            .values(version=Desktop.version + 1)
            .execution_options(synchronize_session=False)
        )
        desktop.desired_state = "retired"
        with pytest.raises(Conflict, match="changed by someone else"):
            uow.commit()


def test_compare_and_set_power(sessions: sessionmaker[Session], seed: Seed) -> None:
    desktop_id = _add_desktop(sessions, seed, "lab-001", "ready")
    with UnitOfWork(sessions) as uow:
        assert uow.desktops.compare_and_set_power(
            desktop_id, PowerState.UNKNOWN, PowerState.RUNNING
        )
        assert not uow.desktops.compare_and_set_power(
            desktop_id, PowerState.UNKNOWN, PowerState.SHUTOFF
        )
        uow.commit()
    with UnitOfWork(sessions) as uow:
        desktop = uow.desktops.get(desktop_id)
        assert (desktop.power_state, desktop.state, desktop.version) == (
            PowerState.RUNNING,
            "ready",
            2,
        )


def test_desktop_queries(sessions: sessionmaker[Session], seed: Seed) -> None:
    with UnitOfWork(sessions) as uow:
        other_host = uow.hosts.add(Host(name="host-b", uri="test:///default"))
        uow.desktops.add(_desktop(seed, "lab-003", "ready"))
        uow.desktops.add(_desktop(seed, "lab-001", "ready"))
        on_b = _desktop(seed, "lab-002", "in_use")
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
    desktop_id = _add_desktop(sessions, seed, "lab-001", "ready")
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


def test_a_version_added_with_its_new_template_flushes_cleanly(
    sessions: sessionmaker[Session], recwarn: pytest.WarningsRecorder
) -> None:
    with UnitOfWork(sessions) as uow:
        template = uow.templates.add(Template(name="ubuntu"))
        version = _version(template.id, 1)
        version.template = template  # by relationship, as services do
        uow.versions.add(version)
        uow.commit()
    with UnitOfWork(sessions) as uow:
        assert [v.number for v in uow.versions.list(template.id)] == [1]
    assert [str(w.message) for w in recwarn] == []
