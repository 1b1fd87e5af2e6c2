"""deskpool.store migrations: they build exactly the models' schema and run both ways."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, select

from deskpool.store import (
    Base,
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade_to_head,
)
from deskpool.store.db import MIGRATIONS_DIR, make_session_factory
from deskpool.store.models import Installation
from deskpool.store.repositories import installation_id

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = {"hosts", "templates", "template_versions", "desktops", "pools", "memory_states",
          "users", "groups", "group_members", "entitlements", "auth_tokens", "console_tokens",
          "events", "logons", "pool_hosts", "host_slots", "installation", "linux_accounts",
          "signin_throttles", "profiles", "profile_layers", "offline_checkouts",
          "host_sets", "machine_credentials", "profile_layer_hosts", "layer_rebases",
          "layer_conflicts"}


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _schema_diff(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_migrated_schema_matches_the_models(engine: Engine) -> None:
    upgrade_to_head(engine)
    assert _schema_diff(engine) == []


def test_the_schema_comparison_does_notice_a_difference(engine: Engine) -> None:
    """Guard against the test above passing vacuously."""
    upgrade_to_head(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX ix_desktops_state")
    diff = _schema_diff(engine)
    assert [(d[0], d[1].name) for d in diff] == [("add_index", "ix_desktops_state")]


def test_upgrade_downgrade_upgrade(engine: Engine) -> None:
    assert current_revision(engine) is None
    upgrade_to_head(engine)
    assert current_revision(engine) == head_revision() == "0033"
    assert _tables(engine) == TABLES | {"alembic_version"}
    indexes = {ix["name"] for ix in inspect(engine).get_indexes("desktops")}
    assert {"ix_desktops_state", "ix_desktops_host_id", "uq_desktops_held_by_user"} <= indexes

    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert _tables(engine) == {"alembic_version"}

    upgrade_to_head(engine)
    assert current_revision(engine) == "0033"
    assert _schema_diff(engine) == []
    upgrade_to_head(engine)  # at head already: nothing to do, no error
    assert current_revision(engine) == "0033"


def test_upgrade_from_a_url_creates_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'deskpool.db'}"
    upgrade_to_head(url)
    assert current_revision(url) == "0033"
    assert (tmp_path / "fresh" / "deskpool.db").is_file()


def test_each_database_gets_its_own_installation_id_once(tmp_path: Path) -> None:
    ids = []
    for name in ("one", "two"):
        url = f"sqlite:///{tmp_path / name / 'deskpool.db'}"
        upgrade_to_head(url)
        engine = make_engine(url)
        try:
            with make_session_factory(engine)() as session:
                ids.append(installation_id(session))
                assert installation_id(session) == ids[-1]  # read, not made again
                assert len(session.scalars(select(Installation)).all()) == 1
        finally:
            engine.dispose()
    assert ids[0] != ids[1]


def test_foreign_keys_are_back_on_after_a_migration(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite only: PostgreSQL never turns foreign keys off")
    upgrade_to_head(engine)  # migrations run with foreign keys off; the pool gets them back on
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_one_linear_history_with_a_single_head() -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    assert scripts.get_heads() == ["0033"]
    assert [rev.revision for rev in scripts.walk_revisions()] == [
        "0033", "0032", "0031", "0030", "0029", "0028", "0027", "0026", "0025", "0024", "0023",
        "0022", "0021", "0019", "0018", "0017", "0016", "0015", "0014", "0013", "0012", "0010",
        "0009", "0008", "0007", "0006", "0005", "0004", "0003", "0002", "0001"]


def test_migrations_ship_as_package_data() -> None:
    """Every file the migrations need matches a package-data pattern in pyproject.toml."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["deskpool"]
    package_dir = REPO_ROOT / "deskpool"
    shipped = {path for pattern in patterns for path in package_dir.glob(pattern)}
    needed = [
        MIGRATIONS_DIR / "env.py",
        MIGRATIONS_DIR / "script.py.mako",
        *sorted((MIGRATIONS_DIR / "versions").glob("*.py")),
    ]
    assert (MIGRATIONS_DIR / "versions" / "0001_foundation.py") in needed
    assert [path for path in needed if path not in shipped] == []


def test_0002_keeps_existing_desktops_and_gives_them_defaults(engine: Engine) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("its raw rows are SQLite's text ids; the schema check covers PostgreSQL")
    """Upgrading a database with data in it: the new desktop columns get their defaults."""
    from deskpool.store.db import _migrate

    _migrate(engine, "upgrade", "0001")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO hosts VALUES ('h1', 'h', 'test:///default', 'enabled', 'auto', NULL, "
            "NULL, '2026-01-01 00:00:00')")
        connection.exec_driver_sql(
            "INSERT INTO templates VALUES ('t1', 't', '', '2026-01-01 00:00:00')")
        connection.exec_driver_sql(
            "INSERT INTO template_versions (id, template_id, number, image_path, image_sha256, "
            "image_size_bytes, customization, vcpus, memory_mib, notes) VALUES "
            "('v1', 't1', 1, '/x', 'ab', 1, 'none', 1, 128, '')")
        connection.exec_driver_sql(
            "INSERT INTO desktops (id, name, hostname, mac, machine_id, template_version_id, "
            "host_id, clone_mode, state, power_state, state_changed_at, created_at, version) "
            "VALUES ('d1', 'lab-001', 'lab-001', 'm', 'i', 'v1', 'h1', 'linked', 'ready', "
            "'unknown', '2026-01-01', '2026-01-01', 1)")
    upgrade_to_head(engine)
    with engine.connect() as connection:
        row = connection.exec_driver_sql(
            "SELECT name, pool_id, retry_count, has_factory_snapshot FROM desktops").one()
    assert tuple(row) == ("lab-001", None, 0, 0)


def test_api_tokens_issued_without_an_expiry_get_one(engine: Engine) -> None:
    upgrade_to_head(engine)
    downgrade(engine, "0015")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO users (id, name, display_name, source, is_admin, disabled, created_at)"
            " VALUES ('00000000000000000000000000000001', 'old', 'old', 'local', false, false,"
            " CURRENT_TIMESTAMP)")
        for n, kind in ((1, "api"), (2, "session")):
            connection.exec_driver_sql(
                "INSERT INTO auth_tokens (id, token_hash, user_id, kind, label, groups, "
                f"created_at) VALUES ('0000000000000000000000000000001{n}', 'h{n}', "
                f"'00000000000000000000000000000001', '{kind}', '', '', CURRENT_TIMESTAMP)")
    upgrade_to_head(engine)
    with engine.connect() as connection:
        rows = dict(connection.exec_driver_sql(
            "SELECT kind, expires_at FROM auth_tokens").fetchall())
    expires = rows["api"]
    expires = datetime.fromisoformat(expires) if isinstance(expires, str) else expires
    expires = expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    assert timedelta(days=89) < expires - datetime.now(UTC) <= timedelta(days=90)
    assert rows["session"] is None  # sessions were never issued without one; left alone
